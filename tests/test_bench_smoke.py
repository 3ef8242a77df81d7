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
    rows, check = load("bench_reference").main(["--tiny", "--dtype", "fp32", "--chunks", "3", "--warmup", "0",
                                                "--require-match", "--out", str(tmp_path)])
    read_outputs(tmp_path, "bench_reference")
    assert check["all_match"] and check["max_frame_diff"] <= 1
    assert [r["run"] for r in rows] == ["engine", "reference"]


def test_reference_attention_equals_ours():
    """The baseline's per-call clone + float64 rotation computes the same attention as our kernels."""
    from streamt1_engine.kernels.paged_attention import paged_attention

    ref = load("bench_reference")
    gen = torch.Generator().manual_seed(0)
    n, h, d, grid_h, grid_w, frames = 2, 2, 32, 3, 4, 2
    tokens = frames * grid_h * grid_w
    q, kc, vc = (torch.randn(n, tokens, h, d, generator=gen) for _ in range(3))
    k_pool, v_pool = (torch.randn(5, tokens, h, d, generator=gen) for _ in range(2))
    table = torch.tensor([[0, 3, 1], [4, 2, -1]], dtype=torch.int32)
    counts = torch.tensor([3, 2], dtype=torch.int32)
    args = (q, kc, vc, k_pool, v_pool, table, counts)
    want = paged_attention(*args, backend="torch")
    got = ref.make_reference_attention()(*args)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.equal(k_pool, k_pool.roll(1, 0))  # guard: the pages differ, so a wrong page would show


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


def _suite(out: Path, *stages: str, python: str = sys.executable):
    import os
    import subprocess

    return subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(out), *stages], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": python})


def test_gpu_suite_rejects_unknown_stage(tmp_path):
    res = _suite(tmp_path / "run", "bogus")
    assert res.returncode == 2 and "unknown stage: bogus" in res.stderr


def test_gpu_suite_logs_a_failing_stage_and_goes_on(tmp_path):
    """A failing stage is logged with its exit status, later stages still run, and the suite exits 1."""
    import tarfile

    out = tmp_path / "run"
    res = _suite(out, "kernels", "pack", python="false")  # every python command fails at once
    assert res.returncode == 1, res.stdout + res.stderr
    log = (out / "attention.log").read_text()
    assert "bench/bench_attention.py --out" in log and "== attention: exit 1" in log
    assert "== sink_merge: exit 1" in (out / "sink_merge.log").read_text()
    with tarfile.open(str(out) + ".tar.gz") as tar:
        assert {"run/attention.log", "run/qk_norm_rope.log", "run/sink_merge.log"} <= set(tar.getnames())
