"""The public API and CLI on the random tiny model: determinism, streaming, records, input errors."""
import json

import pytest
import torch

from streamt1_engine import SearchConfig, StreamT1Engine, StreamT1Error
from streamt1_engine.cli import main
from streamt1_engine.video_io import read_video


@pytest.fixture(scope="module")
def engine():
    return StreamT1Engine.from_pretrained("random-tiny", device="cpu")


def brightness(frames, prompt):
    return frames.mean(dim=(1, 2, 3, 4))


def steadiness(frames, prompt):
    return -(frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


def test_same_seed_same_video(engine):
    a = engine.generate("a red circle moving left", num_chunks=3, seed=5)
    b = engine.generate("a red circle moving left", num_chunks=3, seed=5)
    c = engine.generate("a red circle moving left", num_chunks=3, seed=6)
    assert a.frames.dtype == torch.uint8 and a.frames.shape == (9, 32, 32, 3)
    assert a.latents.shape == (48, 9, 8, 8)
    assert torch.equal(a.frames, b.frames)
    assert not torch.equal(a.frames, c.frames)
    assert len(a.chunks) == 3 and a.info["chunk_seeds"] == [5, 5, 5]


def test_stream_yields_the_generated_chunks_in_order(engine):
    streamed = list(engine.stream("a blue square", num_chunks=4, seed=1))
    assert [c.index for c in streamed] == [0, 1, 2, 3]
    full = engine.generate("a blue square", num_chunks=4, seed=1)
    assert torch.equal(torch.cat([c.frames for c in streamed]), full.frames)


def steps_when_agreed(records) -> dict[int, int]:
    """From the records alone: chunk index -> first step after which every surviving beam shares that chunk."""
    agreed, lineages = {}, []
    for step, record in enumerate(records):
        lineages = [((j,) if step == 0 else lineages[record.candidate_parents[j]] + (j,)) for j in record.survivors]
        for i in range(step + 1):
            if i not in agreed and len({lineage[:i + 1] for lineage in lineages}) == 1:
                agreed[i] = step
    return agreed


def window_start_brightness(frames, prompt):
    """Scores the first frame of the long-term window, i.e. the parent's chunk: siblings tie, so both
    survivors come from the best parent and the beams agree on every chunk one step after it."""
    return frames[:, 0].mean(dim=(1, 2, 3))


def no_preference(frames, prompt):
    return torch.zeros(frames.shape[0])


def test_stream_t1_streams_agreed_chunks_early(engine):
    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=2)
    seen = []
    gen = engine.stream("a green triangle", num_chunks=5, seed=3, search=search, short_reward=no_preference,
                        long_reward=window_start_brightness, progress=lambda done, total: seen.append(done))
    indices = [(chunk.index, len(seen)) for chunk in gen]
    assert [i for i, _ in indices] == list(range(5))
    result = engine.generate("a green triangle", num_chunks=5, seed=3, search=search, short_reward=no_preference,
                             long_reward=window_start_brightness)
    # each chunk arrives right after the step at which all surviving beams first descend from it
    agreed = steps_when_agreed(result.chunks)
    expected = [agreed[i] + 1 if agreed.get(i, 4) < 4 else 5 for i in range(5)]
    assert [done for _, done in indices] == expected
    assert expected[0] < 5  # this run does agree early: the first chunk comes out before the stream ends
    assert result.frames.shape[0] == 15
    rec = result.chunks[1]
    assert len(rec.candidate_seeds) == 4 and len(rec.survivors) == 2 and rec.hybrid_scores is not None
    assert result.info["chosen_beam"] in (0, 1)


def test_streams_on_one_engine_run_at_once(engine):
    """A second stream while the first is suspended mid-way runs (the engine batches streams); neither changes."""
    expected = engine.generate("a blue square", num_chunks=3, seed=2)
    other = engine.generate("a red circle", num_chunks=2, seed=9)
    first = engine.stream("a blue square", num_chunks=3, seed=2)
    got = [next(first)]
    assert torch.equal(engine.generate("a red circle", num_chunks=2, seed=9).frames, other.frames)
    second = engine.stream("a red circle", num_chunks=2, seed=9)
    head = next(second).frames
    second.close()
    assert torch.equal(head, other.frames[:head.shape[0]])
    got += list(first)  # the first stream is unharmed
    assert torch.equal(torch.cat([c.frames for c in got]), expected.frames)
    # closing a stream early cancels it and frees its pages
    early = engine.stream("a blue square", num_chunks=3, seed=2)
    next(early)
    early.close()
    assert engine.stats()["pages_in_use"] == 0
    assert torch.equal(engine.generate("a blue square", num_chunks=3, seed=2).frames, expected.frames)


def test_concurrent_threads_run_together_with_their_own_results(engine):
    import threading

    started, release = threading.Event(), threading.Event()
    results = {}

    def hold(done, total):
        started.set()
        release.wait(timeout=60)

    def background():
        results["video"] = engine.generate("a green triangle", num_chunks=2, seed=4, progress=hold)

    worker = threading.Thread(target=background)
    worker.start()
    try:
        assert started.wait(timeout=60)
        # the first caller is paused in its progress callback; another request runs meanwhile
        alone = engine.generate("a red circle", num_chunks=1, seed=1)
        assert alone.frames.shape[0] > 0
    finally:
        release.set()
        worker.join(timeout=120)
    assert torch.equal(results["video"].frames, engine.generate("a green triangle", num_chunks=2, seed=4).frames)


def test_resolution_override(engine):
    result = engine.generate("a dot", num_chunks=1, height=16, width=48)
    assert result.frames.shape == (3, 16, 48, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(num_chunks=0), "num_chunks"),
    (dict(num_chunks=-2), "num_chunks"),
    (dict(num_chunks=2.5), "num_chunks"),
    (dict(num_chunks=10**9), "too large"),
    (dict(seed=-1), "seed"),
    (dict(search="beam"), "unknown search strategy"),
    (dict(height=30), "divisible"),
])
def test_bad_requests_raise_one_line_errors(engine, kwargs, message):
    args = dict(prompt="a dot", num_chunks=1)
    args.update(kwargs)
    prompt = args.pop("prompt")
    with pytest.raises(StreamT1Error, match=message) as info:
        engine.generate(prompt, **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="tpu"), "unknown device"),
    (dict(device="cuda"), "CUDA is not available"),
    (dict(dtype="int8"), "unknown dtype"),
    (dict(attention_backend="magic"), "unknown attention backend"),
])
def test_bad_engine_options(kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(StreamT1Error, match=message):
        StreamT1Engine.from_pretrained("random-tiny", **kwargs)


def test_missing_model_dir():
    with pytest.raises(StreamT1Error, match="no such file"):
        StreamT1Engine.from_pretrained("./does/not/exist")


def test_cli_writes_playable_mp4_and_json(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = main(["generate", "a red circle moving right", "-o", str(out), "--model", "random-tiny", "--chunks", "3",
                 "--seed", "9", "--no-progress"])
    assert code == 0
    frames = read_video(out)
    assert frames.shape == (9, 32, 32, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompt"] == "a red circle moving right" and record["seed"] == 9
    assert record["num_frames"] == 9 and len(record["chunks"]) == 3
    assert record["search"]["strategy"] == "none"


def test_cli_stream_t1_verbose_record(tmp_path, caplog):
    out = tmp_path / "search.mp4"
    code = main(["generate", "a red circle", "-o", str(out), "--model", "random-tiny", "--chunks", "3",
                 "--search", "stream_t1", "--beam-size", "2", "--top-k", "2", "--no-progress", "-v"])
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["search"]["beam_size"] == 2 and len(record["chunks"][1]["candidate_seeds"]) == 4
    assert record["final_beam_scores"] is not None and len(record["final_beam_scores"]) == 2


def test_cli_prompt_schedule_from_a_longlive_jsonl_line(tmp_path, capsys):
    schedule = tmp_path / "switches.jsonl"
    lines = [{"prompts": ["a red circle", "a blue square"], "switch_frame_indices": [3]},
             {"prompts": ["a green triangle", "a white circle"], "switch_frame_indices": [6]}]
    schedule.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "switch.mp4"
    code = main(["generate", "-o", str(out), "--model", "random-tiny", "--chunks", "3", "--no-progress",
                 "--prompt-schedule", str(schedule), "--prompt-schedule-line", "1"])
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["prompt"] == "a green triangle" and record["num_frames"] == 9
    assert [(s["chunk"], s["prompt"]) for s in record["prompt_switches"]] == [(2, "a white circle")]
    assert main(["generate", "a red square", "-o", str(tmp_path / "y.mp4"), "--model", "random-tiny",
                 "--prompt-schedule", str(schedule)]) == 2
    assert "chunk-0 prompt" in capsys.readouterr().err
    assert main(["generate", "-o", str(tmp_path / "z.mp4"), "--model", "random-tiny"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "", "-o", str(tmp_path / "x.mp4"), "--model", "random-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: prompt is empty"
    assert main(["generate", "x", "-o", str(tmp_path / "x.avi"), "--model", "random-tiny"]) == 2
    assert main(["generate", "x", "-o", str(tmp_path / "nope" / "x.mp4"), "--model", "random-tiny"]) == 2
