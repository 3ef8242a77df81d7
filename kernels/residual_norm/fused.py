"""Triton residual add + row norm + adaLN modulation in one pass, one program per token row.

Unfused, each step (casts to float32, gate, add, round, norm, ``1 + scale``, scale, shift, round) is its own
launch over the whole [N, L, D] stream; here a row is read once, kept in float32 registers, and written as
``x'`` and ``h``. The modulation pairs (block row + timestep row) are summed in registers too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import NORMS

_NORM_CODE = {"none": 0, "layer": 1, "rms": 2}


@triton.jit
def _term(A, B, n, l, offs, mask, s_an, s_al, s_ad, s_bn, s_bl, s_bd, PAIR: tl.constexpr):
    t = tl.load(A + n * s_an + l * s_al + offs * s_ad, mask=mask, other=0.0).to(tl.float32)
    if PAIR:
        t += tl.load(B + n * s_bn + l * s_bl + offs * s_bd, mask=mask, other=0.0).to(tl.float32)
    return t


@triton.jit
def _residual_norm_kernel(
    X, Y, XO, HO, W, BIAS, GA, GB, SA, SB, HA, HB,
    L, D, s_xn, s_xl, s_yn, s_yl, s_on, s_ol,
    s_gan, s_gal, s_gad, s_gbn, s_gbl, s_gbd,
    s_san, s_sal, s_sad, s_sbn, s_sbl, s_sbd,
    s_han, s_hal, s_had, s_hbn, s_hbl, s_hbd,
    eps,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, GATE_PAIR: tl.constexpr, NORM: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_PAIR: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SHIFT_PAIR: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    n = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    dtype = HO.dtype.element_ty
    x = tl.load(X + n * s_xn + l * s_xl + offs, mask=mask, other=0.0).to(tl.float32)
    o_row = n * s_on + l * s_ol
    if HAS_Y:
        y = tl.load(Y + n * s_yn + l * s_yl + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * _term(GA, GB, n, l, offs, mask, s_gan, s_gal, s_gad, s_gbn, s_gbl, s_gbd, GATE_PAIR)
        x_round = (x + y).to(dtype)
        tl.store(XO + o_row + offs, x_round, mask=mask)
        x = x_round.to(tl.float32)  # the norm sees the stream as stored
    if NORM == 1:
        mean = tl.sum(x, 0) / D
        xc = tl.where(mask, x - mean, 0.0)
        h = xc / tl.sqrt(tl.sum(xc * xc, 0) / D + eps)
        if HAS_W:
            h = h * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            h = h + tl.load(BIAS + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            h = h * (1.0 + _term(SA, SB, n, l, offs, mask, s_san, s_sal, s_sad, s_sbn, s_sbl, s_sbd, SCALE_PAIR))
        if HAS_SHIFT:
            h = h + _term(HA, HB, n, l, offs, mask, s_han, s_hal, s_had, s_hbn, s_hbl, s_hbd, SHIFT_PAIR)
        tl.store(HO + o_row + offs, h.to(dtype), mask=mask)
    if NORM == 2:
        # Wan's RMSNorm rounds the normalised row before the weight multiplies it.
        h = (x / tl.sqrt(tl.sum(x * x, 0) / D + eps)).to(dtype)
        if HAS_W:
            h = (h.to(tl.float32) * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(HO + o_row + offs, h, mask=mask)


def _split(term, shape, name):
    """(a, b, pair, strides of a, strides of b) of a modulation term broadcast to ``shape``."""
    if term is None:
        return None, None, False, (0, 0, 0), (0, 0, 0)
    pair = isinstance(term, (tuple, list))
    a, b = term if pair else (term, term)
    try:
        a, b = a.expand(shape), b.expand(shape)
    except RuntimeError:
        raise ValueError(f"residual_norm_triton: {name} does not broadcast to {tuple(shape)}") from None
    return a, b, pair, a.stride(), b.stride()


def residual_norm_triton(x: torch.Tensor, y: torch.Tensor | None = None, gate=None, *, norm: str = "layer",
                         weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, scale=None,
                         shift=None, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`.naive.residual_norm_naive`; x and y may be strided over tokens but not over channels."""
    if norm not in NORMS:
        raise ValueError(f"residual_norm: norm must be one of {NORMS}, got {norm!r}")
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError("residual_norm_triton: x must be [N, L, D] with contiguous channels")
    if y is not None and (y.shape != x.shape or y.stride(-1) != 1):
        raise ValueError("residual_norm_triton: y must have x's shape and contiguous channels")
    if norm == "rms" and (scale is not None or shift is not None or bias is not None):
        raise ValueError("residual_norm_triton: the rms norm takes a weight only")
    n, length, d = x.shape
    if y is None and norm == "none":
        return x, x
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if y is not None else x
    h = x_out if norm == "none" else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n * length == 0:
        return x_out, h
    ga, gb, g_pair, s_ga, s_gb = _split(gate if y is not None else None, x.shape, "gate")
    sa, sb, s_pair, s_sa, s_sb = _split(scale, x.shape, "scale")
    ha, hb, h_pair, s_ha, s_hb = _split(shift, x.shape, "shift")
    yy = y if y is not None else x
    block = triton.next_power_of_2(d)
    _residual_norm_kernel[(n * length,)](
        x, yy, x_out, h, weight if weight is not None else x, bias if bias is not None else x,
        ga if ga is not None else x, gb if gb is not None else x, sa if sa is not None else x,
        sb if sb is not None else x, ha if ha is not None else x, hb if hb is not None else x,
        length, d, x.stride(0), x.stride(1), yy.stride(0), yy.stride(1), length * d, d,
        *s_ga, *s_gb, *s_sa, *s_sb, *s_ha, *s_hb,
        float(eps),
        HAS_Y=y is not None, HAS_GATE=ga is not None, GATE_PAIR=g_pair, NORM=_NORM_CODE[norm],
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=sa is not None, SCALE_PAIR=s_pair,
        HAS_SHIFT=ha is not None, SHIFT_PAIR=h_pair, BLOCK_D=block, num_warps=4 if block <= 2048 else 8,
    )
    return x_out, h


__all__ = ["residual_norm_triton"]
