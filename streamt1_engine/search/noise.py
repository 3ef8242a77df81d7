"""Per-candidate noise: every candidate owns a seed, every chunk a generator derived from it.

Noise is drawn on the CPU so a seed gives the same video on any device. Stream-T1's noise propagation
mixes the parent beam's initial noise into the child's: ``sigma * parent + sqrt(1 - sigma^2) * fresh``,
which stays unit-variance Gaussian because the two parts are independent.
"""
from __future__ import annotations

import math

import torch

from ..sampler import ChunkNoise

_MIX = 0x9E3779B97F4A7C15


def chunk_seed(seed: int, chunk_index: int) -> int:
    """Stable 63-bit seed of (candidate seed, chunk): a reused seed still gives new noise per chunk."""
    x = (seed * _MIX + chunk_index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


def draw_chunk_noise(seeds: list[int], chunk_index: int, shape: tuple[int, ...], num_steps: int,
                     device) -> ChunkNoise:
    """Initial noise [N, *shape] and re-noise [S-1, N, *shape], one generator per candidate."""
    initial, renoise = [], []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, chunk_index))
        initial.append(torch.randn(shape, generator=gen))
        renoise.append(torch.randn((max(num_steps - 1, 0), *shape), generator=gen))
    init = torch.stack(initial).to(device)
    ren = torch.stack(renoise, dim=1).to(device)
    return ChunkNoise(init, ren)


def propagate_noise(parent_noise: torch.Tensor, fresh: torch.Tensor, sigma: float) -> torch.Tensor:
    return sigma * parent_noise + math.sqrt(1.0 - sigma * sigma) * fresh
