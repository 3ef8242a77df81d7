"""The GPU configs of every kernel compile for sm_90 and fit an H100, checked without a GPU.

The check runs in a subprocess: it must import the kernels without interpreter mode, which this test
process has switched on.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "kernel_resources.py"


def run_check(*args: str, tmp_path=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = ["--out", str(tmp_path)] if tmp_path else []
    res = subprocess.run([sys.executable, str(SCRIPT), *args, *out], capture_output=True, text=True, env=env,
                         timeout=600)
    if res.returncode == 2 and "cannot compile ahead of time" in res.stderr:
        pytest.skip(res.stderr.strip())
    return res


def test_every_kernel_config_fits_sm90(tmp_path):
    import json

    res = run_check("--arch", "90", "--require-fit", tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads((tmp_path / "kernel_resources.json").read_text())["rows"]
    from streamt1_engine.kernels.paged_attention.fused import AUTOTUNE_CONFIGS

    kernels = [r["kernel"] for r in rows]
    assert kernels.count("paged_attention") == len(AUTOTUNE_CONFIGS) >= 4
    assert {"sink_merge", "qk_norm_rope"} <= set(kernels)
    for row in rows:
        assert row["fits"] and row["spill_bytes"] == 0 and 0 < row["registers"] <= 255, row
        assert row["shared_kib"] <= 227
    # The attention kernel runs its matmuls on Hopper's asynchronous tensor-core instructions.
    assert all(r["matrix_ops"] == "wgmma" for r in rows if r["kernel"] == "paged_attention")
    assert all(r["matrix_ops"] == "-" for r in rows if r["kernel"] != "paged_attention")


def test_spilling_and_oversized_configs_are_reported():
    res = run_check("--kernels", "paged_attention", "--config", "128x64/4/2", "--config", "128x128/8/4",
                    "--require-fit")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "2 config(s) do not fit sm_90" in res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("paged_attention ")]
    assert len(lines) == 2 and all("fits=False" in line for line in lines)
    assert "spill_bytes=0" not in lines[0]  # 4 warps: a 128 x 128 fp32 accumulator + rotation temporaries
    shared = float(lines[1].split("shared_kib=")[1].split(",")[0])
    assert shared > 227  # four stages of 128-key tiles exceed one block's shared memory


def test_bad_config_is_a_usage_error():
    res = run_check("--config", "128x64")
    assert res.returncode == 2 and "BLOCK_MxBLOCK_N/num_warps/num_stages" in res.stderr
