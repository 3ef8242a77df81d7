"""The device side of the paged cache: every layer's K/V pages, preallocated once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import WanConfig
from ..model.rope import Rope3D


@dataclass
class KVPool:
    """Preallocated K/V pages of every layer: [L, P, T, H, D]; keys rotated at their page's positions, in the
    half-split layout. ``frame_cos``/``frame_sin`` (the RoPE frame tables) let a memory-sink merge move
    evicted keys onto the sink page's frames."""

    k: torch.Tensor
    v: torch.Tensor
    page_frame_pos: torch.Tensor  # [P] int32, latent-frame index of each page's first frame
    frame_cos: torch.Tensor | None = None  # [F, D/2] float32
    frame_sin: torch.Tensor | None = None

    @classmethod
    def allocate(cls, cfg: WanConfig, num_pages: int, page_tokens: int, device, dtype,
                 max_frames: int = 4096) -> "KVPool":
        shape = (cfg.num_layers, num_pages, page_tokens, cfg.num_heads, cfg.head_dim)
        rope = Rope3D(cfg.head_dim, cfg.rope_theta, max_frames, device=device)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(num_pages, device=device, dtype=torch.int32), rope.frame_cos, rope.frame_sin)

    @staticmethod
    def page_bytes(cfg: WanConfig, page_tokens: int, dtype) -> int:
        """Bytes one page takes over every layer, K and V (what ``allocate`` takes per page)."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * page_tokens * cfg.num_heads * cfg.head_dim * element

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
