"""Held-out metrics of the quality bench v2, written apart from the engine's rewards and ``tiny/metrics.py``.

No reward the search can be given computes any of these. Every metric takes one video ``[T, 3, H, W]`` in
[0, 1] and its prompt and returns a float (NaN where the prompt does not define it):

- ``seam_ratio``: mean absolute frame change across chunk boundaries over the mean change within chunks
  (1 = boundaries look like any other frame step; the procedural ground truth is about 1);
- ``spurious_blobs``: foreground blobs per frame beyond the objects the prompt names (0 is right);
- ``signed_speed``: px/frame the named objects move along their named direction over the first steps
  (before the ground truth can bounce);
- ``square_fill``: pixels of a named square over its bounding box (1 for a square, about 0.79 for a disc).

Plus the paired, prompt-clustered bootstrap the bench uses for its confidence intervals.
"""
from __future__ import annotations

import math
import random

import torch

from streamt1_engine.tiny.procedural import DIRECTIONS, PALETTE, parse_prompt

METRICS = ("signed_speed", "seam_ratio", "square_fill", "spurious_blobs")
HIGHER_IS_BETTER = {"signed_speed": True, "seam_ratio": False, "square_fill": True, "spurious_blobs": False}
SPEED_STEPS = 4  # the procedural scenes leave room for 4 steps of motion before the first bounce
BLOB_DISTANCE = 0.3  # RGB distance from the frame's modal colour that makes a pixel foreground
MIN_BLOB = 4  # pixels; smaller specks are not counted as blobs


def foreground(video: torch.Tensor) -> torch.Tensor:
    """bool [T, H, W]: pixels far from their frame's modal colour (colours rounded to 1/8), the background."""
    q = (video.clamp(0, 1) * 8).round().long()  # [T, 3, H, W], 9 levels per channel
    code = (q[:, 0] * 81 + q[:, 1] * 9 + q[:, 2]).flatten(1)  # [T, H*W]
    counts = torch.zeros(code.shape[0], 729, dtype=torch.long).scatter_add_(1, code, torch.ones_like(code))
    mode = counts.argmax(1)
    bg = torch.stack([mode // 81, mode // 9 % 9, mode % 9], dim=1).float() / 8  # [T, 3]
    return (video - bg[:, :, None, None]).norm(dim=1) > BLOB_DISTANCE


def count_blobs(mask: torch.Tensor, min_pixels: int = MIN_BLOB) -> int:
    """4-connected components of at least ``min_pixels`` in a bool mask [H, W] (breadth-first search)."""
    h, w = mask.shape
    seen = [[False] * w for _ in range(h)]
    cells = mask.tolist()
    blobs = 0
    for y in range(h):
        for x in range(w):
            if not cells[y][x] or seen[y][x]:
                continue
            size, queue = 0, [(y, x)]
            seen[y][x] = True
            while queue:
                cy, cx = queue.pop()
                size += 1
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and cells[ny][nx] and not seen[ny][nx]:
                        seen[ny][nx] = True
                        queue.append((ny, nx))
            blobs += size >= min_pixels
    return blobs


def colour_pixels(video: torch.Tensor, colour: str, fg: torch.Tensor | None = None) -> torch.Tensor:
    """bool [T, H, W]: foreground pixels whose nearest palette colour is ``colour``."""
    names = list(PALETTE)
    pal = torch.tensor([PALETTE[n] for n in names])
    nearest = (video.permute(0, 2, 3, 1)[..., None, :] - pal).norm(dim=-1).argmin(-1)
    return (foreground(video) if fg is None else fg) & (nearest == names.index(colour))


def seam_ratio(video: torch.Tensor, prompt: str, chunk_frames: int) -> float:
    change = (video[1:] - video[:-1]).abs().mean(dim=(1, 2, 3))  # [T-1]: step i is frame i -> i+1
    boundary = torch.zeros_like(change, dtype=torch.bool)
    boundary[chunk_frames - 1::chunk_frames] = True
    if not boundary.any() or boundary.all():
        return float("nan")
    eps = 1e-4  # a still video has no seams: ratio 1
    return float((change[boundary].mean() + eps) / (change[~boundary].mean() + eps))


def spurious_blobs(video: torch.Tensor, prompt: str, chunk_frames: int) -> float:
    named = len(parse_prompt(prompt).objects)
    fg = foreground(video)
    return sum(max(0, count_blobs(m) - named) for m in fg) / len(fg)


def signed_speed(video: torch.Tensor, prompt: str, chunk_frames: int) -> float:
    objects = [(c, d) for c, _, d in parse_prompt(prompt).objects if c and d]
    if not objects or video.shape[0] < 2:
        return float("nan")
    speeds = []
    for colour, direction in objects:
        mask = colour_pixels(video[:SPEED_STEPS + 1], colour).float()
        area = mask.flatten(1).sum(-1)
        if bool((area < MIN_BLOB).any()):  # the object is missing in a frame: it did not move as named
            speeds.append(0.0)
            continue
        h, w = mask.shape[1:]
        cx = (mask.sum(1) * torch.arange(w)).sum(-1) / area
        cy = (mask.sum(2) * torch.arange(h)).sum(-1) / area
        dx, dy = DIRECTIONS[direction]
        along = cx * dx + cy * dy
        speeds.append(float((along[-1] - along[0]) / (len(along) - 1)))
    return sum(speeds) / len(speeds)


def square_fill(video: torch.Tensor, prompt: str, chunk_frames: int) -> float:
    squares = [c for c, s, _ in parse_prompt(prompt).objects if c and s == "square"]
    if not squares:
        return float("nan")
    fills = []
    for colour in squares:
        per_frame = []
        for m in colour_pixels(video, colour):
            ys, xs = m.nonzero(as_tuple=True)
            if len(ys) < MIN_BLOB:
                continue
            box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
            per_frame.append(len(ys) / box)
        fills.append(float(torch.tensor(per_frame).median()) if per_frame else 0.0)
    return sum(fills) / len(fills)


def video_scores(video: torch.Tensor, prompt: str, chunk_frames: int) -> dict[str, float]:
    """All held-out metrics of one video [T, 3, H, W] in [0, 1]."""
    video = video.float().clamp(0, 1)
    return {name: globals()[name](video, prompt, chunk_frames) for name in METRICS}


def inject_seam(video: torch.Tensor, chunk_frames: int, shift: int = 3) -> torch.Tensor:
    """A copy with every chunk after the first rolled ``shift`` px further right than the one before: a
    synthetic seam at every chunk boundary (for checking that the metrics flag one)."""
    out = video.clone()
    for k, start in enumerate(range(chunk_frames, video.shape[0], chunk_frames), start=1):
        out[start:start + chunk_frames] = torch.roll(video[start:start + chunk_frames], k * shift, dims=-1)
    return out


def paired_bootstrap(deltas: dict[str, list[float]], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean paired difference and its bootstrap interval, resampling prompts (each with all its seeds):
    ``deltas`` maps a prompt to the paired differences of its seeds; NaNs are dropped, as are prompts left
    empty. Returns (mean, low, high); NaNs when nothing is left, and NaN bounds with a single prompt (one
    cluster says nothing about how prompts vary)."""
    clusters = [[d for d in v if not math.isnan(d)] for v in deltas.values()]
    clusters = [c for c in clusters if c]
    if not clusters:
        return float("nan"), float("nan"), float("nan")
    total = sum(sum(c) for c in clusters) / sum(len(c) for c in clusters)
    if len(clusters) < 2:
        return total, float("nan"), float("nan")
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        pick = [clusters[rng.randrange(len(clusters))] for _ in clusters]
        means.append(sum(sum(c) for c in pick) / sum(len(c) for c in pick))
    means.sort()
    tail = (1 - level) / 2
    low = means[int(math.floor(tail * (resamples - 1)))]
    high = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return total, low, high

