"""LoRA arithmetic shared by every loader that folds adapters into dense weights (the DiT, VideoAlign).

peft scales an adapter's update by ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), so a merged weight is
``W + scale * B @ A``. Files that store no alpha (LongLive's) need the training-time alpha from the user;
LongLive's own code falls back to alpha = rank, i.e. scale 1.
"""
from __future__ import annotations

import math

import torch

from .errors import require


def lora_scale(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """peft's scaling of a rank-``rank`` adapter: ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA);
    ``alpha=None`` means alpha = rank."""
    require(isinstance(rank, int) and rank > 0, f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is None:
        alpha = rank
    require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0,
            f"LoRA alpha must be a positive number, got {alpha!r}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  device=None) -> torch.Tensor:
    """``weight + scale * b @ a`` computed in float32 (on ``device`` when given); a [rank, in], b [out, rank]."""
    return weight.to(device, torch.float32) + scale * (b.to(device, torch.float32) @ a.to(device, torch.float32))
