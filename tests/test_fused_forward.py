"""The whole tiny DiT with its elementwise glue fused (Triton, in the interpreter on CPU) gives the output of
the plain-PyTorch path, with the attention held fixed so that only the glue differs."""
import pytest
import torch

import streamt1_engine.kernels.residual_norm as residual_norm_pkg
import streamt1_engine.model.wan as wan
from helpers import BeamPages, make_cache, text_context, tiny_model
from streamt1_engine.config import StreamConfig
from streamt1_engine.model.masks import block_causal_mask
from streamt1_engine.model.wan import ChunkAttention

pytest.importorskip("triton")

# fp32: the fused kernels reduce in another order than torch (LayerNorm, RMS) and may contract x + y * g into
# an FMA; over 2 blocks the outputs differ by < 1e-6 (seen 7e-7). fp16 / bf16: a rounding of x' or h may
# flip by one ulp, seen up to 2e-2 in bf16 (one ulp at |out| ~ 2.3). Triton's interpreter rounds float32 to
# bf16 toward zero (a GPU rounds to nearest), so on a CPU bf16 is checked element-wise only.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture
def fused_glue(monkeypatch):
    """Force the fused glue whatever the attention backend, and count the fused launches."""
    calls = []
    impl = residual_norm_pkg._triton_impl()

    def counted(*args, **kwargs):
        calls.append(kwargs.get("norm"))
        return impl(*args, **kwargs)

    monkeypatch.setattr(residual_norm_pkg, "_triton_impl", lambda: counted)

    def forward(model, *args):
        with monkeypatch.context() as m:
            m.setattr(wan, "glue_backend", lambda attn: "triton")
            return model(*args)
    return forward, calls


def cached_inputs(model, gen, n=2):
    stream = StreamConfig.tiny(latent_height=4, latent_width=6)
    cache = make_cache(model, stream)
    for pool in (cache.pool.k, cache.pool.v):
        pool.normal_(generator=gen)
    beam = BeamPages(sink=[cache.alloc()], window=[cache.alloc(), cache.alloc()])
    for page, frame in zip(beam.sink + beam.window, (0, 6, 9)):
        cache.frame_pos[page] = frame
        cache.pool.page_frame_pos[page] = frame
    table, counts = cache.page_table([beam] * n)
    attn = ChunkAttention(cache.pool, table, counts, torch.full((n,), 12), backend="torch")
    x = torch.randn(n, 4, 3, 4, 6, generator=gen)
    return x, attn


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fused_glue_matches_unfused_over_the_paged_cache(fused_glue, dtype):
    forward, calls = fused_glue
    gen = torch.Generator().manual_seed(0)
    model = tiny_model(seed=2)
    x, attn = cached_inputs(model, gen)
    text32 = text_context(model)
    t = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        reference = model(x, t, text32, attn)  # float32, unfused
        model = model.to(dtype)
        attn.pool.k, attn.pool.v = attn.pool.k.to(dtype), attn.pool.v.to(dtype)
        text = text_context(model)
        want = model(x, t, text, attn)
        got = forward(model, x, t, text, attn)
    layers = model.config.num_layers
    assert calls.count("layer") == 3 * layers + 1 and calls.count("rms") == layers  # the fused path ran
    assert got.dtype == want.dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    if dtype != torch.bfloat16:  # both paths round once per output: equally far from float32 (seen 0.99-1.02)
        assert rel_err(got, reference) <= 1.1 * rel_err(want, reference) + 1e-6


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_fused_glue_matches_unfused_with_per_frame_timesteps(fused_glue, cross_attn_norm):
    """Teacher-forcing shape: dense block-causal attention, a timestep per frame (per-token modulation)."""
    forward, calls = fused_glue
    gen = torch.Generator().manual_seed(1)
    model = tiny_model(seed=3, cross_attn_norm=cross_attn_norm)
    x = torch.randn(2, 4, 6, 4, 6, generator=gen)
    t = torch.tensor([[900.0, 900.0, 900.0, 100.0, 100.0, 100.0], [0.0, 0.0, 0.0, 500.0, 500.0, 500.0]])
    mask = block_causal_mask(6, 3, 6)
    attn = ChunkAttention.dense(2, "cpu", mask=mask)
    text = text_context(model, batch=2)
    with torch.no_grad():
        want = model(x, t, text, attn)
        got = forward(model, x, t, text, attn)
    assert calls.count("none") == model.config.num_layers * (1 if cross_attn_norm else 2)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_glue_backend_follows_the_attention_kernel():
    pool_attn = ChunkAttention.dense(1, "cpu")
    assert wan.glue_backend(pool_attn) == "torch"
    for backend, glue in (("triton", "triton"), ("triton_rope", "triton"), ("sdpa", "torch"), ("torch", "torch")):
        pool_attn.backend = backend
        assert wan.glue_backend(pool_attn) == glue


def test_cpu_gemm_gelu_is_not_tanh_so_the_ffn_keeps_a_separate_gelu():
    """PyTorch's CPU ``_addmm_activation`` applies the erf GELU; the probe sees it, and the fused FFN then
    computes Wan's tanh GELU apart, equal to the unfused FFN."""
    assert wan.gemm_gelu_is_tanh(torch.device("cpu")) is False
    block = tiny_model(seed=1).blocks[0]
    h = torch.randn(2, 5, block.ffn[0].in_features)
    with torch.no_grad():
        torch.testing.assert_close(block._ffn_gelu_epilogue(h), block.ffn(h))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_glue_matches_unfused_at_wan_1_3b_width(fused_glue):
    """Two blocks at 1.3B width in bf16 on a 390-token frame: cuBLASLt's GELU epilogue and the Triton glue
    against the plain path (dense attention, so only the glue differs)."""
    from streamt1_engine.config import WanConfig
    from streamt1_engine.model.wan import CausalWanDiT

    forward, calls = fused_glue
    assert wan.gemm_gelu_is_tanh(torch.device("cuda")) is True
    torch.manual_seed(0)
    model = CausalWanDiT(WanConfig(num_layers=2)).to("cuda").eval()
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 3, 30, 52, device="cuda")
    t = torch.tensor([900.0, 300.0], device="cuda")
    states = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda")
    attn = ChunkAttention.dense(2, "cuda")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            reference = model(x, t, model.encode_text(states), attn)  # float32, unfused
            model = model.to(torch.bfloat16)
            text = model.encode_text(states)
            want = model(x, t, text, attn)
            got = forward(model, x, t, text, attn)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert calls and torch.isfinite(got).all()
    # Error against float32 bounded by the unfused bf16 path's (bf16 roundings elsewhere, not a bug).
    assert rel_err(got, reference) <= 1.25 * rel_err(want, reference) + 1e-4
    assert rel_err(got, want) < 2e-2
