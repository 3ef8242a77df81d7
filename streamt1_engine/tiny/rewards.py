"""The procedural metrics as rewards (the reward protocol of ``streamt1_engine.rewards``).

``ProceduralFrameReward`` (kind "image") scores what a single frame shows: background colour, named
object colours, shapes, crispness. ``ProceduralVideoReward`` (kind "video") adds what needs the clip:
object persistence and smooth motion. Direction agreement and flicker are deliberately left out so that
benchmarks can report them as held-out metrics. Terms the prompt does not define (say, no colour named)
are skipped; crispness needs no prompt, so every prompt gets a score.
"""
from __future__ import annotations

import torch

from ..errors import StreamT1Error
from . import metrics
from .procedural import parse_prompt

FRAME_TERMS = ("background", "colour", "shape", "crispness")
VIDEO_TERMS = FRAME_TERMS + ("persistence", "smoothness")
HELD_OUT_TERMS = ("direction", "flicker")
ALL_TERMS = VIDEO_TERMS + HELD_OUT_TERMS


def term_scores(frames: torch.Tensor, prompt: str, terms) -> dict[str, torch.Tensor]:
    """Each requested term as a score in [0, 1] per video (NaN when the prompt does not define it)."""
    frames = metrics._as_videos(frames)
    spec = parse_prompt(prompt)
    tracks = metrics.object_tracks(frames, spec)
    out = {}
    for term in terms:
        if term == "background":
            out[term] = metrics.background_fidelity(frames, spec)
        elif term == "colour":
            out[term] = metrics.colour_fidelity(frames, spec, tracks)
        elif term == "shape":
            out[term] = metrics.shape_fidelity(frames, spec, tracks, soft=True)
        elif term == "crispness":
            out[term] = metrics.crispness(frames)
        elif term == "persistence":
            out[term] = metrics.persistence(frames, spec, tracks)
        elif term == "smoothness":
            out[term] = metrics.smoothness(frames, spec, tracks)
        elif term == "direction":
            out[term] = metrics.direction_agreement(frames, spec, tracks)
        elif term == "flicker":
            out[term] = torch.exp(-metrics.flicker(frames) / 0.03)
        else:
            raise StreamT1Error(f"unknown procedural reward term {term!r}; known: {', '.join(ALL_TERMS)}")
    return out


class ProceduralPromptReward:
    """Mean of the chosen metric terms (each in [0, 1], higher = better) for the prompt's scene."""

    def __init__(self, terms=VIDEO_TERMS, weights: dict | None = None, name: str | None = None):
        terms = tuple(terms)
        if not terms:
            raise StreamT1Error("a procedural reward needs at least one term")
        unknown = [t for t in terms if t not in ALL_TERMS]
        if unknown:
            raise StreamT1Error(f"unknown procedural reward terms {unknown}; known: {', '.join(ALL_TERMS)}")
        self.terms = terms
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in terms}
        self.kind = "image" if set(terms) <= set(FRAME_TERMS) else "video"
        self.name = name or "procedural[" + ",".join(terms) + "]"

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[2] != 3:
            raise StreamT1Error(f"reward {self.name!r} expects frames [N, T, 3, H, W]")
        if self.kind == "image":  # score every frame on its own, then average over time
            n, t = frames.shape[:2]
            return self._score(frames.flatten(0, 1)[:, None], prompt).view(n, t).mean(dim=1)
        return self._score(frames, prompt)

    def _score(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        scores = term_scores(frames, prompt, self.terms)
        total = torch.zeros(frames.shape[0], device=frames.device)
        weight = torch.zeros(frames.shape[0], device=frames.device)
        for term, value in scores.items():
            defined = ~torch.isnan(value)
            w = self.weights[term]
            total = total + torch.where(defined, value * w, torch.zeros_like(value))
            weight = weight + defined.float() * w
        return (total / weight.clamp_min(1e-6)).float()

    def __repr__(self) -> str:
        return f"ProceduralPromptReward({self.terms}, kind={self.kind!r})"


class ProceduralFrameReward(ProceduralPromptReward):
    """Short-term reward: what each frame shows (kind "image")."""

    def __init__(self):
        super().__init__(FRAME_TERMS, name="procedural_frame")


class ProceduralVideoReward(ProceduralPromptReward):
    """Long-term reward: frame terms plus persistence and smooth motion over the clip (kind "video")."""

    def __init__(self):
        super().__init__(VIDEO_TERMS, name="procedural_video")


MOTION_SHARE = 0.25  # share of the motion verifier in "procedural_video_motion"


def video_motion_reward():
    """Long-term reward that also checks the prompted motion: 0.75 x procedural_video + 0.25 x
    procedural_motion (still in [0, 1])."""
    from ..rewards.base import WeightedSum
    from .motion_reward import ProceduralMotionReward

    return WeightedSum([(ProceduralVideoReward(), 1 - MOTION_SHARE), (ProceduralMotionReward(), MOTION_SHARE)],
                       name="procedural_video_motion")


def _register() -> None:
    """Let reward specs name these ("procedural_frame", "procedural_video", "procedural_motion",
    "procedural_video_motion"), e.g. in the model's config."""
    try:
        from ..rewards import register_reward
    except ImportError:
        return
    from .motion_reward import ProceduralMotionReward

    register_reward("procedural_frame", ProceduralFrameReward)
    register_reward("procedural_video", ProceduralVideoReward)
    register_reward("procedural_motion", ProceduralMotionReward)
    register_reward("procedural_video_motion", video_motion_reward)


_register()
