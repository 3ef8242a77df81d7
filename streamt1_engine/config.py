"""Configuration of the DiT, the streaming cache and the few-step sampler.

Defaults follow Wan2.1-T2V-1.3B as used by Self-Forcing / LongLive: 3 latent frames per chunk, a local
window of 12 latent frames (the current chunk included), a sink of 3 frames that Stream-T1 may grow to 15.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import require
from .validation import at_least, between, validate_fields


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan2.1-architecture causal DiT (names follow the original Wan code)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self):
        validate_fields(self, _WAN_RULES)
        require(self.dim % self.num_heads == 0, f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        require(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        require(self.patch_size[0] == 1, "only a temporal patch size of 1 is supported (causal chunks)")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def wan_1_3b(cls) -> "WanConfig":
        return cls()

    @classmethod
    def wan_14b(cls) -> "WanConfig":
        return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    @classmethod
    def tiny(cls, **overrides) -> "WanConfig":
        base = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_channels=4, out_channels=4,
                    text_dim=32, text_len=16, freq_dim=32)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "WanConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        require(not unknown, f"unknown model config keys: {sorted(unknown)}")
        data = dict(data)
        if "patch_size" in data:
            data["patch_size"] = tuple(data["patch_size"])
        return cls(**data)


@dataclass(frozen=True)
class StreamConfig:
    """How a video is cut into chunks and which earlier frames each chunk attends to.

    ``window_frames`` counts the current chunk, as in LongLive's local attention size; the cached window
    therefore holds ``window_frames // chunk_frames - 1`` pages. The first ``sink_frames`` frames become the
    sink; Stream-T1's memory sinking may append evicted chunks until ``max_sink_frames``.
    """

    chunk_frames: int = 3
    window_frames: int = 12
    sink_frames: int = 3
    max_sink_frames: int = 15
    latent_height: int = 60
    latent_width: int = 104
    max_frames: int = 4096

    def __post_init__(self):
        validate_fields(self, _STREAM_RULES)
        c = self.chunk_frames
        require(c >= 1, "chunk_frames must be >= 1")
        require(self.window_frames % c == 0 and self.window_frames >= c,
                f"window_frames ({self.window_frames}) must be a positive multiple of chunk_frames ({c})")
        require(self.sink_frames % c == 0, f"sink_frames ({self.sink_frames}) must be a multiple of chunk_frames ({c})")
        require(self.max_sink_frames % c == 0 and self.max_sink_frames >= self.sink_frames,
                f"max_sink_frames ({self.max_sink_frames}) must be a multiple of chunk_frames and >= sink_frames")
        require(self.latent_height > 0 and self.latent_width > 0, "latent size must be positive")

    @property
    def window_pages(self) -> int:
        return self.window_frames // self.chunk_frames - 1

    @property
    def sink_pages(self) -> int:
        return self.sink_frames // self.chunk_frames

    @property
    def max_sink_pages(self) -> int:
        return self.max_sink_frames // self.chunk_frames

    @property
    def max_pages_per_beam(self) -> int:
        return self.max_sink_pages + self.window_pages

    @classmethod
    def tiny(cls, **overrides) -> "StreamConfig":
        base = dict(chunk_frames=3, window_frames=9, sink_frames=3, max_sink_frames=6,
                    latent_height=4, latent_width=6)
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step flow matching as in Self-Forcing: warped timesteps through a shifted sigma schedule."""

    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    warp_denoising_steps: bool = True
    context_timestep: float = 0.0

    def __post_init__(self):
        validate_fields(self, _SAMPLER_RULES)
        require(len(self.denoising_steps) >= 1, "at least one denoising step is needed")
        require(all(0 < t <= self.num_train_timesteps for t in self.denoising_steps),
                "denoising steps must lie in (0, num_train_timesteps]")
        object.__setattr__(self, "denoising_steps", tuple(float(t) for t in self.denoising_steps))


# Ranges checked by validate_fields on top of the annotated types (one line naming the field on failure).
_WAN_RULES = {name: at_least(1) for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels",
                                             "out_channels", "text_dim", "text_len", "freq_dim", "patch_size")}
_WAN_RULES.update(eps=between(0.0, 1.0), rope_theta=at_least(1.0))
_STREAM_RULES = {"latent_height": at_least(1), "latent_width": at_least(1), "max_frames": at_least(1)}
_SAMPLER_RULES = {"shift": at_least(0.0), "num_train_timesteps": at_least(1), "context_timestep": at_least(0.0)}


@dataclass
class EngineConfig:
    """Everything that fixes the engine's shapes: model, stream layout and sampler."""

    model: WanConfig = field(default_factory=WanConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
