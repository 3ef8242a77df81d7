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


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased resize of [M, 3, H, W] on the device (PIL's bicubic filter), clamped to [0, 1]."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    out = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def torchvision_resize_levels(levels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 levels (float [M, 3, H, W], integers 0..255) resized as torchvision resizes a uint8 tensor: bicubic
    antialiased in float32, clamped to 0..255 and rounded back to integers."""
    if tuple(levels.shape[-2:]) == (height, width):
        return levels
    out = F.interpolate(levels.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, 255.0).round_()


_PIL_BITS = 22  # PIL's fixed-point precision for 8-bit images (32 - 8 - 2)
_pil_weights_cache: dict = {}


def _pil_bicubic_weights(in_size: int, out_size: int, device) -> torch.Tensor:
    """PIL's bicubic (a = -0.5) resampling matrix [out, in] for one axis, as the integer fixed-point coefficients
    it uses for 8-bit images (stretched support when shrinking, normalised per output pixel), in float64."""
    key = (in_size, out_size, device)
    if key not in _pil_weights_cache:
        scale = in_size / out_size
        stretch = max(scale, 1.0)
        support = 2.0 * stretch
        center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
        first = (center - support + 0.5).trunc().clamp(min=0)
        last = (center + support + 0.5).trunc().clamp(max=in_size)
        x = torch.arange(in_size, dtype=torch.float64)
        d = ((x[None] - center[:, None] + 0.5) / stretch).abs()
        cubic = torch.where(d < 1, (1.5 * d - 2.5) * d * d + 1, torch.where(d < 2, ((d - 5) * d + 8) * d * -0.5 + 2,
                                                                            torch.zeros_like(d)))
        w = torch.where((x[None] >= first[:, None]) & (x[None] < last[:, None]), cubic, torch.zeros_like(d))
        total = w.sum(dim=1, keepdim=True)
        w = torch.where(total != 0, w / total, w) * (1 << _PIL_BITS)
        _pil_weights_cache[key] = torch.where(w < 0, w - 0.5, w + 0.5).trunc().to(device)
    return _pil_weights_cache[key]


def _pil_pass(levels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One PIL resampling pass along the last axis: integer sums (exact in float64), rounded, clipped to 0..255."""
    total = levels @ weights.T + (1 << (_PIL_BITS - 1))
    return torch.floor(total / (1 << _PIL_BITS)).clamp_(0.0, 255.0)


def pil_resize_levels(levels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 levels (float [M, 3, H, W], integers 0..255) resized bit for bit as PIL's ``Image.resize(...,
    BICUBIC)`` resizes an RGB image: a horizontal pass, rounding to uint8, then a vertical pass; on the device."""
    out_dtype = levels.dtype
    x = levels.double()
    if x.shape[-1] != width:
        x = _pil_pass(x, _pil_bicubic_weights(x.shape[-1], width, x.device))
    if x.shape[-2] != height:
        x = _pil_pass(x.transpose(-1, -2), _pil_bicubic_weights(x.shape[-2], height, x.device)).transpose(-1, -2)
    return x.to(out_dtype)


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
