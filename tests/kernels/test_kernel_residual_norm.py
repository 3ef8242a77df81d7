"""Fused residual + norm + adaLN modulation against the reference, every variant the Wan block uses."""
import zlib

import pytest
import torch

from kernel_testutil import DEVICE, HAS_CUDA, assert_close
from streamt1_engine.kernels.residual_norm import residual_norm, residual_norm_naive

pytest.importorskip("triton", reason="the fused kernel needs the triton extra")
from streamt1_engine.kernels.residual_norm import fused as fused_module  # noqa: E402

DTYPES = [torch.float32, torch.float16]


class _PoisonedTorch:
    """``torch`` for the fused module, with ``torch.empty`` filled with NaN: an unwritten element shows."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(shape, dtype=None, device=None):
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(fused_module, "torch", _PoisonedTorch())


def rand(gen, *shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen) * scale + offset).to(DEVICE, dtype)


def block_terms(gen, n, length, d, dtype, per_token):
    """A Wan block's modulation: learned rows [1, 6, D] (model dtype) + timestep rows [N, 1 or L, 6, D]."""
    rows = rand(gen, 1, 6, d, dtype=dtype, scale=0.2)
    e = rand(gen, n, length if per_token else 1, 6, d, scale=0.3)
    return [(rows[:, i], e[:, :, i]) for i in range(6)]


# (y, gate, norm, affine, modulated): the five uses in a Wan block plus the cross-attention q norm.
VARIANTS = {
    "norm1_modulate": (False, False, "layer", False, True),
    "gated_residual_norm3": (True, True, "layer", True, False),
    "residual_norm2_modulate": (True, False, "layer", False, True),
    "gated_residual_only": (True, True, "none", False, False),
    "rms_weight": (False, False, "rms", True, False),
    "residual_rms": (True, False, "rms", True, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n,length,d,per_token", [(1, 5, 48, False), (3, 7, 100, True), (2, 4, 64, False)])
def test_triton_matches_naive(variant, n, length, d, per_token, dtype):
    has_y, has_gate, norm, affine, modulated = VARIANTS[variant]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{variant}{n}{length}{d}".encode()))
    # x as a token-strided view (every other row of a larger buffer), as the patch embedding's output is.
    x = rand(gen, n, 2 * length, d, dtype=dtype, offset=0.5)[:, ::2]
    y = rand(gen, n, length, d, dtype=dtype) if has_y else None
    shift, scale, gate, *_ = block_terms(gen, n, length, d, dtype, per_token)
    kwargs = dict(norm=norm, eps=1e-6)
    if affine:
        kwargs["weight"] = rand(gen, d, dtype=dtype, scale=0.3, offset=1.0)
        if norm == "layer":
            kwargs["bias"] = rand(gen, d, dtype=dtype, scale=0.3)
    if modulated:
        kwargs.update(scale=scale, shift=shift)
    g = gate if has_gate else None
    want_x, want_h = residual_norm_naive(x, y, g, **kwargs)
    got_x, got_h = residual_norm(x, y, g, backend="triton", **kwargs)
    assert got_x.dtype == got_h.dtype == dtype and got_h.shape == (n, length, d)
    assert_close(got_x, want_x, dtype)
    assert_close(got_h, want_h, dtype)
    if not has_y:
        assert got_x is x  # the stream is passed through, not copied
    if norm == "none":
        assert got_h is got_x


def test_single_tensor_terms_and_dispatch():
    gen = torch.Generator().manual_seed(3)
    x, y = rand(gen, 2, 3, 40), rand(gen, 2, 3, 40)
    gate, scale, shift = rand(gen, 2, 1, 40), rand(gen, 2, 3, 40), rand(gen, 1, 1, 40)
    want = residual_norm_naive(x, y, gate, scale=scale, shift=shift)
    got = residual_norm(x, y, gate, scale=scale, shift=shift, backend="triton")
    for w, g in zip(want, got):
        assert_close(g, w, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(want, residual_norm(x, y, gate, scale=scale, shift=shift)))
    with pytest.raises(ValueError, match="unknown backend"):
        residual_norm(x, backend="cuda")


def test_bad_inputs():
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="norm must be"):
        residual_norm(x, norm="group", backend="triton")
    with pytest.raises(ValueError, match="norm must be"):
        residual_norm_naive(x, norm="group")
    with pytest.raises(ValueError, match="contiguous channels"):
        residual_norm(x.transpose(1, 2), backend="triton")
    with pytest.raises(ValueError, match="y must"):
        residual_norm(x, torch.randn(2, 4, 8, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="weight only"):
        residual_norm(x, norm="rms", scale=torch.zeros(8, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="broadcast"):
        residual_norm(x, scale=torch.zeros(4, 8, device=DEVICE), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_realistic_bf16():
    gen = torch.Generator().manual_seed(0)
    n, length, d = 2, 4680, 1536
    x, y = rand(gen, n, length, d, dtype=torch.bfloat16), rand(gen, n, length, d, dtype=torch.bfloat16)
    shift, scale, gate, *_ = block_terms(gen, n, length, d, torch.bfloat16, False)
    want = residual_norm_naive(x, y, gate, scale=scale, shift=shift)
    got = residual_norm(x, y, gate, scale=scale, shift=shift, backend="triton")
    for w, g in zip(want, got):
        assert_close(g, w, torch.bfloat16)
