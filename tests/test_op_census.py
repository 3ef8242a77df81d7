"""The meta-device census counts what a forward really launches, and the fused forward meets the issue's
budget at Wan2.1-1.3B shapes."""
import pytest
import torch

from streamt1_engine.config import StreamConfig, WanConfig
from streamt1_engine.model import wan
from test_bench_smoke import load

census_mod = load("op_census")
TINY = WanConfig.tiny(in_channels=16, out_channels=16)
STREAM = StreamConfig(latent_height=8, latent_width=8)


def census(fused, n=2, **kwargs):
    return census_mod.chunk_forward_census(TINY, STREAM, n, fused=fused, **kwargs)


def test_an_added_op_moves_the_count_by_one_launch_and_its_bytes(monkeypatch):
    before = census(fused=True)
    forward = wan.WanHead.forward

    def with_extra_op(self, x, e, glue="torch"):
        return forward(self, x * 2, e, glue)

    monkeypatch.setattr(wan.WanHead, "forward", with_extra_op)
    after = census(fused=True)
    n, tokens = 2, STREAM.chunk_frames * (STREAM.latent_height // 2) * (STREAM.latent_width // 2)
    x_bytes = n * tokens * TINY.dim * 2  # bf16 stream, read once and written once
    assert after.non_gemm_launches == before.non_gemm_launches + 1
    assert after.non_gemm_bytes == before.non_gemm_bytes + 2 * x_bytes
    assert after.total("gemm") == before.total("gemm")


@pytest.mark.parametrize("fused", [False, True])
def test_meta_census_equals_the_census_of_a_real_cpu_forward(fused):
    """Meta tensors take the same ops as real ones; the one difference the fused path allows is the FFN's
    GELU, which only a device whose GEMM epilogue computes Wan's tanh GELU folds into the GEMM."""
    meta = census(fused, dtype=torch.float32).by_op()
    cpu = census(fused, dtype=torch.float32, device="cpu").by_op()
    if fused:
        gelu = [r for r in cpu if r["op"] == "gelu"]
        assert len(gelu) == 1 and gelu[0]["launches"] == TINY.num_layers
        cpu = [r for r in cpu if r["op"] != "gelu"]
        meta_ops, cpu_ops = ({r["op"]: r["launches"] for r in rows} for rows in (meta, cpu))
        assert meta_ops["_addmm_activation"] == TINY.num_layers
        assert cpu_ops["addmm"] == meta_ops["addmm"] + TINY.num_layers
        meta = [r for r in meta if r["kind"] != "gemm"]
        cpu = [r for r in cpu if r["kind"] != "gemm"]
    assert meta == cpu


def test_fused_kernels_count_once_each_and_replace_the_glue():
    unfused, fused = census(fused=False), census(fused=True)
    ops = {r["op"]: r["launches"] for r in fused.by_op()}
    layers = TINY.num_layers
    assert ops["residual_norm"] == 5 * layers + 1 and ops["qk_norm_rope"] == layers
    assert ops["paged_attention"] == ops["scaled_dot_product_attention"] == layers
    assert "native_layer_norm" not in ops and "gelu" not in ops
    assert fused.total("cast") <= 3 < unfused.total("cast")
    assert fused.non_gemm_launches < unfused.non_gemm_launches / 3
    # Both paths multiply the same matrices.
    assert fused.total("gemm", what="flops") == pytest.approx(unfused.total("gemm", what="flops"))


def test_context_pass_counts_the_page_writes():
    plain, context = census(fused=True), census(fused=True, context_pass=True)
    ops = {r["op"]: r["launches"] for r in context.by_op()}
    assert ops["index_copy_"] == 2 * TINY.num_layers
    assert context.non_gemm_launches == plain.non_gemm_launches + 2 * TINY.num_layers


def test_fused_forward_meets_the_budget_at_wan_1_3b():
    """Issue target, one denoising forward at N = 1: <= 300 launches and <= 15 GB outside GEMM and attention."""
    full = census_mod.chunk_forward_census(WanConfig.wan_1_3b(), StreamConfig(), 1, fused=True).summary()
    assert full["other_launches"] <= 300 and full["other_gb"] <= 15
    assert full["gemm_tflop"] == pytest.approx(11.7, rel=0.01)


def test_cli_writes_its_report(tmp_path):
    rows = census_mod.main(["--tiny", "--n", "1", "--out", str(tmp_path)])
    assert [r["path"] for r in rows] == ["unfused", "fused"]
    text = (tmp_path / "op_census.md").read_text()
    assert "### N = 1, fused" in text and "residual_norm" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_census_is_close_to_the_kernels_the_profiler_sees():
    """On a GPU the same forward's CUDA kernels, counted by the profiler, are about what the census counts
    (a few ATen ops and GEMMs launch two kernels; the bound is loose on purpose, the ratio is printed)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.device("cuda"):
        torch.manual_seed(0)
        model = wan.CausalWanDiT(TINY).to(torch.bfloat16)
    model, args, _ = census_mod.chunk_forward_inputs(TINY, STREAM, 2, model=model, device="cuda")
    predicted = len(census(fused=True, device="cuda", model=model).launches)
    with torch.no_grad():
        model(*args)  # warm: autotuning, compilation
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(*args)
            torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    print(f"census {predicted} launches, profiler {kernels} CUDA kernels ({kernels / predicted:.2f}x)")
    assert 0.8 * predicted <= kernels <= 1.6 * predicted
