"""Quality bench v2: its held-out metrics on videos whose truth is known, its confidence intervals, the
held-out prompts, a tiny end-to-end run, and the memory-routing sweep."""
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

from streamt1_engine.tiny.procedural import HELD_OUT_PROMPTS, ProceduralVideos, is_held_out, make_sample

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import bench_quality_metrics as qm  # noqa: E402


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _truth(n=12, frames=24, **kw):
    return [make_sample(21, i, num_frames=frames, **kw) for i in range(n)]


def test_metrics_on_the_procedural_truth_and_an_injected_seam():
    clips = _truth(two_object_prob=0.0)
    seams = [qm.seam_ratio(c.frames, c.prompt, 3) for c in clips]
    seamed = [qm.seam_ratio(qm.inject_seam(c.frames, 3), c.prompt, 3) for c in clips]
    assert 0.85 < sum(seams) / len(seams) < 1.15
    assert min(b / a for a, b in zip(seams, seamed)) > 1.3  # every clip's seams are flagged
    assert all(qm.spurious_blobs(c.frames, c.prompt, 3) == 0 for c in clips)
    speeds = [qm.signed_speed(c.frames, c.prompt, 3) for c in clips]
    assert min(speeds) > 1.0  # the truth moves 1.25-1.75 px/frame the named way before any bounce
    assert max(qm.signed_speed(c.frames[:5].flip(0), c.prompt, 3) for c in clips) < -1.0
    assert qm.signed_speed(clips[0].frames[:1].expand(5, -1, -1, -1), clips[0].prompt, 3) == 0.0


def test_square_fill_and_spurious_blobs_tell_shapes_and_specks_apart():
    squares = [c for c in _truth(40, frames=6, two_object_prob=0.0) if c.scene.objects[0].shape == "square"][:4]
    circles = [c for c in _truth(40, frames=6, two_object_prob=0.0) if c.scene.objects[0].shape == "circle"][:4]
    assert squares and circles
    assert min(qm.square_fill(c.frames, c.prompt, 3) for c in squares) > 0.9
    as_square = [qm.square_fill(c.frames, c.prompt.replace("circle", "square"), 3) for c in circles]
    assert max(as_square) < 0.85
    assert math.isnan(qm.square_fill(circles[0].frames, circles[0].prompt, 3))  # no square named
    speck = squares[0].frames.clone()
    speck[:, :, 0:3, 0:3] = 1.0 - speck[:, :, 0:3, 0:3]  # a 3x3 blob of another colour in every frame
    speck[:, :, 28:31, 28:31] = 1.0 - speck[:, :, 28:31, 28:31]
    assert qm.spurious_blobs(speck, squares[0].prompt, 3) >= 1.0


def _synthetic_deltas(prompts, seeds=4, seed=0):
    rng = random.Random(seed)
    out = {}
    for p in range(prompts):
        effect = rng.gauss(0.1, 0.2)  # prompts differ much more than seeds of one prompt
        out[f"p{p}"] = [effect + rng.gauss(0, 0.02) for _ in range(seeds)]
    return out


def test_bootstrap_intervals_come_out_of_the_data():
    full = _synthetic_deltas(24)
    half = dict(list(full.items())[:12])
    mean, low, high = qm.paired_bootstrap(full)
    assert low < mean < high
    _, hlow, hhigh = qm.paired_bootstrap(half)
    assert (hhigh - hlow) > 1.15 * (high - low)  # fewer prompts, wider interval
    # clustering by prompt: pretending the 4 seeds of a prompt are independent prompts narrows it wrongly
    flat = {f"{k}-{i}": [v] for k, vs in full.items() for i, v in enumerate(vs)}
    _, flow, fhigh = qm.paired_bootstrap(flat)
    assert (fhigh - flow) < 0.8 * (high - low)
    assert qm.paired_bootstrap({"a": [0.1] * 4, "b": [0.1] * 4})[1:] == (pytest.approx(0.1), pytest.approx(0.1))
    assert all(math.isnan(v) for v in qm.paired_bootstrap({"a": [0.2, 0.3]})[1:])  # one prompt: no interval
    assert all(math.isnan(v) for v in qm.paired_bootstrap({"a": [math.nan]}))


def test_held_out_prompts_never_reach_training():
    assert len(HELD_OUT_PROMPTS) == 12
    held = ProceduralVideos(seed=0, num_frames=1, hold_out=True)  # one frame: only the scenes matter here
    free = ProceduralVideos(seed=0, num_frames=1)
    assert not any(is_held_out(held[i].scene) for i in range(1500))
    assert any(is_held_out(free[i].scene) for i in range(1500))  # without hold_out they do occur
    assert [held[i].prompt for i in range(50) if not is_held_out(free[i].scene)] == \
        [free[i].prompt for i in range(50) if not is_held_out(free[i].scene)]  # other samples unchanged
    bench = _load("bench_quality")
    bench.check_disjoint(bench.PROMPTS, bench.SEEDS)
    with pytest.raises(AssertionError, match="v1"):
        bench.check_disjoint(bench.V1_PROMPTS[:1], bench.SEEDS)
    with pytest.raises(AssertionError, match="not held out"):
        bench.check_disjoint(["a red circle moving up on a black background"], bench.SEEDS)
    assert bench.V1_PROMPTS == _load("bench_quality_v1").PROMPTS


def test_tiny_bench_run_writes_results_whose_intervals_are_its_data(tmp_path):
    bench = _load("bench_quality")
    out = bench.main(["--tiny", "--methods", "none", "stream_t1", "stream_t1 - reward pruning",
                      "--out-dir", str(tmp_path), "--name", "q", "--resamples", "300"])
    results, summary = out["results"], out["summary"]
    assert set(results) == {"none", "stream_t1", "stream_t1 - reward pruning"}
    assert all(len(r["records"]) == 4 for r in results.values())  # 2 prompts x 2 seeds
    for pair, per_metric in summary["deltas"].items():
        a, b = pair.split(" vs ")
        by_prompt = {}
        for ra, rb in zip(results[a]["records"], results[b]["records"]):
            by_prompt.setdefault(ra["prompt"], []).append(ra["composite"] - rb["composite"])
        assert per_metric["composite"] == pytest.approx(qm.paired_bootstrap(by_prompt, resamples=300, seed=0))
    assert "stream_t1 vs stream_t1 - reward pruning" in summary["deltas"]
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["summary"]["means"]["none"]["seam_ratio"] == pytest.approx(summary["means"]["none"]["seam_ratio"])
    assert "| stream_t1 |" in (tmp_path / "q.md").read_text()
    assert list((tmp_path / "q-strips").glob("*.png"))


def test_sweep_counts_routes_and_compares_with_sinking_off():
    sweep = _load("bench_quality_sweep")
    # a long threshold of -1 makes every "short high" survivor APPEND, a short threshold of +1 none
    rows = sweep.main(["--tiny", "--chunks", "4", "--short", "-1", "1", "--long", "-1", "--alpha", "0.9",
                       "--resamples", "50"])
    always, never = rows
    assert always["append_share"] == 1.0 and always["ema_share"] == 0.0
    assert never["append_share"] == 0.0 and never["ema_share"] == 0.0
    for metric, (mean, _, _) in never["deltas"].items():  # never routed: the same video as sinking off
        assert mean == pytest.approx(0.0, abs=1e-9) or math.isnan(mean), metric


def test_sweep_takes_later_prompts_and_the_motion_reward(monkeypatch):
    sweep = _load("bench_quality_sweep")
    bench = sweep.bq
    seen = []
    real = bench.score_videos
    monkeypatch.setattr(bench, "score_videos", lambda model, jobs, *a: seen.extend(jobs) or real(model, jobs, *a))
    rows = sweep.main(["--tiny", "--chunks", "3", "--first-prompt", "3", "--long", "0.2", "--long-reward",
                       "video_motion", "--resamples", "20"])
    assert [r["prompt"] for r in rows[0]["records"]] == [bench.PROMPTS[3]]
    assert {job[1] for job in seen} == {"video_motion"} and {job[2] for job in seen} == {bench.PROMPTS[3]}
    with pytest.raises(SystemExit):
        sweep.main(["--tiny", "--first-prompt", "12"])


def test_worker_processes_give_the_records_of_one_process():
    import torch

    from streamt1_engine.search.config import SearchConfig

    import bench_quality as bench  # imported by name: worker processes find its functions by that name

    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2)
    jobs = [(search, "video", prompt, 1000, 2, False) for prompt in bench.PROMPTS[:2]]
    jobs.append((SearchConfig(strategy="none"), "video_motion", bench.PROMPTS[0], 1001, 2, True))
    alone = bench.score_videos("tiny", jobs)
    spread = bench.score_videos("tiny", jobs, workers=2)
    assert json.dumps([s["record"] for s in alone]) == json.dumps([s["record"] for s in spread])
    assert alone[0]["frames"] is None and torch.equal(alone[2]["frames"], spread[2]["frames"])
    assert alone[0]["record"]["prompt"] == bench.PROMPTS[0] and alone[1]["record"]["prompt"] == bench.PROMPTS[1]


def test_the_training_prompt_set_is_of_the_training_distribution_and_the_sampler_shift_applies(tmp_path):
    from streamt1_engine.tiny.procedural import parse_prompt

    bench = _load("bench_quality")
    prompts = bench.training_prompts(30)
    assert prompts == bench.training_prompts(30) and len(set(prompts)) == 30
    assert not set(prompts) & (set(bench.PROMPTS) | set(bench.V1_PROMPTS))
    for prompt in prompts:
        spec = parse_prompt(prompt)
        assert len(spec.objects) == 1 and spec.objects[0][0] != spec.background
        assert not bench.is_held_out_prompt(prompt)
    assert {parse_prompt(p).objects[0][1] for p in prompts} == {"circle", "square", "triangle"}
    own, shifted = bench.load_engine("tiny"), bench.load_engine("tiny", sampler_shift=3.0)
    assert shifted.config.sampler.shift == 3.0
    assert list(own.schedule.timesteps) != list(shifted.schedule.timesteps)
    out = bench.main(["--tiny", "--prompt-set", "training", "--sampler-shift", "3", "--methods", "none",
                      "--out-dir", str(tmp_path), "--name", "v", "--resamples", "50"])
    assert [r["prompt"] for r in out["results"]["none"]["records"]] == prompts[:2]
    assert {r["seed"] for r in out["results"]["none"]["records"]} == {bench.TRAINING_SEEDS[0]}
    text = (tmp_path / "v.md").read_text()
    assert "training prompt set" in text and "sampler shift 3" in text
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--sampler-shift", "0"])
