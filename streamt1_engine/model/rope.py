"""Wan's 3D rotary embedding, in the engine's half-split channel layout.

Wan rotates interleaved channel pairs (2i, 2i+1). The engine permutes every query/key head to
[even channels | odd channels] right after the q/k norm, so a pair becomes (i, i + D/2) and kernels can
rotate with two contiguous half-tiles. Dot products are unchanged because q and k get the same
permutation; values are never permuted.

The head dim splits into frame / height / width parts (44 / 42 / 42 for D=128). A pair's angle depends on
one coordinate only, so the rotation factors into a per-frame table and a per-spatial-token table whose
"other" columns are exactly cos=1, sin=0; ``cos = cf*cs - sf*ss`` then equals the single-part value.
"""
from __future__ import annotations

import torch

from ..errors import require


def rope_part_dims(head_dim: int) -> tuple[int, int, int]:
    h_dim = w_dim = 2 * (head_dim // 6)
    return head_dim - h_dim - w_dim, h_dim, w_dim


def _inv_freq(part_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, part_dim, 2, dtype=torch.float64)[: part_dim // 2] / part_dim))


def to_half_layout(x: torch.Tensor) -> torch.Tensor:
    """[..., D] interleaved pairs -> [..., D] with even channels first, then odd channels."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def from_half_layout(x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


def rotate_half_layout(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of ``x`` in float32; cos/sin broadcast against ``x[..., :D/2]``."""
    half = x.shape[-1] // 2
    xf = x.float()
    lo, hi = xf[..., :half], xf[..., half:]
    return torch.cat([lo * cos - hi * sin, lo * sin + hi * cos], dim=-1)


class Rope3D:
    """Precomputed cos/sin tables (float64 angles, float32 values) for frames and spatial tokens."""

    def __init__(self, head_dim: int, theta: float = 10000.0, max_frames: int = 4096, device=None):
        require(head_dim % 2 == 0, "head_dim must be even")
        self.head_dim = head_dim
        self.theta = theta
        self.max_frames = max_frames
        t_dim, h_dim, w_dim = rope_part_dims(head_dim)
        self.part_pairs = (t_dim // 2, h_dim // 2, w_dim // 2)
        half = head_dim // 2
        frame_angles = torch.zeros(max_frames, half, dtype=torch.float64)
        frame_angles[:, : t_dim // 2] = torch.arange(max_frames, dtype=torch.float64)[:, None] * _inv_freq(t_dim, theta)
        self.frame_cos = frame_angles.cos().float().to(device)
        self.frame_sin = frame_angles.sin().float().to(device)
        self._spatial: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.device = device

    def spatial_tables(self, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid_h, grid_w)
        if key not in self._spatial:
            tp, hp, wp = self.part_pairs
            t_dim, h_dim, w_dim = rope_part_dims(self.head_dim)
            angles = torch.zeros(grid_h * grid_w, self.head_dim // 2, dtype=torch.float64)
            hh = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
            ww = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
            angles[:, tp: tp + hp] = hh[:, None] * _inv_freq(h_dim, self.theta)
            angles[:, tp + hp:] = ww[:, None] * _inv_freq(w_dim, self.theta)
            self._spatial[key] = (angles.cos().float().to(self.device), angles.sin().float().to(self.device))
        return self._spatial[key]

    def chunk_tables(self, frame_start: torch.Tensor, num_frames: int, grid_h: int, grid_w: int):
        """cos/sin [N, num_frames*grid_h*grid_w, D/2] for chunks starting at ``frame_start`` [N] (device)."""
        frames = frame_start.long()[:, None] + torch.arange(num_frames, device=frame_start.device)
        return self.token_tables(frames, grid_h, grid_w)

    def token_tables(self, frames: torch.Tensor, grid_h: int, grid_w: int):
        """cos/sin [N, F*grid_h*grid_w, D/2] for tokens of frames at positions ``frames`` [N, F]."""
        num_frames = frames.shape[1]
        scos, ssin = self.spatial_tables(grid_h, grid_w)
        frames = frames.long().clamp(0, self.max_frames - 1)
        fcos = self.frame_cos[frames].repeat_interleave(grid_h * grid_w, dim=1)
        fsin = self.frame_sin[frames].repeat_interleave(grid_h * grid_w, dim=1)
        scos = scos.repeat(num_frames, 1)
        ssin = ssin.repeat(num_frames, 1)
        return fcos * scos - fsin * ssin, fsin * scos + fcos * ssin
