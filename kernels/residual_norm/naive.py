"""Reference for the elementwise glue around the norms of a Wan block.

A Wan block is pre-norm with adaLN: before self-attention, cross-attention and the FFN the residual stream
``x`` is normalised and (twice out of three) modulated, ``h = norm(x) * (1 + scale) + shift``; after each,
the branch output ``y`` is added back, gated by ``gate`` for self-attention and the FFN. Wan computes that
glue in float32 and rounds once: ``x' = (x + y * gate)`` to x's dtype, ``h`` from the rounded ``x'``.
The modulation terms are the block's learned row plus the timestep embedding's row; each is given as a
tensor or a pair ``(a, b)`` summed in float32, so neither sum needs its own launch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("layer", "rms", "none")


def modulation_term(term) -> torch.Tensor | None:
    """A tensor, or a pair of tensors summed in float32 (``modulation + e``); None stays None."""
    if term is None:
        return None
    if isinstance(term, (tuple, list)):
        a, b = term
        return a.float() + b.float()
    return term.float()


def residual_norm_naive(x: torch.Tensor, y: torch.Tensor | None = None, gate=None, *, norm: str = "layer",
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, scale=None,
                        shift=None, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [N, L, D]; gate / scale / shift broadcast to [N, L, D] (tensors or pairs). Returns (x', h).

    ``x' = x + y * gate`` (``x + y`` without gate; ``x`` itself without y), rounded to x's dtype.
    ``norm="layer"``: ``h = LayerNorm(x')`` [``* weight + bias``] [``* (1 + scale) + shift``], rounded once.
    ``norm="rms"``: Wan's RMSNorm, ``h = round(x' * rsqrt(mean(x'^2) + eps)) * weight`` (no modulation).
    ``norm="none"``: ``h`` is ``x'``.
    """
    if norm not in NORMS:
        raise ValueError(f"residual_norm: norm must be one of {NORMS}, got {norm!r}")
    if y is not None:
        g = modulation_term(gate)
        yf = y.float() if g is None else y.float() * g
        x = (x.float() + yf).to(x.dtype)
    if norm == "none":
        return x, x
    xf = x.float()
    if norm == "rms":
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return x, h if weight is None else h * weight
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    h = F.layer_norm(xf, (x.shape[-1],), w, b, eps)
    sc, sh = modulation_term(scale), modulation_term(shift)
    if sc is not None:
        h = h * (1 + sc)
    if sh is not None:
        h = h + sh
    return x, h.to(x.dtype)
