"""Every bench script runs end to end with --tiny and writes its result files; the reference baseline agrees
with the engine. Timings are not checked (tiny CPU numbers mean nothing)."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_outputs(out: Path, name: str):
    for ext in ("csv", "json", "md"):
        assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext} missing"
    with open(out / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((out / f"{name}.json").read_text())
    env = data["environment"]
    assert env["tiny"] is True and env["torch"] == torch.__version__ and "--tiny" in env["command"]
    assert "CPU smoke run" in (out / f"{name}.md").read_text() or env["device"].startswith("NVIDIA")
    return rows, data


def test_bench_chunk(tmp_path):
    rows = load("bench_chunk").main(["--tiny", "--dtype", "fp32", "--n", "1", "4", "--warmup", "0", "--repeat", "1",
                                     "--out", str(tmp_path)])
    csv_rows, data = read_outputs(tmp_path, "bench_chunk")
    assert [r["n"] for r in rows if r["mode"] == "eager"] == [1, 4] and len(csv_rows) == len(rows)
    eager = {r["n"]: r for r in rows if r["mode"] == "eager"}
    assert eager[4]["survivors"] == 2 and eager[4]["tflop_per_chunk"] > eager[1]["tflop_per_chunk"] > 0
    for row in rows:  # graphs rows exist only with CUDA, and must reproduce eager
        assert row["max_abs_diff_vs_first_mode"] <= 1e-4


def test_bench_e2e(tmp_path):
    rows = load("bench_e2e").main(["--tiny", "--seconds", "1", "--modes", "eager", "--out", str(tmp_path)])
    read_outputs(tmp_path, "bench_e2e")
    by_search = {r["search"]: r for r in rows}
    assert set(by_search) == {"stream_t1", "none"}
    t1 = by_search["stream_t1"]
    assert t1["chunks"] == 1 and t1["candidates"] == 4 and t1["video_frames"] == 3
    assert t1["fps"] > 0 and t1["denoise_s"] > 0 and t1["rewards_s"] is not None
    assert by_search["none"]["rewards_s"] is None and by_search["none"]["candidates"] == 1


def test_bench_memory(tmp_path):
    reports = load("bench_memory").main(["--tiny", "--n", "1", "2", "--modes", "eager", "--chunks", "8",
                                         "--out", str(tmp_path)])
    read_outputs(tmp_path, "bench_memory_n")
    rows, data = read_outputs(tmp_path, "bench_memory_stream")
    assert [int(r["chunk"]) for r in rows] == list(range(1, 9))
    summary = data["summary"][0]
    assert summary["max_pages_in_use"] <= summary["pool_pages"]
    assert [r["n"] for r in reports[0].rows] == [1, 2]


def test_bench_reference_matches_the_engine(tmp_path):
    """The official loop (bench_reference's own implementation) and the engine's paper-exact search make the
    same decisions: seeds, survivors, scores, route flags and final pick, on a tiny causal Wan VAE."""
    torch.set_num_threads(1)  # the toy sizes gain nothing from threads
    rows, check = load("bench_reference").main(["--tiny", "--dtype", "fp32", "--chunks", "6", "--warmup", "0",
                                                "--require-match", "--out", str(tmp_path)])
    _, data = read_outputs(tmp_path, "bench_reference")
    assert check["all_match"] and check["max_frame_diff"] <= 1
    assert check["max_hybrid_scores_diff"] <= check["score_tolerance"] == 1e-4
    assert [r["run"] for r in rows] == ["engine", "reference"] and rows[0]["speedup_vs_reference"] > 0
    chunks = data["reference_chunks"]
    assert [c["candidate_seeds"] for c in chunks] == [c["candidate_seeds"] for c in data["engine_chunks"]]
    assert len(chunks) == 6 and chunks[0]["candidate_seeds"] == [42, 43, 44, 45]
    assert chunks[5]["attended_frames"][0][:3] == [0, 1, 2] and len(chunks[5]["attended_frames"][0]) >= 12


def test_reference_attention_equals_ours():
    """The baseline's attention (per-call clone, every cached key re-rotated in float64 as complex pairs)
    equals attention over keys rotated once with the engine's RoPE tables in its half-split layout."""
    import torch.nn.functional as F

    from streamt1_engine.model.rope import Rope3D, rotate_half_layout, to_half_layout

    ref = load("bench_reference")
    s = ref.UpstreamSettings()
    grid_h, grid_w, heads, d = 2, 3, 2, 16
    tokens = 3 * grid_h * grid_w
    table = ref.rope_table(d, 10000.0, 64, "cpu")
    gen = torch.Generator().manual_seed(0)
    cache = ref.LayerCache(s, grid_h * grid_w, heads, d, "cpu", torch.float32)
    ks, vs = [], []
    for c in range(3):  # chunks 0-2 fill the cache; chunk 2's output is checked
        q, k, v = (torch.randn(1, tokens, heads, d, generator=gen) for _ in range(3))
        out = ref.cached_attention(cache, q, k, v, ref.CallContext(3 * c, 3, grid_h, grid_w, {}, s, table))
        ks.append(k)
        vs.append(v)
    rope = Rope3D(d, max_frames=64)
    cos, sin = rope.token_tables(torch.arange(9)[None], grid_h, grid_w)
    k_rot = rotate_half_layout(to_half_layout(torch.cat(ks, 1)), cos[:, :, None], sin[:, :, None])
    q_rot = rotate_half_layout(to_half_layout(q), cos[:, -tokens:, None], sin[:, -tokens:, None])
    want = F.scaled_dot_product_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2),
                                          torch.cat(vs, 1).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out, F.scaled_dot_product_attention(  # guard: without RoPE it differs
        q.transpose(1, 2), torch.cat(ks, 1).transpose(1, 2), torch.cat(vs, 1).transpose(1, 2)).transpose(1, 2),
        atol=1e-3)


@pytest.mark.parametrize("seconds,chunks", [(5, 7), (30, 40)])
def test_video_length_to_chunks(seconds, chunks):
    assert load("common").chunks_for_seconds(seconds) == chunks



@pytest.mark.parametrize("name,sizes", [("bench_qk_norm_rope", ["--n", "1", "3"]),
                                        ("bench_sink_merge", ["--ops", "1", "3"])])
def test_kernel_op_benchmarks(tmp_path, name, sizes):
    """Per-op benchmarks time the fused kernel against its reference in one run, on identical results."""
    rows = load(name).main(["--tiny", "--dtype", "fp32", *sizes, "--out", str(tmp_path)])
    csv_rows, _ = read_outputs(tmp_path, name)
    assert len(csv_rows) == len(rows) == 4 and {r["backend"] for r in rows} == {"triton", "torch"}
    for row in rows:
        assert row["ms"] > 0 and row["gb_per_s"] > 0 and row["rel_err_vs_torch"] < 1e-6
        assert (row["x_vs_torch"] == 1.0) == (row["backend"] == "torch")


def _gpu_run(out: Path, *args: str, python: str = sys.executable, **env: str):
    import os
    import subprocess

    return subprocess.run(["bash", str(BENCH / "gpu_run.sh"), str(out), *args], capture_output=True, text=True,
                          timeout=400, env={**os.environ, "PYTHON": python, **env})


def test_gpu_run_dry_run_end_to_end(tmp_path):
    """The one GPU command, at tiny sizes on the CPU: every step runs and passes, the summary is printed, and
    OUT holds exactly the three files the GPU machine sends back."""
    import importlib.util
    import tarfile

    out = tmp_path / "run"
    res = _gpu_run(out, "--dry-run")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "run.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "dry run" in summary and summary.strip().splitlines()[-1] in res.stdout
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    has_triton = importlib.util.find_spec("triton") is not None
    for step in ("env", "chunk", "serving", "e2e", "gpu_tests", "reference"):
        assert f"| {step} | ok |" in summary, summary
    assert ("| vae | ok |" if has_diffusers else "| vae | skipped: no diffusers |") in summary
    assert ("| attention | ok |" if has_triton else "| attention | skipped (no triton) |") in summary
    assert not has_triton or ("## Paged attention kernel" in summary and "| n | mode |" in summary)
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
        plan = tar.extractfile("results/plan.txt").read().decode()
    # the plan: every step's full-size estimate fits its timeout, and the whole run 7 minutes on an H100
    steps = {}
    for line in plan.splitlines():
        name, timeout, body = line.split(" ", 2)
        steps[name] = (int(timeout), json.loads(body)["seconds"])
    assert set(steps) == {"env", "attention", "chunk", "serving", "e2e", "gpu_tests", "reference", "vae"} - (
        set() if has_triton else {"attention"})
    assert all(seconds is not None and seconds < timeout for timeout, seconds in steps.values()), steps
    assert sum(seconds for _, seconds in steps.values()) <= 7 * 60
    assert "## Plan: estimated H100 seconds" in summary and ": FITS" in summary
    assert not has_diffusers or steps["e2e"][1] > 60  # the VAE decodes are in the e2e estimate
    assert {"results/summary.md", "results/env.log", "results/gpu_tests.log", "results/chunk/bench_chunk.md",
            "results/serving/bench_serving.md",
            "results/e2e/bench_e2e.md", "results/reference/bench_reference.md"} <= names
    assert not has_triton or "results/attention/bench_attention.md" in names


def test_gpu_run_times_out_a_step_skips_what_no_longer_fits_and_goes_on(tmp_path):
    """A bench script that hangs is killed at the run's budget, the next step is skipped, the run still
    writes its summary and exits 1."""
    import time

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$1" in bench/*) sleep 60 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = _gpu_run(out, python=str(fake), GPU_RUN_STEPS="chunk e2e", GPU_RUN_BUDGET_S="8")
    assert time.monotonic() - t0 < 40
    assert res.returncode == 1, res.stdout + res.stderr
    summary = (out / "summary.md").read_text()
    assert "| install | FAILED |" in summary
    assert "| chunk | TIMEOUT after" in summary and "| e2e | skipped (budget spent) |" in summary


def test_a_step_killed_by_its_timeout_leaves_the_rows_it_measured(tmp_path):
    """Rows are written as they are measured: a bench that dies after its first row still shows that row
    in the summary, marked partial."""
    real = sys.executable
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
case "$1" in
    bench/run_plan.py) exec {real} "$@" ;;
    bench/bench_chunk.py)
        for last; do :; done
        mkdir -p "$last" && echo '{{"n": 1, "mode": "eager", "chunk_ms": 12.5}}' > "$last/bench_chunk.rows.jsonl"
        sleep 60 ;;
    *) exit 1 ;;
esac
""")
    fake.chmod(0o755)
    out = tmp_path / "run"
    res = _gpu_run(out, python=str(fake), GPU_RUN_STEPS="chunk", GPU_RUN_BUDGET_S="6")
    assert res.returncode == 1, res.stdout + res.stderr
    summary = (out / "summary.md").read_text()
    assert "| chunk | TIMEOUT after" in summary
    assert "## bench_chunk: partial (1 rows written before the step ended; no report)" in summary
    assert "| 1 | eager | 12.5 |" in summary


def test_live_rows_are_on_disk_before_the_report(tmp_path):
    rows = load("common").LiveRows(str(tmp_path), "bench_x")
    rows.append({"n": 1, "ms": 2.0})
    assert json.loads((tmp_path / "bench_x.rows.jsonl").read_text()) == {"n": 1, "ms": 2.0}
    rows.append({"n": 2, "ms": 3.0})
    assert len((tmp_path / "bench_x.rows.jsonl").read_text().splitlines()) == 2 and rows == [
        {"n": 1, "ms": 2.0}, {"n": 2, "ms": 3.0}]


def test_plan_fails_when_a_step_outgrows_its_timeout_or_the_run_its_limit(tmp_path, capsys):
    plan = load("run_plan")
    path = tmp_path / "plan.txt"
    path.write_text('chunk 100 {"seconds": 70, "pflop": 12, "vae_pflop": 0, "overhead_s": 39}\n'
                    'e2e 120 {"seconds": 90, "pflop": 10, "vae_pflop": 4, "overhead_s": 40}\n')
    assert plan.table(path, 420) == 0 and "Estimated total: 160 s of at most 420 s: FITS" in capsys.readouterr().out
    assert plan.table(path, 150) == 1 and "total 160 s > 150 s" in capsys.readouterr().out
    path.write_text('chunk 100 {"seconds": 130, "pflop": 32, "vae_pflop": 0, "overhead_s": 39}\n')
    assert plan.table(path, 420) == 1 and "chunk: 130 s >= its 100 s timeout" in capsys.readouterr().out


def test_estimates_count_the_work_the_arguments_ask_for():
    """The chunk step at its old sizes (3 warm-up + 10 timed) is about 32 PFLOP, what ran into its timeout."""
    chunk = load("bench_chunk")
    old = chunk.main(["--estimate", "--n", "1", "4", "--modes", "eager", "graphs"])
    new = chunk.main(["--estimate", "--n", "1", "4", "--modes", "eager", "graphs", "--warmup", "1", "--repeat", "3"])
    assert 28 < old["pflop"] < 34 and new["pflop"] < old["pflop"] / 2 and new["seconds"] < 100 < old["seconds"]
    e2e = load("bench_e2e")
    light = e2e.main(["--estimate", "--seconds", "5", "--vae", "light"])
    wan = e2e.main(["--estimate", "--seconds", "5", "--vae", "wan-random"])
    assert light["vae_pflop"] == 0 < wan["vae_pflop"] and light["pflop"] == wan["pflop"]


def test_gpu_run_rejects_bad_arguments(tmp_path):
    res = _gpu_run(tmp_path / "run", "--fast")
    assert res.returncode == 2 and "usage: bench/gpu_run.sh OUT [--dry-run]" in res.stderr
    res = _gpu_run(tmp_path / "run", python="false", GPU_RUN_STEPS="bogus")
    assert res.returncode == 2 and "unknown step: bogus" in res.stdout + res.stderr


def test_bench_serving(tmp_path):
    rows = load("bench_serving").main(["--tiny", "--streams", "1", "2", "--chunks", "2", "--repeat", "1",
                                       "--out", str(tmp_path)])
    csv_rows, data = read_outputs(tmp_path, "bench_serving")
    assert len(csv_rows) == len(rows) == 4
    assert {(r["search"], r["streams"]) for r in rows} == {(s, n) for s in ("stream_t1", "none") for n in (1, 2)}
    for row in rows:  # batched and sequential runs of the same requests give the same videos in fp32
        assert row["identical"] is True and row["video_frames"] == row["streams"] * 6
        assert row["batched_fps"] > 0 and row["sequential_fps"] > 0 and row["ratio"] > 0
        assert row["batched_chunk_p99_s"] >= row["batched_chunk_p50_s"] > 0
