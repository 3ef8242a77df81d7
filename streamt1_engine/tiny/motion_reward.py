"""A direction-aware motion verifier for the embedded model: does each object move the way the prompt says?

For every object the prompt names with a colour and a direction ("a red circle moving left ..."), the
pixels of that colour are located in each frame and their centroid is followed. Each frame-to-frame step
is scored by its signed displacement along the object's current heading, in units of ``speed`` px/frame,
clipped to [-1, 1]: the heading starts as the named direction and flips when the object reaches the
frame edge ahead of it (the procedural world bounces objects off the edges), and steps taken while the
object touches that edge are not scored. The score is ``(1 + mean step score) / 2``: 1 moves as named,
0.5 stands still (or cannot be found), 0 moves the opposite way. Prompts without a direction get 0.5.

It is deliberately its own code, apart from ``metrics.py`` and from the benchmark's metrics: a reward
the search optimises must not be the yardstick that judges it.
"""
from __future__ import annotations

import torch

from ..errors import StreamT1Error
from .procedural import DIRECTIONS, PALETTE, parse_prompt

COLOUR_DISTANCE = 0.3  # RGB distance to the named colour that counts a pixel as the object
MIN_PIXELS = 6  # fewer pixels of the named colour: the object is not found in that frame
EDGE_MARGIN = 0.5  # px between the object's leading edge and the frame edge that counts as touching it,
EDGE_SLACK = 0.3  # plus this share of its half extent, plus the step it just made


def colour_centroids(frames: torch.Tensor, colour: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For videos [N, T, 3, H, W]: centroid (x, y) [N, T, 2] of the pixels near ``colour`` that are not
    background, their count [N, T], and half of their extent along x and y [N, T, 2]."""
    n, t, _, h, w = frames.shape
    target = torch.tensor(PALETTE[colour], device=frames.device).view(1, 1, 3, 1, 1)
    background = frames.flatten(3).median(dim=3).values[..., None, None]  # objects cover well under half
    near = (frames - target).norm(dim=2) < COLOUR_DISTANCE
    far_from_background = (frames - background).norm(dim=2) > COLOUR_DISTANCE
    mask = (near & far_from_background).float()  # [N, T, H, W]
    count = mask.flatten(2).sum(-1)
    xs = torch.arange(w, device=frames.device, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=frames.device, dtype=torch.float32) + 0.5
    cols, rows = mask.sum(dim=2), mask.sum(dim=3)  # [N, T, W], [N, T, H]
    denom = count.clamp_min(1)
    centre = torch.stack([(cols * xs).sum(-1) / denom, (rows * ys).sum(-1) / denom], dim=-1)

    def half_extent(profile, coords):
        on = profile > 0
        low = torch.where(on, coords, torch.full_like(profile, float("inf"))).amin(-1)
        high = torch.where(on, coords, torch.full_like(profile, float("-inf"))).amax(-1)
        return torch.where(on.any(-1), (high - low + 1) / 2, torch.zeros_like(low))

    half = torch.stack([half_extent(cols, xs), half_extent(rows, ys)], dim=-1)
    return centre, count, half


def heading_step_scores(centre: torch.Tensor, found: torch.Tensor, half: torch.Tensor, direction: str,
                        size: tuple[int, int], speed: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step (T - 1 of them) of each video: the clipped signed displacement along the current heading
    [N, T-1] and whether the step is scored [N, T-1]. ``size`` is (height, width)."""
    dx, dy = DIRECTIONS[direction]
    axis = 0 if dx else 1
    sign = dx if dx else dy
    extent = size[1] if axis == 0 else size[0]
    pos, reach = centre[..., axis], half[..., axis]  # [N, T]
    n, t = pos.shape
    heading = torch.full((n,), float(sign), device=pos.device)
    tracking = torch.ones(n, dtype=torch.bool, device=pos.device)
    advanced = torch.zeros(n, dtype=torch.bool, device=pos.device)  # moved along the heading since it was set
    scores, scored = [], []

    def touches(j, towards, moved):
        # a shape turns when its bounding circle would leave the frame: up to a step plus the difference
        # between that circle and its visible extent before its pixels reach the edge
        gap = torch.where(towards > 0, extent - (pos[:, j] + reach[:, j]), pos[:, j] - reach[:, j])
        return found[:, j] & (gap <= EDGE_MARGIN + EDGE_SLACK * reach[:, j] + moved)

    for i in range(t - 1):
        step = (pos[:, i + 1] - pos[:, i]) * heading
        moved = step.abs()
        valid = found[:, i] & found[:, i + 1] & tracking
        near_ahead = touches(i, heading, moved) | touches(i + 1, heading, moved)
        back = valid & (step < 0)
        scored.append(valid & ~near_ahead)
        scores.append((step / speed).clamp(-1, 1))
        # a bounce: turning at the edge ahead after moving towards it (so an object that starts at an edge
        # and moves away from it, against the prompt, is not excused as bouncing)
        bounce = back & near_ahead & advanced
        # reaching the edge behind, moving against the heading, contradicts the prompt's world: the
        # heading is unknown from then on and no later step is scored
        tracking = tracking & ~(back & ~near_ahead & touches(i + 1, -heading, moved))
        advanced = torch.where(bounce, torch.zeros_like(advanced), advanced | (valid & ~near_ahead & (step > 0)))
        heading = torch.where(bounce, -heading, heading)
    return torch.stack(scores, dim=1), torch.stack(scored, dim=1)


class ProceduralMotionReward:
    """Video reward in [0, 1]: the named objects move in the named directions (see the module doc)."""

    kind = "video"

    def __init__(self, speed: float = 1.0, name: str = "procedural_motion"):
        if not speed > 0:
            raise StreamT1Error(f"motion reward speed must be > 0 px/frame, got {speed!r}")
        self.speed = float(speed)
        self.name = name

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[2] != 3:
            raise StreamT1Error(f"reward {self.name!r} expects frames [N, T, 3, H, W]")
        frames = frames.float().clamp(0, 1)
        n, t = frames.shape[:2]
        objects = [(c, d) for c, _, d in parse_prompt(prompt).objects if c is not None and d is not None]
        if not objects or t < 2:
            return torch.full((n,), 0.5, device=frames.device)
        per_object = []
        for colour, direction in objects:
            centre, count, half = colour_centroids(frames, colour)
            steps, scored = heading_step_scores(centre, count >= MIN_PIXELS, half, direction,
                                                tuple(frames.shape[3:]), self.speed)
            total = scored.float().sum(1)
            mean = (steps * scored.float()).sum(1) / total.clamp_min(1)
            per_object.append((1 + torch.where(total > 0, mean, torch.zeros_like(mean))) / 2)
        return torch.stack(per_object).mean(dim=0)

    def __repr__(self) -> str:
        return f"ProceduralMotionReward(speed={self.speed})"
