"""Search strategies and their knobs; the defaults are the Stream-T1 paper's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import require
from ..validation import at_least, between, validate_fields

STRATEGIES = ("none", "best_of_n", "stream_t1")
# Ranges checked by validate_fields on top of the annotated types; the thresholds only need to be finite.
_RULES = {"beam_size": at_least(1), "top_k": at_least(1),
          "num_candidates": at_least(1), "window_chunks": at_least(1), "noise_sigma": between(-1.0, 1.0),
          "fusion_cap": between(0.0, 1.0), "ema_alpha": between(0.0, 1.0)}

_STREAM_T1_ONLY = ("beam_size", "top_k", "noise_sigma", "short_threshold", "long_threshold", "ema_alpha",
                   "noise_propagation", "memory_sinking")
_REWARDED = ("num_candidates", "window_chunks", "fusion_cap", "reward_pruning")
_IGNORED = {"none": _STREAM_T1_ONLY + _REWARDED, "best_of_n": _STREAM_T1_ONLY, "stream_t1": ("num_candidates",)}


@dataclass(frozen=True)
class SearchConfig:
    """``none``: plain streaming (one candidate). ``best_of_n``: per chunk keep the best of ``num_candidates``
    (no noise propagation, no memory sinking). ``stream_t1``: beam search with ``beam_size`` children per
    beam and ``top_k`` survivors, noise propagation, hybrid short/long rewards and reward-gated sinking.
    Each Stream-T1 unit can be switched off alone for ablations."""

    strategy: str = "stream_t1"
    beam_size: int = 2
    top_k: int = 2
    num_candidates: int = 4  # best_of_n only
    window_chunks: int = 10
    noise_sigma: float = -0.1
    short_threshold: float = 0.0
    long_threshold: float = 0.2
    fusion_cap: float = 0.4
    ema_alpha: float = 0.999
    noise_propagation: bool = True
    reward_pruning: bool = True  # off: survivors are chosen at random (seeded), the ablation baseline
    memory_sinking: bool = True

    def __post_init__(self):
        validate_fields(self, _RULES)
        require(self.strategy in STRATEGIES, f"unknown search strategy {self.strategy!r}; choose one of {STRATEGIES}")
        require(self.beam_size >= 1, "beam_size must be >= 1")
        require(self.top_k >= 1, "top_k must be >= 1")
        require(self.num_candidates >= 1, "num_candidates must be >= 1")
        require(self.window_chunks >= 1, "window_chunks must be >= 1")
        require(-1.0 <= self.noise_sigma <= 1.0, "noise_sigma must lie in [-1, 1]")
        require(0.0 <= self.fusion_cap <= 1.0, "fusion_cap must lie in [0, 1]")
        require(0.0 <= self.ema_alpha <= 1.0, "ema_alpha must lie in [0, 1]")

    @classmethod
    def named(cls, strategy: str, **overrides) -> "SearchConfig":
        return cls(strategy=strategy, **overrides)

    # effective shape of the search, per strategy
    @property
    def children_per_beam(self) -> int:
        return {"none": 1, "best_of_n": self.num_candidates, "stream_t1": self.beam_size}[self.strategy]

    @property
    def survivors(self) -> int:
        return self.top_k if self.strategy == "stream_t1" else 1

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
