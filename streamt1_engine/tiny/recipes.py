"""Named training recipes of the embedded tiny model: the options of each stage, in one place.

``v1`` is the run behind the weights shipped until now (stage 1 from scratch, stage 2 continued from it).
``v2`` trains for motion: clips of 8 chunks (24 frames, long enough for objects to bounce), part of each
batch seeing the model's own chunks as context, a loss weighting frame-to-frame change and the change
across chunk boundaries, and the benchmark's held-out scenes kept out of the data. Stage 2 always needs
``--init`` (the stage-1 model dir).

Sizing: at 1 thread a v2 step costs 1.14x a v1 step without own-chunk context, 1.6x with a quarter of the
batch on its own context and 1.8x with half (the v1 run did 1800 steps in 24.6 min on 2 cores, 0.82 s a
step), so about 1.2 s and 1.45 s a step: stage 1 (2600 steps) and stage 2 (2200) take about 52 and 53
minutes there; ``minutes`` stops either at an hour. 64x64 frames (``frame_size=64``) cost about 11x a v1
step, some 400 steps an hour: out of this budget.
"""
from __future__ import annotations

from ..errors import require

RECIPES: dict[str, tuple[dict, ...]] = {
    "v1": (
        {},
        {"seed": 1, "lr": 1e-3, "steps": 3000, "minutes": 60},
    ),
    "v2": (
        {"clip_chunks": 8, "batch": 8, "steps": 2600, "minutes": 60, "lr": 2e-3, "hold_out": True,
         "motion_weight": 2.0, "temporal_weight": 1.0, "context_rollout_prob": 0.25, "rollout_after": 0.3,
         "rewards": {"short": "procedural_frame", "long": "procedural_video_motion"}},
        {"clip_chunks": 8, "batch": 8, "steps": 2200, "minutes": 60, "lr": 1e-3, "seed": 1, "hold_out": True,
         "motion_weight": 2.0, "temporal_weight": 1.0, "context_rollout_prob": 0.5, "rollout_after": 0.0,
         "context_rollout_start": 1, "rewards": {"short": "procedural_frame", "long": "procedural_video_motion"}},
    ),
}


def recipe_stage(name: str, stage: int) -> dict:
    """The ``train()`` options of ``stage`` (1-based) of recipe ``name``."""
    require(name in RECIPES, f"unknown training recipe {name!r}; choose one of {sorted(RECIPES)}")
    stages = RECIPES[name]
    require(1 <= stage <= len(stages), f"recipe {name!r} has stages 1..{len(stages)}, not {stage}")
    return dict(stages[stage - 1])
