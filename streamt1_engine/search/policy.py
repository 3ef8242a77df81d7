"""Stream-T1's search decisions on host values only: which candidates to run, who survives, how pages route.

Kept apart from the tensor work (``beam_search.BeamSearch``) so the rules can be tested without a model and
one executor can later run the candidates of several streams' policies together.
"""
from __future__ import annotations

import random

from ..cache import RouteFlag
from ..rewards.base import hybrid_weight
from .config import SearchConfig
from .noise import upstream_seeds


class SearchPolicy:
    """One stream's search decisions; stateful only in its portable seed counter and its pruning RNG."""

    def __init__(self, search: SearchConfig, seed: int, num_chunks: int, chunk_frames: int):
        self.search, self.seed = search, seed
        self.num_chunks, self.chunk_frames = num_chunks, chunk_frames
        self._next_seed = seed + search.first_chunk_candidates  # portable numbering: consecutive new seeds
        self._rng = random.Random(seed)  # survivors at random when reward pruning is off

    def candidates(self, chunk_index: int, beam_last_seeds: list[int]) -> tuple[list[int], list[int]]:
        """Seeds of the chunk's candidates and the beam each descends from, beam after beam."""
        search = self.search
        if chunk_index == 0:
            n = search.first_chunk_candidates
            return [self.seed + j for j in range(n)], [0] * n
        b = search.children_per_beam
        parents = [k for k in range(len(beam_last_seeds)) for _ in range(b)]
        if search.noise_mode == "official":
            return upstream_seeds(self.seed, chunk_index, beam_last_seeds, b, search.first_chunk_candidates), parents
        seeds = []
        for last in beam_last_seeds:
            for j in range(b):
                if j == 0:
                    seeds.append(last)  # the first child reuses its beam's last seed
                else:
                    seeds.append(self._next_seed)
                    self._next_seed += 1
        return seeds, parents

    def hybrid_weight(self, chunk_index: int) -> float:
        """Share of the short-term score in the hybrid one (the executor blends the score tensors with it)."""
        f = self.chunk_frames
        return hybrid_weight(chunk_index * f, self.num_chunks * f, f, self.search.fusion_cap)

    def select(self, hybrid: list[float] | None, n: int) -> list[int]:
        """Survivors among ``n`` candidates: the best hybrid scores, best first (ties to the lower index); the
        first ones without rewards; a seeded random draw, in candidate order, without reward pruning."""
        k = min(self.search.survivors, n)
        if hybrid is None:
            return list(range(k))
        if not self.search.reward_pruning:
            return sorted(self._rng.sample(range(n), k))
        return sorted(range(n), key=lambda i: (-hybrid[i], i))[:k]

    def route(self, chunk_index: int, short_history: list[float], last_long: float | None, short: float | None,
              long: float | None) -> RouteFlag:
        """Memory-sink flag of a survivor from its scores and its parent beam's history."""
        search = self.search
        if not search.sinks_memory or chunk_index == 0 or short is None:
            return RouteFlag.DISCARD
        # "lineage" (upstream): mean over every earlier chunk of the lineage; "window": the last W chunks only
        recent = short_history if search.short_history == "lineage" else short_history[-search.window_chunks:]
        short_high = bool(recent) and short - sum(recent) / len(recent) > search.short_threshold
        long_low = last_long is not None and last_long - long > search.long_threshold
        if short_high and not long_low:
            return RouteFlag.EMA
        if short_high and long_low:
            return RouteFlag.APPEND
        return RouteFlag.DISCARD

    @staticmethod
    def final_pick(scores: list[float]) -> int:
        """The beam whose whole video scores best; ties go to the lower beam."""
        return max(range(len(scores)), key=lambda i: (scores[i], -i))
