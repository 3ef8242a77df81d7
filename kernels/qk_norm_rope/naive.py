"""Reference for the query/key path of Wan self-attention on a new chunk.

RMS-normalise q and k across all heads (Wan's ``rms_norm_across_heads``), split into heads, permute each
head to the half-split layout, and rotate with the chunk's RoPE tables. Returns the rotated query, the
pre-RoPE key (what the KV cache stores) and the rotated key (what the chunk attends to itself with).
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def qk_norm_rope_naive(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       eps: float, num_heads: int, cos: torch.Tensor, sin: torch.Tensor):
    """q, k [N, L, H*D] natural layout; cos/sin [N, L, D/2]. Returns (q_rot, k_pre, k_rot), each [N, L, H, D]."""
    def heads_half(x):
        x = x.unflatten(-1, (num_heads, -1))
        return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)

    qn = heads_half(rms_norm(q, q_weight, eps))
    kn = heads_half(rms_norm(k, k_weight, eps))
    c, s = cos[:, :, None, :], sin[:, :, None, :]

    def rotate(x):
        half = x.shape[-1] // 2
        xf = x.float()
        lo, hi = xf[..., :half], xf[..., half:]
        return torch.cat([lo * c - hi * s, lo * s + hi * c], dim=-1).to(x.dtype)

    return rotate(qn), kn, rotate(kn)
