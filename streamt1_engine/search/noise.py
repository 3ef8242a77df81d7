"""Per-candidate noise, in one of two modes (``SearchConfig.noise_mode``).

``official`` draws what the Stream-T1 reference code draws, which is what the paper ran: every candidate of
every chunk gets a fresh ``torch.Generator(device).manual_seed(seed)`` and draws, in this order, its initial
noise ``[1, F, C, H, W]`` and one re-noise ``[F, C, H, W]`` per later denoising step, in the model's dtype;
the context pass draws nothing. Seeds are numbered as upstream: ``seed + i`` at chunk 0,
``seed + 1000*chunk + 100*beam + i`` for a beam's child ``i >= 1`` later, and child 0 reuses its beam's last
seed, so it redraws its parent's raw noise and re-noise (with one beam of one child, as in ``none``, every
chunk redraws the same noise). The same device, dtype and seed give upstream's noise bit for bit; another
device gives other noise. The numbering gives different candidates the same seed beyond 10 beams, about
100 children per beam, or 1001 first-chunk candidates; ``SearchConfig`` refuses those shapes.

With ``none`` (plain streaming, no search) ``official`` follows the base models' own inference scripts
instead (Self-Forcing's and LongLive's ``inference.py``): one device generator seeded once for the stream
draws the whole video's initial noise ``[1, T, C, H, W]`` up front, then every re-noise ``[F, C, H, W]`` of
every chunk in order (``StreamNoise``), so the one candidate does not redraw the same noise every chunk.

``portable`` draws on the CPU from a hash of (candidate seed, chunk), so a seed gives the same noise on
every device; new seeds are numbered consecutively.

Noise propagation mixes the parent beam's (fused) initial noise into the child's:
``sigma * parent + sqrt(1 - sigma^2) * fresh``. For independent parts that stays unit-variance Gaussian; in
official mode child 0's fresh part is its parent's own raw draw, so its noise is not independent of the
parent's (at chunk 1 it is ``(sigma + sqrt(1 - sigma^2))`` times the parent's draw), as upstream has it.
"""
from __future__ import annotations

import math

import torch

from ..sampler import ChunkNoise

_MIX = 0x9E3779B97F4A7C15

CHUNK_STRIDE, BEAM_STRIDE = 1000, 100  # upstream's seed numbering


def chunk_seed(seed: int, chunk_index: int) -> int:
    """Stable 63-bit seed of (candidate seed, chunk): a reused seed still gives new noise per chunk."""
    x = (seed * _MIX + chunk_index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 29
    return x & (2**63 - 1)


def draw_chunk_noise(seeds: list[int], chunk_index: int, shape: tuple[int, ...], num_steps: int,
                     device) -> ChunkNoise:
    """Portable noise: initial [N, *shape] and re-noise [S-1, N, *shape], one CPU generator per candidate."""
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


def upstream_seeds(seed: int, chunk_index: int, beam_last_seeds: list[int], children_per_beam: int,
                   first_chunk_candidates: int) -> list[int]:
    """Candidate seeds of one chunk, beam after beam, numbered as the reference code numbers them."""
    if chunk_index == 0:
        return [seed + i for i in range(first_chunk_candidates)]
    base = seed + CHUNK_STRIDE * chunk_index
    return [last if i == 0 else base + BEAM_STRIDE * beam + i
            for beam, last in enumerate(beam_last_seeds) for i in range(children_per_beam)]


def upstream_seed_collision(children_per_beam: int, beams: int, first_chunk_candidates: int) -> str | None:
    """Where upstream's numbering gives two different candidates the same seed (so the same noise), or None.

    Offsets from ``seed``: chunk 0 uses ``0 .. first-1``, chunk c >= 1 gives beam ``k``'s child ``i >= 1``
    the offset ``1000*c + 100*k + i`` (child 0 reuses its beam's seed). Decided by arithmetic on that formula,
    in constant time whatever the numbers (they may be a request's, not yet checked against any limit):

    - within one chunk, beam k's children ``1 .. B-1`` reach beam k+1's first offset ``100*(k+1) + 1`` when
      ``B - 1 >= 101``; with two beams or more the first clash is beam 1 child 1 and beam 0 child 101;
    - across chunks, offset ``o`` of chunk c is offset ``o - 1000`` of chunk c+1. With one beam the
      children fill ``1 .. B-1``, so child 1001 meets child 1 when ``B >= 1002``. With several beams (and no
      clash inside a chunk, so ``B <= 101`` and beam k holds exactly ``100*k + 1 .. 100*k + B-1``), beam k
      meets beam k-10 child for child: the first clash is beam 10 child 1, when there are 11 beams or more;
    - chunk 0's candidates ``0 .. first-1`` reach chunk 1's first child offset ``1001`` when ``first > 1001``."""
    if children_per_beam < 2:  # no child numbered i >= 1: every later candidate reuses its beam's seed
        return None
    last_child = children_per_beam - 1
    if beams >= 2 and last_child >= BEAM_STRIDE + 1:
        return f"beam 1 child 1 and beam 0 child {BEAM_STRIDE + 1} of one chunk"
    if beams == 1 and last_child >= CHUNK_STRIDE + 1:
        return f"beam 0 child {CHUNK_STRIDE + 1} of chunk c and beam 0 child 1 of chunk c+1"
    reach = CHUNK_STRIDE // BEAM_STRIDE  # beams apart whose offsets are one chunk apart
    if beams >= reach + 1:
        return f"beam {reach} child 1 of chunk c and beam 0 child 1 of chunk c+1"
    if CHUNK_STRIDE + 1 < first_chunk_candidates:
        return f"candidate {CHUNK_STRIDE + 1} of chunk 0 and a child of chunk 1"
    return None


def draw_upstream_noise(seeds: list[int], shape: tuple[int, int, int, int], num_steps: int, device,
                        dtype: torch.dtype) -> ChunkNoise:
    """Official noise, drawn as upstream draws it and returned in the engine's [N, C, F, h, w] layout."""
    c, f, h, w = shape
    initial, renoise = [], []
    for seed in seeds:
        gen = torch.Generator(device=device).manual_seed(seed)
        first = torch.randn((1, f, c, h, w), generator=gen, device=device, dtype=dtype)
        initial.append(first[0].transpose(0, 1))
        renoise.append(torch.stack([torch.randn((f, c, h, w), generator=gen, device=device, dtype=dtype)
                                    .transpose(0, 1) for _ in range(num_steps - 1)])
                       if num_steps > 1 else torch.empty((0, c, f, h, w), device=device, dtype=dtype))
    return ChunkNoise(torch.stack(initial).contiguous(), torch.stack(renoise, dim=1).contiguous())


def fuse_upstream_noise(parent_noise: torch.Tensor, fresh: torch.Tensor, sigma: float) -> torch.Tensor:
    """Upstream's fusion, same expression in the noise's own dtype (bf16 there)."""
    return sigma * parent_noise + math.sqrt(1 - sigma**2) * fresh


class StreamNoise:
    """Plain streaming's noise as the base models' inference scripts draw it: one generator for the stream.

    Those scripts seed the global RNG once, draw the whole video's initial noise, then draw each re-noise
    from the same device RNG during the loop; a fresh ``torch.Generator(device)`` with the same seed gives the
    same stream. Chunks must be drawn in order (each call advances the generator)."""

    def __init__(self, seed: int, num_chunks: int, shape: tuple[int, int, int, int], num_steps: int, device,
                 dtype: torch.dtype):
        c, f, h, w = shape
        self.shape, self.num_steps, self.device, self.dtype = shape, num_steps, device, dtype
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.initial = torch.randn((1, num_chunks * f, c, h, w), generator=self.generator, device=device,
                                   dtype=dtype)[0]
        self.next_chunk = 0

    def draw(self, chunk_index: int) -> ChunkNoise:
        if chunk_index != self.next_chunk:
            raise RuntimeError(f"stream noise drawn out of order: chunk {chunk_index}, expected {self.next_chunk}")
        c, f, h, w = self.shape
        initial = self.initial[chunk_index * f:(chunk_index + 1) * f].transpose(0, 1)[None]
        renoise = [torch.randn((f, c, h, w), generator=self.generator, device=self.device, dtype=self.dtype)
                   .transpose(0, 1)[None] for _ in range(self.num_steps - 1)]
        renoise = torch.stack(renoise) if renoise else torch.empty((0, 1, c, f, h, w), device=self.device,
                                                                  dtype=self.dtype)
        self.next_chunk += 1
        return ChunkNoise(initial.contiguous(), renoise.contiguous())
