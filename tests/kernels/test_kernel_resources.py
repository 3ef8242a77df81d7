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
    # The attention kernels run their matmuls on Hopper's asynchronous tensor-core instructions.
    attention = ("paged_attention", "paged_attention_rope")
    assert all(r["matrix_ops"] == "wgmma" for r in rows if r["kernel"] in attention)
    assert all(r["matrix_ops"] == "-" for r in rows if r["kernel"] not in attention)
    # A cached key costs what one of the chunk's own keys costs (target: within 10%); the previous kernel,
    # which rotates every cached key in its page loop, issues far more per key tile.
    for row in rows:
        if row["kernel"] == "paged_attention":
            assert 0.9 <= row["page_vs_chunk"] <= 1.1, row
        elif row["kernel"] == "paged_attention_rope":
            assert row["page_vs_chunk"] > 1.5, row


def test_spilling_and_oversized_configs_are_reported():
    res = run_check("--kernels", "paged_attention", "--config", "128x64/4/2", "--config", "128x128/8/4",
                    "--require-fit")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "2 config(s) do not fit sm_90" in res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("paged_attention ")]
    assert len(lines) == 2 and all("fits=False" in line for line in lines)
    assert "spill_bytes=0" not in lines[0]  # 4 warps: a 128-row fp32 accumulator and scores in 128 threads
    shared = float(lines[1].split("shared_kib=")[1].split(",")[0])
    assert shared > 227  # four stages of 128-key tiles exceed one block's shared memory


def test_sass_loop_counter_on_a_listing():
    """The loop finder takes innermost backward branches only and counts label-to-branch inclusive."""
    sys.path.insert(0, str(SCRIPT.parent))
    interpret = os.environ.get("TRITON_INTERPRET")
    try:
        from kernel_resources import sass_loops  # its import drops TRITON_INTERPRET (it compiles real kernels)
    finally:
        sys.path.remove(str(SCRIPT.parent))
        if interpret is not None:  # kernels imported later in this process must still run interpreted
            os.environ["TRITON_INTERPRET"] = interpret

    listing = """
        /*0000*/ MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/ IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0020*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/ FADD R3, R3, R4 ;
        /*0040*/ @P0 BRA `(.L_x_1) ;
        /*0050*/ @P1 BRA `(.L_x_0) ;
.L_x_2:
        /*0060*/ FMUL R5, R5, R6 ;
        /*0070*/ @P2 BRA `(.L_x_2) ;
.L_x_3:
        /*0080*/ BRA `(.L_x_3);
"""
    loops = sass_loops(listing)
    # the outer loop and the self-branch are not counted
    assert [(x["start"], x["instructions"], x["mma"]) for x in loops] == [(2, 3, 1), (6, 2, 0)]


def test_bad_config_is_a_usage_error():
    res = run_check("--config", "128x64")
    assert res.returncode == 2 and "BLOCK_MxBLOCK_N/num_warps/num_stages" in res.stderr
