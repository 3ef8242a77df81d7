"""Triton q/k RMS-norm + half-layout permutation + RoPE, one program per token row.

Fusing saves four full passes over q and k (norm, permute, rotate, copy of the pre-RoPE key). The
interleaved-to-half permutation is free here: even and odd channels are loaded as two strided tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_one(X, W, x_row, out_rot, out_pre, cos, sin, offs_h, offs_i, mask, eps, inv_count,
                   s_xd, s_w, s_oh, s_od, HALF: tl.constexpr, WRITE_PRE: tl.constexpr):
    ch = offs_h[:, None] * (2 * HALF) + 2 * offs_i[None, :]  # even channel of pair i in head h
    xe = tl.load(X + x_row + ch * s_xd, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(X + x_row + (ch + 1) * s_xd, mask=mask, other=0.0).to(tl.float32)
    we = tl.load(W + ch * s_w, mask=mask, other=0.0).to(tl.float32)
    wo = tl.load(W + (ch + 1) * s_w, mask=mask, other=0.0).to(tl.float32)
    ms = (tl.sum(tl.sum(xe * xe, 1), 0) + tl.sum(tl.sum(xo * xo, 1), 0)) * inv_count
    r = 1.0 / tl.sqrt(ms + eps)
    dtype = out_rot.dtype.element_ty
    # Round to the input dtype before rotating, as the reference does.
    lo = (xe * r * we).to(dtype)
    hi = (xo * r * wo).to(dtype)
    o = offs_h[:, None] * s_oh + offs_i[None, :] * s_od
    if WRITE_PRE:
        tl.store(out_pre + o, lo, mask=mask)
        tl.store(out_pre + o + HALF * s_od, hi, mask=mask)
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    tl.store(out_rot + o, (lo * cos - hi * sin).to(dtype), mask=mask)
    tl.store(out_rot + o + HALF * s_od, (lo * sin + hi * cos).to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    Q, K, QW, KW, COS, SIN, QR, KPRE, KR,
    L, s_qn, s_ql, s_qd, s_kn, s_kl, s_kd, s_qw, s_kw,
    s_cn, s_cl, s_cd, s_sn, s_sl, s_sd,
    s_on, s_ol, s_oh, s_od,
    H, eps, inv_count,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    n = (row // L).to(tl.int64)
    l = (row % L).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, HALF)
    mask = (offs_h < H)[:, None] & (offs_i < HALF)[None, :]
    cos = tl.load(COS + n * s_cn + l * s_cl + offs_i * s_cd).to(tl.float32)[None, :]
    sin = tl.load(SIN + n * s_sn + l * s_sl + offs_i * s_sd).to(tl.float32)[None, :]
    o_row = n * s_on + l * s_ol
    _norm_rope_one(Q, QW, n * s_qn + l * s_ql, QR + o_row, QR + o_row, cos, sin, offs_h, offs_i, mask, eps,
                   inv_count, s_qd, s_qw, s_oh, s_od, HALF, False)
    _norm_rope_one(K, KW, n * s_kn + l * s_kl, KR + o_row, KPRE + o_row, cos, sin, offs_h, offs_i, mask, eps,
                   inv_count, s_kd, s_kw, s_oh, s_od, HALF, True)


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        eps: float, num_heads: int, cos: torch.Tensor, sin: torch.Tensor):
    """See :func:`.naive.qk_norm_rope_naive`; q, k may be strided views (e.g. slices of a fused qkv)."""
    n, length, hd = q.shape
    if k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError("qk_norm_rope_triton: q and k must have the same shape and dtype")
    if hd % num_heads:
        raise ValueError("qk_norm_rope_triton: H*D is not divisible by num_heads")
    d = hd // num_heads
    half = d // 2
    if d % 2 or half & (half - 1):
        raise ValueError(f"qk_norm_rope_triton: head dim must be twice a power of two, got {d}")
    if cos.shape != (n, length, half) or sin.shape != cos.shape:
        raise ValueError("qk_norm_rope_triton: cos/sin must be [N, L, D/2]")
    shape = (n, length, num_heads, d)
    q_rot = torch.empty(shape, dtype=q.dtype, device=q.device)
    k_pre = torch.empty_like(q_rot)
    k_rot = torch.empty_like(q_rot)
    if n * length == 0:
        return q_rot, k_pre, k_rot
    s_out = q_rot.stride()
    _qk_norm_rope_kernel[(n * length,)](
        q, k, q_weight, k_weight, cos, sin, q_rot, k_pre, k_rot,
        length, *q.stride(), *k.stride(), q_weight.stride(0), k_weight.stride(0),
        *cos.stride(), *sin.stride(),
        s_out[0], s_out[1], s_out[2], s_out[3],
        num_heads, float(eps), 1.0 / hd,
        HALF=half, BLOCK_H=triton.next_power_of_2(num_heads), num_warps=4,
    )
    return q_rot, k_pre, k_rot


__all__ = ["qk_norm_rope_triton"]
