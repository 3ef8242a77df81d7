"""Fused q/k norm + RoPE against the reference."""
import pytest
import torch

from kernel_testutil import DEVICE, HAS_CUDA, TOL
from streamt1_engine.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_naive


def make_inputs(n, length, h, d, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    # q and k as slices of one fused projection output: strided rows.
    qkv = torch.randn(n, length, 3 * h * d, generator=gen).to(device, dtype)
    q, k = qkv[..., : h * d], qkv[..., h * d: 2 * h * d]
    qw = (torch.rand(h * d, generator=gen) + 0.5).to(device, dtype)
    kw = (torch.rand(h * d, generator=gen) + 0.5).to(device, dtype)
    ang = torch.rand(n, length, d // 2, generator=gen, dtype=torch.float64) * 6.3
    return q, k, qw, kw, 1e-6, h, ang.cos().float().to(device), ang.sin().float().to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,length,h,d", [(1, 5, 2, 16), (3, 7, 3, 32), (2, 4, 12, 128)])
def test_triton_matches_naive(n, length, h, d, dtype):
    args = make_inputs(n, length, h, d, dtype)
    expected = qk_norm_rope_naive(*args)
    got = qk_norm_rope(*args, backend="triton")
    for e, g in zip(expected, got):
        assert g.shape == (n, length, h, d) and g.dtype == dtype
        torch.testing.assert_close(g.float(), e.float(), **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_realistic_bf16():
    args = make_inputs(2, 4680, 12, 128, torch.bfloat16)
    for e, g in zip(qk_norm_rope_naive(*args), qk_norm_rope(*args, backend="triton")):
        torch.testing.assert_close(g.float(), e.float(), **TOL[torch.bfloat16])


def test_dispatch():
    args = make_inputs(1, 3, 2, 16, torch.float32)
    for e, g in zip(qk_norm_rope_naive(*args), qk_norm_rope(*args)):
        assert torch.equal(e, g)
    with pytest.raises(ValueError, match="unknown backend"):
        qk_norm_rope(*args, backend="cuda")
