"""Small builders shared by the tests: tiny models, caches and page bookkeeping."""
from __future__ import annotations

import torch

from streamt1_engine.cache import BeamPages, PagedKVCache, RouteFlag
from streamt1_engine.config import StreamConfig, WanConfig
from streamt1_engine.model.wan import CausalWanDiT
from streamt1_engine.model.rope import rope_part_dims


def tiny_model(seed: int = 0, **overrides) -> CausalWanDiT:
    torch.manual_seed(seed)
    cfg = WanConfig.tiny(**overrides)
    model = CausalWanDiT(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so attention patterns matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def text_context(model: CausalWanDiT, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return model.encode_text(torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g))


def make_cache(model: CausalWanDiT, stream: StreamConfig, num_pages: int = 32) -> PagedKVCache:
    return PagedKVCache(model.config, stream, num_pages, torch.device("cpu"), torch.float32)


def upstream_noise(seed: int, shape, num_steps: int, dtype=torch.float32, device="cpu"):
    """What the Stream-T1 reference draws for one candidate, in the engine's layout: a fresh generator on the
    device, initial noise [1, F, C, H, W], then one [F, C, H, W] re-noise per later step, in ``dtype``.
    Returns (initial [1, C, F, h, w], renoise [S-1, 1, C, F, h, w])."""
    c, f, h, w = shape
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    initial = torch.randn(1, f, c, h, w, device=device, dtype=dtype, generator=g).permute(0, 2, 1, 3, 4)
    renoise = [torch.randn(f, c, h, w, device=device, dtype=dtype, generator=g).permute(1, 0, 2, 3)
               for _ in range(num_steps - 1)]
    return initial, torch.stack(renoise)[:, None] if renoise else torch.empty(0, 1, c, f, h, w, dtype=dtype)


__all__ = ["BeamPages", "RouteFlag", "tiny_model", "text_context", "make_cache", "upstream_noise"]


def move_frames(k: torch.Tensor, offset: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotate keys [..., D] (pairs i, i + D/2) by ``offset`` frames: the frame part of Wan's RoPE only."""
    d = k.shape[-1]
    t_dim = rope_part_dims(d)[0]
    angles = torch.zeros(d // 2, dtype=torch.float64)
    angles[: t_dim // 2] = offset / theta ** (torch.arange(0, t_dim, 2, dtype=torch.float64)[: t_dim // 2] / t_dim)
    z = torch.complex(k[..., : d // 2].double(), k[..., d // 2:].double()) * torch.polar(torch.ones_like(angles),
                                                                                         angles)
    return torch.cat([z.real, z.imag], -1).to(k.dtype)


def brightness(frames, prompt):
    """A deterministic short-term test reward that differs between candidates."""
    return frames.mean(dim=(1, 2, 3, 4)) * 10


def smoothness(frames, prompt):
    """A deterministic long-term test reward: minus the mean frame-to-frame change."""
    if frames.shape[1] < 2:
        return torch.zeros(frames.shape[0], device=frames.device)
    return -(frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4)) * 10
