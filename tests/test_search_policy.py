"""The search policy alone: scripted host scores in, seeds, survivors, route flags and weights out.

No model and no tensors. Every expected value is written out from Stream-T1's rules: upstream seeds
``seed + i`` at chunk 0 and ``seed + 1000*chunk + 100*beam + i`` for child ``i >= 1`` later (child 0 reuses
its beam's last seed), portable seeds numbered consecutively after the first chunk's, the top K hybrid
scores survive best first (ties to the lower candidate), routing compares the short score with the lineage mean and
the long score with the parent's, ``a = min(cap, start / (total - chunk))``.
"""
import random
from dataclasses import dataclass, field

import pytest

from streamt1_engine.cache import RouteFlag
from streamt1_engine.search.config import SearchConfig
from streamt1_engine.search.policy import SearchPolicy

D, E, A = RouteFlag.DISCARD, RouteFlag.EMA, RouteFlag.APPEND


def stream_t1(**overrides) -> SearchConfig:
    return SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, **overrides)


@dataclass
class HostBeam:
    """What the executor keeps per beam that the policy reads."""

    seed: int
    short_history: list = field(default_factory=list)
    last_long: float | None = None


def run_script(policy: SearchPolicy, script):
    """Drive the policy chunk by chunk as the executor does; returns (seeds, parents, survivors, flags) per chunk."""
    beams, seen = [HostBeam(seed=-1)], []
    for c, (short, long, hybrid) in enumerate(script):
        seeds, parents = policy.candidates(c, [b.seed for b in beams] if c > 0 else [])
        survivors = policy.select(hybrid, len(seeds))
        flags, new_beams = [], []
        for i in survivors:
            parent = beams[parents[i]]
            flags.append(policy.route(c, parent.short_history, parent.last_long, short[i], long[i]))
            new_beams.append(HostBeam(seeds[i], parent.short_history + [short[i]], long[i]))
        beams = new_beams
        seen.append((seeds, parents, survivors, flags))
    return seen


# three chunks of B=2, K=2; values are exact binary fractions so the threshold comparisons are exact
SCRIPT = [
    # chunk 0: hybrid = long (weight 0); candidates 3 then 2 survive (best first); no routing at chunk 0
    ([0.5, 0.25, 0.75, 0.0], [0.25, 0.5, 0.75, 1.0], [0.25, 0.5, 0.75, 1.0]),
    # chunk 1: survivors 1 (parent beam 0 = candidate 3: short 1.0 > mean 0.0, long 0.5 dropped 0.5 > 0.2
    # -> APPEND) and 2 (parent beam 1 = candidate 2: short 1.0 > mean 0.75, long 0.625 dropped 0.125 -> EMA)
    ([0.0, 1.0, 1.0, 0.0], [0.0, 0.5, 0.625, 0.0], [0.125, 0.875, 0.75, 0.25]),
    # chunk 2: 2 best, then the tie 0/1 goes to 0. Candidate 2 (beam 1, lineage [0.75, 1.0], mean 0.875):
    # short 1.0 is above it, long 0.375 dropped 0.25 from 0.625 -> APPEND; candidate 0 (beam 0, lineage
    # [0.0, 1.0], mean 0.5): short 0.5 is not above it -> DISCARD
    ([0.5, 0.0, 1.0, 0.0], [0.5, 0.0, 0.375, 0.0], [0.375, 0.375, 0.625, 0.125]),
]


def test_scripted_stream_official_numbering():
    seen = run_script(SearchPolicy(stream_t1(noise_mode="official"), seed=42, num_chunks=3, chunk_frames=3), SCRIPT)
    assert seen == [
        ([42, 43, 44, 45], [0, 0, 0, 0], [3, 2], [D, D]),
        ([45, 1043, 44, 1143], [0, 0, 1, 1], [1, 2], [A, E]),
        ([1043, 2043, 44, 2143], [0, 0, 1, 1], [2, 0], [A, D]),
    ]


def test_scripted_stream_portable_numbering():
    seen = run_script(SearchPolicy(stream_t1(noise_mode="portable"), seed=42, num_chunks=3, chunk_frames=3), SCRIPT)
    assert seen == [
        ([42, 43, 44, 45], [0, 0, 0, 0], [3, 2], [D, D]),
        ([45, 46, 44, 47], [0, 0, 1, 1], [1, 2], [A, E]),
        ([46, 48, 44, 49], [0, 0, 1, 1], [2, 0], [A, D]),
    ]


def test_scripted_stream_without_memory_sinking_routes_nothing():
    seen = run_script(SearchPolicy(stream_t1(memory_sinking=False), seed=42, num_chunks=3, chunk_frames=3), SCRIPT)
    assert [flags for *_, flags in seen] == [[D, D], [D, D], [D, D]]
    assert [survivors for _, _, survivors, _ in seen] == [[3, 2], [1, 2], [2, 0]]  # selection is unchanged


@pytest.mark.parametrize("mode,chunk1,chunk2", [
    ("official", [7, 1008, 1009, 1010], [1009, 2008, 2009, 2010]),
    ("portable", [7, 11, 12, 13], [12, 14, 15, 16]),
])
def test_seeds_of_best_of_n_and_wide_beams(mode, chunk1, chunk2):
    policy = SearchPolicy(SearchConfig(strategy="best_of_n", num_candidates=4, noise_mode=mode), seed=7,
                          num_chunks=3, chunk_frames=3)
    assert policy.candidates(0, []) == ([7, 8, 9, 10], [0, 0, 0, 0])
    assert policy.candidates(1, [7]) == (chunk1, [0, 0, 0, 0])
    assert policy.candidates(2, [chunk1[2]]) == (chunk2, [0, 0, 0, 0])

    wide = SearchPolicy(SearchConfig(strategy="stream_t1", beam_size=3, top_k=2, noise_mode="official"), seed=0,
                        num_chunks=4, chunk_frames=3)
    assert wide.candidates(0, []) == ([0, 1, 2, 3, 4, 5], [0] * 6)
    assert wide.candidates(3, [4, 1]) == ([4, 3001, 3002, 1, 3101, 3102], [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("mode", ["official", "portable"])
def test_plain_streaming_has_one_candidate_reusing_its_seed(mode):
    policy = SearchPolicy(SearchConfig(strategy="none", noise_mode=mode), seed=5, num_chunks=3, chunk_frames=3)
    assert policy.candidates(0, []) == ([5], [0])
    assert policy.candidates(1, [5]) == ([5], [0])
    assert policy.select(None, 1) == [0]
    assert policy.route(1, [], None, None, None) == D


def test_selection_rules():
    policy = SearchPolicy(stream_t1(), seed=0, num_chunks=3, chunk_frames=3)
    assert policy.select([0.25, 0.5, 0.125, 0.5], 4) == [1, 3]
    assert policy.select([0.25, 0.75, 0.75, 0.75], 4) == [1, 2]  # ties go to the lower candidate
    assert policy.select([-1.0, -3.0, -2.0, -0.5], 4) == [3, 0]  # best first: beam 0 is the best
    assert policy.select(None, 4) == [0, 1]  # no rewards: the first K
    assert policy.select([0.5], 1) == [0]  # fewer candidates than K

    unpruned = SearchPolicy(stream_t1(reward_pruning=False), seed=3, num_chunks=3, chunk_frames=3)
    rng = random.Random(3)
    for _ in range(3):  # a seeded draw in candidate order, independent of the scores, advancing every chunk
        assert unpruned.select([0.0, 1.0, 2.0, 3.0], 4) == sorted(rng.sample(range(4), 2))


def test_routing_rules():
    policy = SearchPolicy(stream_t1(), seed=0, num_chunks=8, chunk_frames=3)  # thresholds 0.0 and 0.2
    history = [0.25, 0.75]  # lineage mean 0.5
    assert policy.route(0, history, 1.0, 0.75, 1.0) == D  # never at chunk 0
    assert policy.route(2, history, 1.0, 0.75, 0.875) == E  # short high, long dropped 0.125 <= 0.2
    assert policy.route(2, history, 1.0, 0.75, 0.75) == A  # short high, long dropped 0.25 > 0.2
    assert policy.route(2, history, 1.0, 0.5, 0.5) == D  # short equals the mean: not high
    assert policy.route(2, history, None, 0.75, 0.0) == E  # no earlier long score: long cannot drop
    assert policy.route(2, history, 1.0, None, None) == D  # no scores
    assert policy.route(2, [], 1.0, 0.75, 0.0) == D  # no history to compare with

    thresholds = SearchPolicy(stream_t1(short_threshold=0.25, long_threshold=0.5), seed=0, num_chunks=8,
                              chunk_frames=3)
    assert thresholds.route(2, history, 1.0, 0.75, 0.75) == D  # 0.25 above the mean is not > 0.25
    assert thresholds.route(2, history, 1.0, 0.875, 0.75) == E  # long dropped 0.25, not > 0.5
    assert thresholds.route(2, history, 1.0, 0.875, 0.25) == A

    # window history: only the last W short scores form the baseline
    long_lineage = [4.0, 0.0, 0.0]  # lineage mean 1.333..., last-two mean 0.0
    lineage = SearchPolicy(stream_t1(window_chunks=2), seed=0, num_chunks=8, chunk_frames=3)
    window = SearchPolicy(stream_t1(window_chunks=2, short_history="window"), seed=0, num_chunks=8, chunk_frames=3)
    assert lineage.route(3, long_lineage, 0.5, 0.5, 0.5) == D
    assert window.route(3, long_lineage, 0.5, 0.5, 0.5) == E
    assert window.route(3, long_lineage, 1.0, 0.5, 0.5) == A

    for other in (SearchConfig(strategy="best_of_n"), stream_t1(memory_sinking=False)):
        assert SearchPolicy(other, seed=0, num_chunks=8, chunk_frames=3).route(2, history, 1.0, 0.75, 0.75) == D


def test_hybrid_weight_grows_with_the_chunk_and_is_capped():
    policy = SearchPolicy(stream_t1(), seed=0, num_chunks=5, chunk_frames=3)  # 15 frames: a = start / 12
    assert [policy.hybrid_weight(c) for c in range(5)] == [0.0, 0.25, 0.4, 0.4, 0.4]
    uncapped = SearchPolicy(stream_t1(fusion_cap=1.0), seed=0, num_chunks=5, chunk_frames=3)
    assert [uncapped.hybrid_weight(c) for c in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert SearchPolicy(stream_t1(), seed=0, num_chunks=1, chunk_frames=3).hybrid_weight(0) == 0.0


def test_final_pick_is_the_best_whole_video():
    assert SearchPolicy.final_pick([0.25, 0.75]) == 1
    assert SearchPolicy.final_pick([0.5, 0.75, 0.75]) == 1  # ties go to the lower beam
    assert SearchPolicy.final_pick([-1.0, -2.0]) == 0
    assert SearchPolicy.final_pick([3.0]) == 0
