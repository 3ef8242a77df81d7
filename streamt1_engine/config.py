"""Configuration of the DiT, the streaming cache and the few-step sampler.

Defaults follow Wan2.1-T2V-1.3B as used by LongLive / Stream-T1: 3 latent frames per chunk, local attention
over 12 latent frames (the sink of 3 and the current chunk included), a sink that Stream-T1 may grow to 15.
"""
from __future__ import annotations

import dataclasses
import warnings
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


GLOBAL_ATTN_FRAMES = 21  # Self-Forcing / CausVid: a 32760-token cache, 21 latent frames at 480x832

# Engine-format JSON written before the stream keys took upstream's names (frames, current chunk included).
_OLD_STREAM_KEYS = {"chunk_frames": "num_frame_per_block", "window_frames": "local_attn_size",
                    "sink_frames": "sink_size", "max_sink_frames": "max_sink_size"}
_OLD_STREAM_DEFAULTS = {"chunk_frames": 3, "window_frames": 12, "sink_frames": 3, "max_sink_frames": 15}


@dataclass(frozen=True)
class StreamConfig:
    """How a video is cut into chunks and which earlier frames each chunk attends to, in upstream's terms.

    ``local_attn_size`` counts the latent frames a chunk attends to *including* the initial sink and its own
    chunk (LongLive: 12 = 3 sink + 6 cached + own 3); -1 is global attention (Self-Forcing, CausVid) over at
    most ``GLOBAL_ATTN_FRAMES`` frames. The first ``sink_size`` frames are the sink; Stream-T1's APPEND grows
    it up to ``max_sink_size`` and grows the cache budget by the same amount, so the non-sink part stays
    ``local_attn_size - sink_size`` frames (own chunk included).
    """

    num_frame_per_block: int = 3
    local_attn_size: int = 12
    sink_size: int = 3
    max_sink_size: int = 15
    latent_height: int = 60
    latent_width: int = 104
    max_frames: int = 4096

    OLD_KEYS = tuple(_OLD_STREAM_KEYS)  # the first format version's names (read by from_dict, with a warning)

    def __post_init__(self):
        validate_fields(self, _STREAM_RULES)
        c = self.num_frame_per_block
        require(c >= 1, "num_frame_per_block must be >= 1")
        require(self.sink_size >= 0 and self.sink_size % c == 0,
                f"sink_size ({self.sink_size}) must be a multiple of num_frame_per_block ({c})")
        require(self.max_sink_size % c == 0 and self.max_sink_size >= self.sink_size,
                f"max_sink_size ({self.max_sink_size}) must be a multiple of num_frame_per_block ({c}) and "
                f">= sink_size ({self.sink_size})")
        if self.is_global:
            require(self.sink_size == 0 and self.max_sink_size == 0,
                    "global attention (local_attn_size=-1) has no sink: set sink_size=0 and max_sink_size=0")
        else:
            require(self.local_attn_size - self.sink_size >= c,
                    f"sink_size ({self.sink_size}) leaves no room in local_attn_size ({self.local_attn_size}) for "
                    f"the current chunk ({c} frames): local_attn_size includes the sink and the current chunk")
            require((self.local_attn_size - self.sink_size) % c == 0,
                    f"local_attn_size - sink_size ({self.local_attn_size} - {self.sink_size}) must be a multiple "
                    f"of num_frame_per_block ({c})")
        require(self.latent_height > 0 and self.latent_width > 0, "latent size must be positive")

    @property
    def chunk_frames(self) -> int:
        return self.num_frame_per_block

    @property
    def is_global(self) -> bool:
        return self.local_attn_size == -1

    @property
    def window_pages(self) -> int:
        """Cached non-sink chunks a beam keeps (the current chunk excluded); APPEND does not change it."""
        c = self.num_frame_per_block
        frames = GLOBAL_ATTN_FRAMES // c * c if self.is_global else self.local_attn_size - self.sink_size
        return frames // c - 1

    @property
    def sink_pages(self) -> int:
        return self.sink_size // self.num_frame_per_block

    @property
    def max_sink_pages(self) -> int:
        return self.max_sink_size // self.num_frame_per_block

    @property
    def max_pages_per_beam(self) -> int:
        return self.max_sink_pages + self.window_pages

    @property
    def max_stream_frames(self) -> int:
        """Latent frames one stream may have: global attention stops where upstream's cache is full."""
        if self.is_global:
            return min(self.max_frames, (self.window_pages + 1) * self.num_frame_per_block)
        return self.max_frames

    @classmethod
    def preset(cls, name: str, **overrides) -> "StreamConfig":
        """The attention layout each model family was trained and released with (480x832 latents)."""
        require(name in STREAM_PRESETS, f"unknown stream preset {name!r} (known: {', '.join(sorted(STREAM_PRESETS))})")
        return cls(**{**STREAM_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "StreamConfig":
        """Engine-format ``stream`` section; the keys before upstream's names are converted with one warning."""
        data = dict(data)
        old = sorted(k for k in data if k in _OLD_STREAM_KEYS)
        if old:
            new_keys = sorted(k for k in _OLD_STREAM_KEYS.values() if k in data)
            require(not new_keys, f"stream config mixes old keys {old} with new keys {new_keys}; use the new ones")
            for key, value in _OLD_STREAM_DEFAULTS.items():  # what a missing old key meant then
                data.setdefault(key, value)
            data["window_frames"] += data["sink_frames"]  # old W excluded the sink S: upstream's size is W + S
            old = sorted(k for k in data if k in _OLD_STREAM_KEYS)
            for key in old:
                data[_OLD_STREAM_KEYS[key]] = data.pop(key)
            warnings.warn(f"stream config uses the old keys {old}; read as {[_OLD_STREAM_KEYS[k] for k in old]} "
                          "(local_attn_size = window_frames + sink_frames). Rename them: the old keys will go.",
                          UserWarning, stacklevel=2)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        require(not unknown, f"unknown stream config keys: {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def tiny(cls, **overrides) -> "StreamConfig":
        base = dict(num_frame_per_block=3, local_attn_size=12, sink_size=3, max_sink_size=6,
                    latent_height=4, latent_width=6)
        base.update(overrides)
        return cls(**base)


STREAM_PRESETS = {
    "self-forcing": dict(num_frame_per_block=3, local_attn_size=-1, sink_size=0, max_sink_size=0),
    "causvid": dict(num_frame_per_block=3, local_attn_size=-1, sink_size=0, max_sink_size=0),
    "longlive": dict(num_frame_per_block=3, local_attn_size=12, sink_size=3, max_sink_size=3),
    "stream-t1": dict(num_frame_per_block=3, local_attn_size=12, sink_size=3, max_sink_size=15),
}


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


# What a model folder must state: the shapes, and the head count and text length, which the weights do not show
# (a missing one would otherwise fall back to Wan2.1-1.3B's value: a shape mismatch, or silently wrong heads).
REQUIRED_MODEL_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels", "text_dim",
                       "text_len", "freq_dim")
# The latent frame size: no default fits every VAE (Wan's 60x104 would make the tiny model run at 416x240).
REQUIRED_STREAM_KEYS = ("latent_height", "latent_width")


def check_section_keys(cls, data, where: str, required: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """A config section read from a file names what it leaves out: a ``required`` field is an error naming it,
    any other missing field takes its default with one warning naming the values used (never silently).
    ``skip``: fields the caller fills itself. A section that is not a dict is left to ``build_config``."""
    if not isinstance(data, dict):
        return
    missing = [f for f in dataclasses.fields(cls) if f.name not in data and f.name not in skip]
    absent = [f.name for f in missing if f.name in required]
    require(not absent, f"{where} lacks {', '.join(repr(k) for k in absent)} (required: {', '.join(required)})")
    if missing:
        names = [f.name for f in missing]
        warnings.warn(f"{where} does not set {', '.join(names)}: using the defaults {defaults_text(cls, names)}",
                      UserWarning, stacklevel=3)


def defaults_text(cls, names=None) -> str:
    """``name=default, ...`` of a config dataclass's fields (all, or ``names``), for warnings."""
    def default(f: dataclasses.Field):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        return list(value) if isinstance(value, tuple) else value

    return ", ".join(f"{f.name}={default(f)}" for f in dataclasses.fields(cls) if names is None or f.name in names)


@dataclass
class EngineConfig:
    """Everything that fixes the engine's shapes: model, stream layout and sampler."""

    model: WanConfig = field(default_factory=WanConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
