"""No silent failure, no lost work: corrupt weights, unwritable output, interrupted runs, memory refusal,
flat memory over long streams, and strict validation of every input (the fuzz cases as one table)."""
from __future__ import annotations

import errno
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from streamt1_engine import SearchConfig, StreamT1Engine, StreamT1Error
from streamt1_engine.cli import default_threads, main
from streamt1_engine.config import SamplerConfig, StreamConfig, WanConfig
from streamt1_engine.loaders import BUILTIN_DIR
from streamt1_engine.memory import RunShape, largest_fitting, parse_size
from streamt1_engine.model.loading import wan_config_from_diffusers
from streamt1_engine.video_io import Mp4StreamWriter, read_video, write_json

PROMPT = "a red circle moving right on a blue background"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine():
    return StreamT1Engine.from_pretrained("random-tiny", device="cpu")


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ----------------------------------------------------------------------------------- 1. non-finite values

def corrupt_copy(tmp_path: Path) -> Path:
    """The tiny model with every 997th byte of dit.safetensors' tensor data (header intact) set to 0xff."""
    model_dir = tmp_path / "corrupt"
    shutil.copytree(BUILTIN_DIR, model_dir)
    weights = model_dir / "dit.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start, len(data), 997):
        data[i] = 0xFF
    weights.write_bytes(bytes(data))
    return model_dir


def test_corrupt_weights_are_refused_at_load_naming_the_tensors(tmp_path):
    model_dir = corrupt_copy(tmp_path)
    with pytest.raises(StreamT1Error, match=r"is corrupt: \d+ tensors hold NaN or infinite values \(blocks\.") as info:
        StreamT1Engine.from_pretrained(str(model_dir), device="cpu")
    assert "\n" not in str(info.value)


def test_corrupt_weights_exit_non_zero_from_the_cli(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert main(["generate", PROMPT, "-o", str(out), "--model", str(corrupt_copy(tmp_path)), "--no-progress"]) == 2
    assert "corrupt" in one_line(capsys.readouterr().err)
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("search", ["none", "stream_t1"])
def test_non_finite_latents_stop_the_stream(search):
    broken = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    with torch.no_grad():
        broken.model.head.head.weight[0, 0] = float("nan")  # weights that went bad after loading
    with pytest.raises(StreamT1Error, match="non-finite latents") as info:
        next(iter(broken.stream(PROMPT, num_chunks=3, search=search)))
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------- 2. output

@pytest.fixture
def no_generation(monkeypatch):
    """Preflight failures must come before any work: generating at all fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("generation started before the output was checked")

    monkeypatch.setattr(StreamT1Engine, "stream", refuse)


def read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; /proc is read-only for everyone
        return Path("/proc")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("case,message", [
    ("directory", "is a directory"),
    ("record_directory", "is a directory"),
    ("read_only", "cannot write to output directory"),
    ("missing_dir", "does not exist"),
    ("wrong_suffix", "must end in .mp4"),
])
def test_bad_output_is_refused_before_any_work(tmp_path, capsys, no_generation, case, message):
    out = {"directory": tmp_path / "clip.mp4", "record_directory": tmp_path / "clip.mp4",
           "read_only": read_only_dir(tmp_path) / "clip.mp4", "missing_dir": tmp_path / "nope" / "clip.mp4",
           "wrong_suffix": tmp_path / "clip.avi"}[case]
    if case == "directory":
        out.mkdir()
    if case == "record_directory":
        out.with_suffix(".json").mkdir()
    before = sorted(tmp_path.rglob("*"))
    assert main(["generate", PROMPT, "-o", str(out), "--model", "random-tiny", "--no-progress"]) == 2
    assert message in one_line(capsys.readouterr().err)
    assert sorted(tmp_path.rglob("*")) == before  # no litter


def test_full_disk_is_refused_before_generating(tmp_path, capsys, monkeypatch, no_generation):
    import streamt1_engine.cli as cli

    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=1000))
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--model", "random-tiny"]) == 2
    assert "not enough free space" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["append", "record", "close"])
def test_write_failure_mid_run_is_one_line_and_leaves_no_litter(tmp_path, capsys, monkeypatch, failing):
    """The disk fills up while the video (or its record) is written: one line, nothing left behind."""
    full = OSError(errno.ENOSPC, "No space left on device")
    calls = {"n": 0}
    if failing == "append":
        original = Mp4StreamWriter.append

        def append(self, frames):
            calls["n"] += 1
            if calls["n"] == 2:
                raise full
            return original(self, frames)

        monkeypatch.setattr(Mp4StreamWriter, "append", append)
    elif failing == "record":
        def write_record(path, data):
            if data["status"] == "complete":
                raise full
            return write_json(path, data)

        import streamt1_engine.video_io as video_io

        monkeypatch.setattr(video_io, "write_json", write_record)
    else:
        def close(self):
            self.abort()
            raise full

        monkeypatch.setattr(Mp4StreamWriter, "close", close)
    out = tmp_path / "x.mp4"
    assert main(["generate", PROMPT, "-o", str(out), "--model", "random-tiny", "--chunks", "3", "--no-progress"]) == 2
    assert "No space left on device" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_streaming_writer_appends_chunks_and_aborts_cleanly(tmp_path):
    frames = torch.randint(0, 255, (3, 16, 24, 3), dtype=torch.uint8).numpy()
    writer = Mp4StreamWriter(tmp_path / "v.mp4", fps=8)
    for _ in range(3):
        writer.append(frames)
    assert read_video(tmp_path / "v.mp4").shape[0] == 9  # fragmented: playable before it is closed
    writer.close()
    assert read_video(tmp_path / "v.mp4").shape == (9, 16, 24, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    aborted = Mp4StreamWriter(tmp_path / "w.mp4", fps=8)
    aborted.append(frames)
    with pytest.raises(StreamT1Error, match="chunk frames are"):
        aborted.append(frames[:, :8])
    aborted.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_after_chunk_3_keeps_a_playable_video_and_an_interrupted_record(tmp_path, sig):
    out = tmp_path / "long.mp4"
    record_path = out.with_suffix(".json")
    proc = subprocess.Popen([sys.executable, "-m", "streamt1_engine.cli", "generate", PROMPT, "-o", str(out),
                             "--chunks", "400", "--no-progress", "--threads", "1"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if record_path.exists() and json.loads(record_path.read_text())["final_chunks"] >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "interrupted" in one_line(err)
    record = json.loads(record_path.read_text())
    assert record["status"] == "interrupted" and 3 <= record["final_chunks"] < 400
    frames = read_video(out)
    assert frames.shape[0] == record["num_frames"] == 3 * record["final_chunks"]
    assert len(record["chunks"]) >= record["final_chunks"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.json", "long.mp4"]


def test_record_is_rewritten_after_every_chunk(tmp_path, monkeypatch):
    import streamt1_engine.video_io as video_io

    seen = []

    def spy(path, data):
        seen.append((data["status"], len(data["chunks"]), data["final_chunks"], data["num_frames"]))
        return write_json(path, data)

    monkeypatch.setattr(video_io, "write_json", spy)
    out = tmp_path / "x.mp4"
    assert main(["generate", PROMPT, "-o", str(out), "--model", "random-tiny", "--chunks", "3", "--no-progress"]) == 0
    # after every search step and after every chunk appended to the video (1, 2, 3 final chunks): the record
    # always says what the video holds
    assert [s[0] for s in seen] == ["running"] * (len(seen) - 1) + ["complete"]
    assert {1, 2, 3} <= {s[2] for s in seen}
    assert seen[-1] == ("complete", 3, 3, 9) and all(s[3] == 3 * s[2] for s in seen)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["memory_estimate"]["run"] > 0 and record["status"] == "complete"


# ----------------------------------------------------------------------------------- 3. memory estimate

def test_kv_pages_of_the_estimate_match_the_pool():
    from streamt1_engine.cache import PagedKVCache

    stream = StreamConfig.tiny()
    for b, k in [(1, 1), (4, 1), (2, 2), (3, 5)]:
        shape = RunShape(children=b, survivors=k, beam_pages=stream.max_pages_per_beam, latent_height=4,
                         latent_width=6, chunk_latent_frames=3, frames_per_chunk=3, frame_height=16, frame_width=24,
                         num_chunks=7, window_chunks=3, uses_rewards=True, dtype_bytes=4)
        assert shape.kv_pages == PagedKVCache.pages_needed(stream, k, b * k)


def test_estimate_grows_with_candidates_and_size(engine):
    small = engine.estimate_memory(search=SearchConfig(beam_size=2, top_k=2))
    wide = engine.estimate_memory(search=SearchConfig(beam_size=8, top_k=8))
    large = engine.estimate_memory(search=SearchConfig(beam_size=2, top_k=2), height=128, width=128)
    assert small.run < wide.run and small.run < large.run
    assert wide.activations > 10 * small.activations  # 64 vs 4 candidates


def test_memory_refusal_names_the_largest_search_that_fits(engine):
    search = SearchConfig(beam_size=64, top_k=64, noise_mode="portable")
    limit = engine.estimate_memory(search=SearchConfig(beam_size=64, top_k=5, noise_mode="portable")).run + 1
    engine.memory_limit = limit
    try:
        with pytest.raises(StreamT1Error, match="exceeds the") as info:
            engine.generate(PROMPT, num_chunks=1, search=search)
        message = str(info.value)
        assert "\n" not in message
        top_k = int(re.search(r"at most --top-k (\d+) fits with --beam-size 64", message).group(1))
        assert top_k == 5  # the largest that fits, and one more does not
        assert engine.estimate_memory(search=SearchConfig(beam_size=64, top_k=6, noise_mode="portable")).run > limit
        # one candidate too big: the largest frame size that fits instead
        engine.memory_limit = engine.estimate_memory(height=64, width=64).run + 1
        with pytest.raises(StreamT1Error, match=r"at most --height (\d+) --width (\d+) fits") as info:
            engine.generate(PROMPT, num_chunks=1, height=256, width=256)
        height = int(re.search(r"--height (\d+)", str(info.value)).group(1))
        assert 64 <= height < 256
        assert engine.estimate_memory(height=height, width=height).run <= engine.memory_limit
    finally:
        engine.memory_limit = "auto"


def test_memory_limit_from_the_cli(tmp_path, capsys, no_generation):
    args = ["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--model", "random-tiny", "--search", "stream_t1",
            "--beam-size", "64", "--top-k", "64", "--noise-mode", "portable"]
    assert main(args + ["--memory-limit", "100M"]) == 2
    assert re.search(r"estimated peak memory .* exceeds the 100.00 MiB memory limit; at most --(top-k|beam-size) \d+ fits",
                     one_line(capsys.readouterr().err))


def test_out_of_memory_becomes_the_same_one_line_message(engine, monkeypatch):
    from streamt1_engine.sampler import EagerDenoiser

    def denoise(self, noise, attn, text=None):  # the chunk's (batched) forward runs out of memory
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(EagerDenoiser, "denoise", denoise)
    with pytest.raises(StreamT1Error, match=r"out of memory on cpu at chunk 0: estimated peak memory .* at most") as e:
        engine.generate(PROMPT, num_chunks=2, search=SearchConfig(beam_size=2, top_k=2))
    assert "\n" not in str(e.value)


def test_largest_fitting_and_sizes():
    assert largest_fitting(lambda n: n <= 37, 100) == 37
    assert largest_fitting(lambda n: False, 100) == 0
    assert largest_fitting(lambda n: True, 5) == 5
    assert parse_size("1.5G") == 1536 * 2**20 and parse_size("512M") == 512 * 2**20 and parse_size("none") is None


# ----------------------------------------------------------------------------------- 4. flat memory

def live_tensor_bytes(skip_emitted: bool = False) -> int:
    """Bytes of every tensor storage alive in the process (device and host): no allocator noise.
    ``skip_emitted``: leave out the final chunks handed to the consumer (how many are buffered varies)."""
    from streamt1_engine.engine import StreamChunk

    gc.collect()
    seen, total = set(), 0
    objects = gc.get_objects()
    if skip_emitted:
        for chunk in (o for o in objects if type(o) is StreamChunk):
            for t in (chunk.frames, chunk.latents):
                seen.add((t.untyped_storage().device, t.untyped_storage().data_ptr()))
    for obj in objects:
        if not issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no lazy module attribute lookups
            continue
        try:
            storage = obj.untyped_storage()
            key = (storage.device, storage.data_ptr())
        except Exception:  # meta / fake tensors own no memory
            continue
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def rss_bytes() -> int:
    """Resident set size after returning free heap pages to the system (glibc), so it follows live memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_long_stream_t1_stream_is_flat_in_memory():
    """Each surviving chunk keeps only its own data, old chunks leave the device, and emitted chunks' latents
    are dropped: over a long stream only the decoded frames kept for the final pick may grow."""
    engine = StreamT1Engine.from_pretrained("tiny", device="cpu")
    search = SearchConfig(beam_size=2, top_k=2, window_chunks=2)
    first, last, total = 10, 40, 42
    marks = {}

    def at_chunk_end(handle, index, record):
        # in the worker, between chunks: no step's temporaries are alive (the caller's thread could see some)
        if index + 1 in (first, last):
            marks[index + 1] = (live_tensor_bytes(skip_emitted=True), rss_bytes())

    frame_bytes = None
    handle = engine.submit(PROMPT, num_chunks=total, seed=1, search=search, callback_on_chunk_end=at_chunk_end)
    for chunk in handle.chunks():
        frame_bytes = chunk.frames.numel()
    (live0, rss0), (live1, rss1) = marks[first], marks[last]
    # the K lineages' uint8 frames (the final pick scores whole videos) and nothing else per chunk
    allowed = (last - first) * frame_bytes * search.top_k + (1 << 16)
    assert live1 - live0 <= allowed, (live0, live1, allowed)
    assert rss1 - rss0 <= 0.02 * rss0, (rss0, rss1)


def test_kept_chunks_do_not_hold_the_candidate_batch(engine):
    from streamt1_engine.search import beam_search

    kept = []
    original = beam_search.BeamSearch._offload_history

    def spy(self):
        original(self)
        kept.append([(b.node, b.node.parent) for b in self.beams])

    try:
        beam_search.BeamSearch._offload_history = spy
        engine.generate(PROMPT, num_chunks=4, search=SearchConfig(beam_size=3, top_k=2, window_chunks=2))
    finally:
        beam_search.BeamSearch._offload_history = original
    for node, parent in kept[-1]:
        for t in (node.latents, node.frames, node.initial_noise):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # its own storage, no batch view
        assert parent.initial_noise is None  # only a beam's last noise is propagated
    oldest = kept[-1][0][0].lineage()[0]
    assert oldest.offloaded and oldest.frames.device.type == "cpu"


# ----------------------------------------------------------------------------------- 5. validation (fuzz table)

def engine_dir(tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "engine"
    shutil.copytree(BUILTIN_DIR, folder)
    spec = json.loads((folder / "streamt1.json").read_text())
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".")
            spec[section][name] = value
        else:
            spec[key] = value
    (folder / "streamt1.json").write_text(json.dumps(spec))
    return folder


CONFIG_CASES = [
    (lambda: SearchConfig(beam_size=2.5), "SearchConfig.beam_size must be an integer"),
    (lambda: SearchConfig(beam_size="2"), "SearchConfig.beam_size must be an integer"),
    (lambda: SearchConfig(top_k=True), "SearchConfig.top_k must be an integer"),
    (lambda: SearchConfig(top_k=0), "SearchConfig.top_k must be >= 1"),
    (lambda: SearchConfig(noise_propagation="no"), "SearchConfig.noise_propagation must be true or false"),
    (lambda: SearchConfig(memory_sinking=1), "SearchConfig.memory_sinking must be true or false"),
    (lambda: SearchConfig(short_threshold=float("nan")), "SearchConfig.short_threshold must be a finite number"),
    (lambda: SearchConfig(long_threshold=float("inf")), "SearchConfig.long_threshold must be a finite number"),
    (lambda: SearchConfig(fusion_cap="0.4"), "SearchConfig.fusion_cap must be a number"),
    (lambda: SearchConfig(ema_alpha=1.5), r"SearchConfig.ema_alpha must be in \[0.0, 1.0\]"),
    (lambda: SearchConfig(strategy=3), "SearchConfig.strategy must be a string"),
    (lambda: WanConfig.tiny(dim="64"), "WanConfig.dim must be an integer"),
    (lambda: WanConfig.tiny(num_layers=0), "WanConfig.num_layers must be >= 1"),
    (lambda: WanConfig.tiny(patch_size=(1, 2.0, 2)), r"WanConfig.patch_size\[1\] must be an integer"),
    (lambda: WanConfig.tiny(eps=float("nan")), "WanConfig.eps must be a finite number"),
    (lambda: WanConfig.tiny(cross_attn_norm="yes"), "WanConfig.cross_attn_norm must be true or false"),
    (lambda: StreamConfig.tiny(latent_height=4.0), "StreamConfig.latent_height must be an integer"),
    (lambda: StreamConfig.tiny(latent_width=0), "StreamConfig.latent_width must be >= 1"),
    (lambda: SamplerConfig(shift=float("nan")), "SamplerConfig.shift must be a finite number"),
    (lambda: SamplerConfig(denoising_steps=("a",)), r"SamplerConfig.denoising_steps\[0\] must be a number"),
    (lambda: SamplerConfig(warp_denoising_steps="false"), "SamplerConfig.warp_denoising_steps must be true or false"),
    (lambda: wan_config_from_diffusers({"num_layers": "thirty"}), "num_layers must be an integer, got .thirty."),
    (lambda: wan_config_from_diffusers({"num_attention_heads": 1.5}), "num_attention_heads must be an integer"),
    (lambda: wan_config_from_diffusers({"eps": "small"}), "eps must be a number, got .small."),
    (lambda: write_json(Path("never-written.json"), {"score": float("nan")}), "non-finite number"),
]


@pytest.mark.parametrize("build,message", CONFIG_CASES)
def test_bad_config_values_are_one_line_naming_the_field(build, message):
    with pytest.raises(StreamT1Error, match=message) as info:
        build()
    assert "\n" not in str(info.value)
    assert not Path("never-written.json").exists()


ENGINE_JSON_CASES = [
    (dict(colour="red"), r"unknown keys \['colour'\]"),
    ({"stream.window": 9}, r"'stream': unknown stream config keys: \['window'\]"),
    ({"sampler.shift": "five"}, "SamplerConfig.shift must be a number"),
    ({"model.num_layers": "3"}, "WanConfig.num_layers must be an integer"),
    ({"fps": 0}, "'fps' must be a positive integer"),
    ({"stream": [1, 2]}, "'stream' must be a JSON object"),
]


@pytest.mark.parametrize("changes,message", ENGINE_JSON_CASES)
def test_bad_engine_json_is_one_line(tmp_path, changes, message):
    with pytest.raises(StreamT1Error, match=message) as info:
        StreamT1Engine.from_pretrained(str(engine_dir(tmp_path, **changes)), device="cpu")
    assert "\n" not in str(info.value)


CLI_CASES = [  # argv after "generate PROMPT -o OUT", expected exit code, a fragment of the one stderr line
    (["--short-threshold", "nan", "--search", "stream_t1"], 2, "short_threshold must be a finite number"),
    (["--long-threshold", "inf"], 2, "long_threshold must be a finite number"),
    (["--fps", "0"], 2, "--fps: must be a positive integer"),
    (["--fps", "-5"], 2, "--fps: must be a positive integer"),
    (["--threads", "0"], 2, "--threads: must be a positive integer"),
    (["--memory-limit", "lots"], 2, "is not a positive size"),
    (["--beam-size", "0", "--search", "stream_t1"], 2, "beam_size must be >= 1"),
    (["--model", "{empty}"], 2, "is empty"),
    (["--model", "{not_a_model}"], 2, "is not a model directory"),
    (["--prompt-bytes"], 2, "prompt is not valid UTF-8 text"),
]


@pytest.mark.parametrize("extra,code,message", CLI_CASES)
def test_bad_cli_input_is_refused_up_front(tmp_path, capsys, no_generation, extra, code, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    prompt = PROMPT
    if extra == ["--prompt-bytes"]:  # how Python hands over a non-UTF-8 argv: surrogate escapes
        prompt, extra = b"a red \xff circle".decode("utf-8", "surrogateescape"), []
    extra = [a.format(empty=tmp_path / "empty", not_a_model=tmp_path / "not_a_model") for a in extra]
    argv = ["generate", prompt, "-o", str(tmp_path / "x.mp4"), *(["--model", "random-tiny"]
                                                                 if "--model" not in extra else []), *extra]
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        got = exc.code
    assert got == code
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1]
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.json").exists()


def test_non_utf8_prompt_through_a_real_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "streamt1_engine.cli", "generate", b"a red \xff circle",
                           "-o", str(tmp_path / "x.mp4"), "--model", "random-tiny"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("error: prompt is not valid UTF-8 text")


@pytest.mark.parametrize("strategy,given,ignored", [
    ("none", ["--beam-size", "3", "--top-k", "3"], "--beam-size, --top-k"),
    ("best_of_n", ["--beam-size", "3", "--no-memory-sinking"], "--beam-size, --no-memory-sinking"),
    ("stream_t1", ["--num-candidates", "7"], "--num-candidates"),
])
def test_ignored_search_options_are_named_and_not_recorded(tmp_path, capsys, strategy, given, ignored):
    out = tmp_path / "x.mp4"
    assert main(["generate", PROMPT, "-o", str(out), "--model", "random-tiny", "--chunks", "2", "--no-progress",
                 "--search", strategy, *given]) == 0
    assert f"warning: --search {strategy} ignores {ignored}" in capsys.readouterr().err
    used = json.loads(out.with_suffix(".json").read_text())["search"]
    expected = SearchConfig(strategy=strategy)
    assert used["candidates_per_chunk"] == expected.first_chunk_candidates
    for name in expected.ignored_options:
        assert name not in used


def test_records_are_strict_json(engine, tmp_path):
    result = engine.generate(PROMPT, num_chunks=2, search=SearchConfig(beam_size=2, top_k=2))
    result.chunks[0].short_scores[0] = float("nan")
    with pytest.raises(StreamT1Error, match="non-finite number"):
        result.save_json(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- 7, 8. extras, threads

def test_threads_option_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--model", "random-tiny", "--chunks", "1",
                     "--no-progress", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert 1 <= default_threads() <= 8


def test_without_the_wan_extra_the_tiny_model_runs_and_wan_loaders_say_what_to_install(tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    code = f"""
import sys
sys.modules["diffusers"] = None
sys.modules["transformers"] = None
from streamt1_engine import StreamT1Engine, StreamT1Error
engine = StreamT1Engine.from_pretrained("tiny", device="cpu")
assert engine.generate("a red circle", num_chunks=1, search="stream_t1").frames.shape[0] == 3
try:
    StreamT1Engine.from_pretrained({str(tmp_path / "pipe")!r}, device="cpu")
except StreamT1Error as exc:
    print(exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = one_line(proc.stdout)
    assert "needs diffusers and transformers" in line and 'pip install "streamt1-engine[wan]"' in line


def test_dependency_floors_match_what_the_code_uses():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "diffusers" not in base and "transformers" not in base  # the embedded model needs neither
    wan = dict(re.match(r"([a-z-]+)>=([\d.]+)", d).groups() for d in project["optional-dependencies"]["wan"])
    version = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert version(wan["diffusers"]) >= (0, 35) and version(wan["transformers"]) >= (4, 56)
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    install = re.search(r'pip install -e "\.\[([a-z,-]+)\]" && python -m pytest -q', readme)
    assert install is not None and set(install.group(1).split(",")) >= {"test", "triton", "wan"}
    assert f'pip install -q -e ".[{install.group(1)}]"' in ci


def test_failure_at_a_later_chunk_keeps_the_final_chunks_before_it(tmp_path, capsys, monkeypatch):
    import streamt1_engine.engine as engine_module

    original = engine_module._to_stream_chunk

    def to_chunk(node):
        if node.index == 2:
            raise StreamT1Error("chunk 2 has non-finite latents (NaN or infinity)")
        return original(node)

    monkeypatch.setattr(engine_module, "_to_stream_chunk", to_chunk)
    out = tmp_path / "x.mp4"
    assert main(["generate", PROMPT, "-o", str(out), "--model", "random-tiny", "--chunks", "4", "--no-progress"]) == 2
    assert "kept the 2 final chunks before it" in one_line(capsys.readouterr().err)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["status"] == "failed" and "non-finite" in record["error"]
    assert read_video(out).shape[0] == record["num_frames"] == 6


def test_diffusers_config_with_a_string_for_an_int_names_the_file_and_key(tmp_path):
    from safetensors.torch import save_file

    from streamt1_engine.model.loading import load_dit

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                      "num_attention_heads": 2, "num_layers": "two"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(StreamT1Error, match=r"config.json: num_layers must be an integer") as e:
        load_dit(str(tmp_path))
    assert "\n" not in str(e.value)
