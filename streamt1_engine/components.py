"""The two pluggable pieces around the DiT: a text encoder and a streaming video VAE.

The engine only relies on these protocols, so the Wan umT5 / Wan VAE wrappers and the tiny embedded
components are interchangeable. A component that can be saved in an engine folder also has
``save_pretrained(directory) -> spec``: it writes its files into ``directory`` and returns the registry spec
(``{"type": ..., ...}``) that rebuilds it (``StreamT1Engine.save_pretrained`` calls it).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TextEncoder(Protocol):
    text_dim: int
    text_len: int

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, text_len, text_dim] float, zero past each prompt's length (as Wan pads its context)."""
        ...


@runtime_checkable
class VideoVAE(Protocol):
    """Decodes latents chunk by chunk with a causal state that can be forked per beam."""

    latent_channels: int
    spatial_factor: int

    def decode_chunk(self, latents: torch.Tensor, state: Any | None) -> tuple[torch.Tensor, Any]:
        """latents [N, C, F, h, w] of the next chunk of N independent streams, and their state (None at the
        start) -> (frames float [N, T, 3, H, W] in [0, 1], new state)."""
        ...

    def select_state(self, state: Any, index: torch.Tensor) -> Any:
        """The state of streams ``index`` (LongTensor [M]); used to fork candidates from beams."""
        ...

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video float [B, T, 3, H, W] in [0, 1] -> latents [B, C, F, h, w]."""
        ...
