"""Shared plumbing of the model-based rewards: locating weights, picking dtypes, following the frames' device."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import StreamT1Error
from ..hub import resolve_model_dir


def locate(path_or_hub_id: str, what: str, allow_patterns=None) -> Path:
    """A local file/folder or hub snapshot; any failure becomes one StreamT1Error naming ``what`` was sought."""
    try:
        return resolve_model_dir(path_or_hub_id, allow_patterns=allow_patterns)
    except StreamT1Error as exc:
        raise StreamT1Error(f"{what} not found: {exc}") from None


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StreamT1Error(f"{what}: cannot read {path.name}: {exc}") from None


def default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """bf16 on accelerators (the checkpoints are trained in bf16), float32 on the CPU."""
    if dtype is not None:
        return dtype
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class DeviceFollower:
    """Moves ``self.module`` to the frames' device on first use there, so a reward can be built before the engine
    decides where it runs. ``self.module`` must be an ``nn.Module``."""

    module: torch.nn.Module
    dtype: torch.dtype | None = None

    def follow(self, device: torch.device) -> torch.dtype:
        param = next(self.module.parameters())
        dtype = default_dtype(device, self.dtype)
        if param.device != device or param.dtype != dtype:
            self.module.to(device=device, dtype=dtype)
            self.on_moved(device, dtype)
        return dtype

    def on_moved(self, device: torch.device, dtype: torch.dtype) -> None:
        """Hook for parts that must keep their own dtype (e.g. an fp32 reward head)."""


def resize(images: torch.Tensor, height: int, width: int, peak: float = 1.0) -> torch.Tensor:
    """Bicubic, antialiased resize of [M, 3, H, W] on the device (PIL's bicubic filter), clamped to [0, peak]."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    out = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, peak)


class Normalizer:
    """``(x - mean) / std`` per channel, with the constants kept on each device once (no per-call uploads)."""

    def __init__(self, mean, std):
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self._cache: dict = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        key = (images.device, images.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(torch.tensor(v, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
                                     for v in (self.mean, self.std))
        mean, std = self._cache[key]
        return (images - mean) / std
