"""Search strategies and their knobs; the defaults are the Stream-T1 paper's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import require
from ..flags import flag
from ..validation import at_least, between, one_of, validate_fields
from .noise import upstream_seed_collision

STRATEGIES = ("none", "best_of_n", "stream_t1")
SHORT_HISTORIES = ("lineage", "window")
NOISE_MODES = ("official", "portable")
REWARD_FRAMES = ("cold", "streamed")
# Ranges checked by validate_fields on top of the annotated types; the thresholds only need to be finite.
_RULES = {"beam_size": at_least(1), "top_k": at_least(1),
          "num_candidates": at_least(1), "window_chunks": at_least(1), "noise_sigma": between(-1.0, 1.0),
          "fusion_cap": between(0.0, 1.0), "ema_alpha": between(0.0, 1.0), "short_history": one_of(*SHORT_HISTORIES),
          "noise_mode": one_of(*NOISE_MODES), "reward_frames": one_of(*REWARD_FRAMES)}

_STREAM_T1_ONLY = ("beam_size", "top_k", "noise_sigma", "short_threshold", "long_threshold", "ema_alpha",
                   "noise_propagation", "memory_sinking", "short_history")
_REWARDED = ("num_candidates", "window_chunks", "fusion_cap", "reward_pruning", "reward_frames")
_IGNORED = {"none": _STREAM_T1_ONLY + _REWARDED, "best_of_n": _STREAM_T1_ONLY, "stream_t1": ("num_candidates",)}


def search_shape(strategy: str, beam_size: int, top_k: int, num_candidates: int) -> tuple[int, int]:
    """(children per surviving beam, surviving beams) of a search, its candidates per chunk being their product;
    plain arithmetic, so a server can hold a request's numbers against its limits before building a config."""
    children = {"none": 1, "best_of_n": num_candidates, "stream_t1": beam_size}[strategy]
    return children, (top_k if strategy == "stream_t1" else 1)


@dataclass(frozen=True)
class SearchConfig:
    """``none``: plain streaming (one candidate). ``best_of_n``: per chunk keep the best of ``num_candidates``
    (no noise propagation, no memory sinking). ``stream_t1``: beam search with ``beam_size`` children per
    beam and ``top_k`` survivors, noise propagation, hybrid short/long rewards and reward-gated sinking.
    Each Stream-T1 unit can be switched off alone for ablations.

    ``noise_mode``: "official" draws the reference code's noise with its seed numbering (what the paper
    ran; see ``search.noise``), "portable" the engine's device-independent hashed noise. ``reward_frames``:
    "cold" shows the rewards what the reference shows them (the chunk, and the last ``window_chunks``
    chunks, decoded from a cold VAE state and truncated to uint8, as are the output frames), "streamed"
    reuses the streamed frames (rounded to uint8) for both."""

    strategy: str = field(default="stream_t1", metadata=flag("search strategy", name="search", choices=STRATEGIES,
                                                             default="none"))
    beam_size: int = field(default=2, metadata=flag("children per beam, B"))
    top_k: int = field(default=2, metadata=flag("surviving beams, K"))
    num_candidates: int = field(default=4, metadata=flag("candidates per chunk for best_of_n"))
    window_chunks: int = field(default=10, metadata=flag("long-term reward window, W chunks"))
    noise_sigma: float = field(default=-0.1, metadata=flag("noise propagation weight"))
    short_threshold: float = field(default=0.0, metadata=flag("routing threshold on the short-term score"))
    long_threshold: float = field(default=0.2, metadata=flag("routing threshold on the long-term score"))
    fusion_cap: float = field(default=0.4, metadata=flag("cap of the short-term weight"))
    ema_alpha: float = field(default=0.999, metadata=flag("sink EMA alpha"))
    noise_propagation: bool = field(default=True, metadata=flag("ablation: fresh noise per chunk"))
    # off: survivors are chosen at random (seeded), the ablation baseline
    reward_pruning: bool = field(default=True, metadata=flag("ablation: random survivors"))
    memory_sinking: bool = field(default=True, metadata=flag("ablation: fixed sink, evictions discarded"))
    # routing's short-score baseline: "lineage" = upstream's mean over the whole lineage (its slice
    # [max(0, 1 - W):] always starts at 0, which looks unintended); "window" = the last window_chunks chunks
    short_history: str = field(default="lineage", metadata=flag(
        "routing's short-score baseline: lineage (upstream: every earlier chunk) or window (last W)",
        choices=SHORT_HISTORIES))
    noise_mode: str = field(default="official", metadata=flag(
        "official: the reference code's per-candidate device generators and seed numbering (the paper's noise); "
        "portable: hashed CPU noise, the same on every device", choices=NOISE_MODES))
    reward_frames: str = field(default="cold", metadata=flag(
        "cold: rewards see the chunk and the window decoded from a cold VAE state, truncated to uint8 (the "
        "paper's); streamed: reuse the streamed frames (faster)", choices=REWARD_FRAMES))

    def __post_init__(self):
        validate_fields(self, _RULES)
        require(self.strategy in STRATEGIES, f"unknown search strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.noise_mode == "official":
            clash = upstream_seed_collision(self.children_per_beam, self.survivors, self.first_chunk_candidates)
            keep = "num_candidates <= 1001" if self.strategy == "best_of_n" else "top_k <= 10 and beam_size <= 100"
            require(clash is None,
                    f"noise_mode='official' numbers seeds as the reference code does (seed + 1000*chunk + "
                    f"100*beam + i), which gives two candidates the same seed and noise here ({clash}); keep "
                    f"{keep}, or use noise_mode='portable'")

    @classmethod
    def named(cls, strategy: str, **overrides) -> "SearchConfig":
        return cls(strategy=strategy, **overrides)

    # effective shape of the search, per strategy
    @property
    def children_per_beam(self) -> int:
        return search_shape(self.strategy, self.beam_size, self.top_k, self.num_candidates)[0]

    @property
    def survivors(self) -> int:
        return search_shape(self.strategy, self.beam_size, self.top_k, self.num_candidates)[1]

    @property
    def first_chunk_candidates(self) -> int:
        return self.children_per_beam * self.survivors

    @property
    def uses_rewards(self) -> bool:
        return self.strategy != "none" and (self.first_chunk_candidates > 1 or self.survivors > 1)

    @property
    def propagates_noise(self) -> bool:
        return self.strategy == "stream_t1" and self.noise_propagation

    @property
    def sinks_memory(self) -> bool:
        return self.strategy == "stream_t1" and self.memory_sinking

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def ignored_options(self) -> tuple[str, ...]:
        """Fields this strategy does not read (the run record leaves them out; the CLI warns if they are set)."""
        return _IGNORED[self.strategy]

    def used_dict(self) -> dict:
        """The options this strategy actually uses, and the search's effective shape: what a run record shows."""
        used = {k: v for k, v in self.to_dict().items() if k not in self.ignored_options}
        return {**used, "candidates_per_chunk": self.first_chunk_candidates, "survivors": self.survivors}
