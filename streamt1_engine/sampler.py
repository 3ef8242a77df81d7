"""Few-step flow-matching schedule and the per-chunk denoising loop (Self-Forcing semantics).

The model predicts flow = noise - x0; x0 = x_t - sigma * flow; between steps x0 is re-noised with fresh
Gaussian noise to the next sigma. Noise is drawn by the caller (per candidate, from its own generator) so
the loop itself is deterministic, batched over candidates, and capturable as a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SamplerConfig
from .errors import require


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[float, ...]  # model timesteps, in [0, num_train_timesteps]
    sigmas: tuple[float, ...]  # noise level of each step, timestep / num_train_timesteps

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def shifted_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def make_schedule(cfg: SamplerConfig) -> Schedule:
    """Warp the nominal steps through the shifted schedule of ``num_train_timesteps`` levels."""
    n = cfg.num_train_timesteps
    if cfg.warp_denoising_steps:
        base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        table = shifted_sigma(base, cfg.shift) * n
        idx = [n - int(round(t)) for t in cfg.denoising_steps]
        require(all(0 <= i < n for i in idx), "denoising steps out of range for warping")
        timesteps = tuple(float(table[i]) for i in idx)
    else:
        timesteps = cfg.denoising_steps
    return Schedule(timesteps, tuple(t / n for t in timesteps))


@dataclass
class ChunkNoise:
    """All Gaussian noise one chunk's denoising consumes: the initial noise and one re-noise per later step."""

    initial: torch.Tensor  # [N, C, F, h, w]
    renoise: torch.Tensor  # [S - 1, N, C, F, h, w]


def denoise_chunk(model, schedule: Schedule, noise: ChunkNoise, text, attn, between_steps=None) -> torch.Tensor:
    """Run every step for all candidates at once; returns the clean prediction x0 (float32).

    ``between_steps(i)``: called before every step ``i`` after the first (a cancelled stream's driver raises
    there, so a chunk in progress stops within one forward)."""
    x = noise.initial.float()
    n = x.shape[0]
    x0 = x
    for i, (t, sigma) in enumerate(zip(schedule.timesteps, schedule.sigmas)):
        if i and between_steps is not None:
            between_steps(i)
        timestep = torch.full((n,), t, device=x.device, dtype=torch.float32)
        flow = model(x, timestep, text, attn).float()
        x0 = x - sigma * flow
        if i + 1 < schedule.num_steps:
            nxt = schedule.sigmas[i + 1]
            x = (1 - nxt) * x0 + nxt * noise.renoise[i].float()
    return x0


def context_pass(model, x0: torch.Tensor, text, attn, timestep: float = 0.0) -> None:
    """Run the clean chunk once more so every layer writes its K/V into ``attn.write_pages``."""
    require(attn.write_pages is not None, "the context pass needs pages to write")
    t = torch.full((x0.shape[0],), timestep, device=x0.device, dtype=torch.float32)
    model(x0, t, text, attn)


class EagerDenoiser:
    """Runs the chunk loop op by op; ``cuda_graphs.GraphedDenoiser`` replays the same work from graphs.
    ``between_steps``: see ``denoise_chunk`` (a replayed graph runs its steps without a break)."""

    def __init__(self, model, schedule: Schedule, text, context_timestep: float = 0.0, between_steps=None):
        self.model, self.schedule, self.text, self.context_timestep = model, schedule, text, context_timestep
        self.between_steps = between_steps

    def set_text(self, text) -> None:
        """Denoise the following chunks against another prompt (as ``GraphedDenoiser.set_text``)."""
        self.text = text

    def denoise(self, noise: ChunkNoise, attn, text=None) -> torch.Tensor:
        """``text``: this call's prompt context (B = 1 or one row per candidate); None: the one given at init."""
        return denoise_chunk(self.model, self.schedule, noise, self.text if text is None else text, attn,
                             self.between_steps)

    def context(self, x0: torch.Tensor, attn, text=None) -> None:
        context_pass(self.model, x0, self.text if text is None else text, attn, self.context_timestep)
