"""Named training recipes of the embedded tiny model: the options of each stage, in one place.

``v1`` is the run behind the weights shipped before v2 (stage 1 from scratch, stage 2 continued from it).
``v2`` trains for motion with the benchmark's held-out scenes kept out of the data. Stage 1 (from
scratch): clips of 8 chunks (24 frames, long enough for objects to bounce), a quarter of each batch seeing
the model's own chunks as context from 30 % of the run on, a loss weighting frame-to-frame change and one
on the change across chunk boundaries. Stage 2 (``--init`` the stage-1 dir; always needed): teacher forcing
only, clips of 4 chunks and batches of 16 (twice the scenes a step), the same two losses. Stage 3 (``--init``
the stage-2 dir): stage 2 again at half the learning rate, with the sampler's timestep shift lowered from 5
to 1.5 (``sampler_shift``), so that its four steps end at noise 0.33 rather than 0.63 and the training
timesteps follow them. The three stages are the shipped weights (bench/results/tiny-v2-training-2026-12-01.md).

Why stage 2 drops the model's own context: regressing on the true next chunk after an own-context chunk
teaches the model to jump back to the truth at every chunk boundary. On the bench's held-out prompts
(12 x 1 seed x 4 chunks, no search) stage 1 ended at seam ratio 1.48; ten minutes of the own-context
stage 2 first planned here (half of each batch) left it at 1.48, ten minutes of teacher forcing brought it
to 1.24.

Why stage 3 lowers the shift: the last x0 estimate of a few-step sampler is a regression from its last
noisy input, blurred by what that noise hides. Run with shift 1.5, the stage-2 weights already had fewer
seams and spurious blobs on a validation set of training scenes; 40 minutes at that shift took the seam
ratio from 1.20 to 1.12 there.

Sizing (2 cores, 2 threads): stage 1 ran 2409 steps in its 60 minutes (1.5 s a step, own context from
30 %), stage 2 1658 steps in 40 minutes, stage 3 1784 steps in 40 minutes. 64x64 frames
(``frame_size=64``) cost about 11x a v1 step, some 400 steps an hour: out of this budget.
"""
from __future__ import annotations

from ..errors import require

V2_STAGE_2 = {"clip_chunks": 4, "batch": 16, "steps": 3000, "minutes": 40, "lr": 1e-3, "seed": 1, "hold_out": True,
              "motion_weight": 2.0, "temporal_weight": 1.0,
              "rewards": {"short": "procedural_frame", "long": "procedural_video_motion"}}

RECIPES: dict[str, tuple[dict, ...]] = {
    "v1": (
        {},
        {"seed": 1, "lr": 1e-3, "steps": 3000, "minutes": 60},
    ),
    "v2": (
        {"clip_chunks": 8, "batch": 8, "steps": 2600, "minutes": 60, "lr": 2e-3, "hold_out": True,
         "motion_weight": 2.0, "temporal_weight": 1.0, "context_rollout_prob": 0.25, "rollout_after": 0.3,
         "rewards": {"short": "procedural_frame", "long": "procedural_video_motion"}},
        V2_STAGE_2,
        {**V2_STAGE_2, "lr": 5e-4, "sampler_shift": 1.5},  # stage 2 again, the sampler's steps ending lower
    ),
}


def recipe_stage(name: str, stage: int) -> dict:
    """The ``train()`` options of ``stage`` (1-based) of recipe ``name``."""
    require(name in RECIPES, f"unknown training recipe {name!r}; choose one of {sorted(RECIPES)}")
    stages = RECIPES[name]
    require(1 <= stage <= len(stages), f"recipe {name!r} has stages 1..{len(stages)}, not {stage}")
    return dict(stages[stage - 1])
