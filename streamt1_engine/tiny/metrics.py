"""Quality metrics of procedural-style videos, computed from frames and the prompt alone.

The prompt grammar is closed, so a prompt says exactly what must be seen: the background colour, and
per object its colour, shape and direction. Every metric is batched over N videos ``[N, T, 3, H, W]``
in [0, 1] and returns one value per video (higher is better except ``flicker``):

- ``background``: the per-frame median colour against the named background colour;
- ``colour``: each named object colour is present (enough pixels) and the foreground consists of the
  named colours;
- ``shape``: the largest blob of an object's colour is classified by its fill of the bounding box and its
  vertical mass offset (square ~1.0, circle ~0.79, apex-up triangle ~0.56 and bottom-heavy);
- ``persistence``: each object stays one blob of stable area;
- ``smoothness``: small second differences of each object's centroid trajectory;
- ``direction``: the first steps of each trajectory go the named way;
- ``flicker``: mean absolute change of background pixels between consecutive frames;
- ``crispness``: share of pixels close to some palette colour (needs no prompt).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .procedural import DIRECTIONS, PALETTE, PromptSpec, parse_prompt

PALETTE_NAMES = tuple(PALETTE)
# (fill of the bounding box, vertical offset of the centroid in box heights) of the rendered shapes
SHAPE_FEATURES = {"circle": (0.79, 0.0), "square": (1.0, 0.0), "triangle": (0.56, 0.15)}
FOREGROUND_DISTANCE = 0.25  # RGB distance from the background colour that makes a pixel foreground
MIN_OBJECT_PIXELS = 12  # fewer pixels of a colour than this do not count as an object
DIRECTION_STEPS = 4  # trajectory steps checked against the named direction (before any bounce)


def palette(device=None) -> torch.Tensor:
    return torch.tensor([PALETTE[name] for name in PALETTE_NAMES], device=device)


def _as_videos(frames: torch.Tensor) -> torch.Tensor:
    if frames.dim() == 4:
        frames = frames[None]
    return frames.float().clamp(0, 1)


def background_colour(frames: torch.Tensor) -> torch.Tensor:
    """[N, T, 3]: per-frame median colour (objects cover well under half of a frame)."""
    return frames.flatten(3).median(dim=3).values


def foreground_mask(frames: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
    """bool [N, T, H, W]: pixels far from the frame's background colour."""
    if background is None:
        background = background_colour(frames)
    return (frames - background[..., None, None]).norm(dim=2) > FOREGROUND_DISTANCE


def nearest_palette(frames: torch.Tensor) -> torch.Tensor:
    """long [N, T, H, W]: index into PALETTE_NAMES of the nearest palette colour of every pixel."""
    pal = palette(frames.device)
    d = (frames.movedim(2, -1)[..., None, :] - pal).norm(dim=-1)
    return d.argmin(dim=-1)


def connected_components(mask: torch.Tensor, max_iters: int = 64) -> torch.Tensor:
    """long [M, H, W] labels (0 = off, else a component id) with 8-connectivity, batched over M masks."""
    h, w = mask.shape[1:]
    ids = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, h, w)
    labels = torch.where(mask, ids, ids.new_zeros(()))
    maskf = mask.float()
    for _ in range(max_iters):
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * maskf
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def _components(mask: torch.Tensor):
    """For masks [M, H, W]: the largest component's mask [M, H, W] and the number of components of at
    least 3 pixels [M]."""
    m, h, w = mask.shape
    labels = connected_components(mask).flatten(1)
    counts = torch.zeros(m, h * w + 1, device=mask.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    counts[:, 0] = 0
    largest = counts.argmax(dim=1)
    big = (counts >= 3).sum(dim=1)
    largest_mask = (labels == largest[:, None]) & (labels > 0)
    return largest_mask.view(m, h, w), big


class ObjectTracks:
    """Per named object and frame: pixel masks of its colour, the largest blob and its geometry."""

    def __init__(self, frames: torch.Tensor, colour_index: int):
        n, t, _, h, w = frames.shape
        background = background_colour(frames)
        fg = foreground_mask(frames, background)
        self.mask = fg & (nearest_palette(frames) == colour_index)  # [N, T, H, W]
        blob, count = _components(self.mask.flatten(0, 1))
        self.blob = blob.view(n, t, h, w)
        self.count = count.view(n, t)
        self.area = self.mask.flatten(2).sum(-1).float()  # [N, T]
        self.blob_area = self.blob.flatten(2).sum(-1).float()
        self.present = self.blob_area >= MIN_OBJECT_PIXELS
        ys = torch.arange(h, device=frames.device, dtype=torch.float32).view(1, 1, h, 1)
        xs = torch.arange(w, device=frames.device, dtype=torch.float32).view(1, 1, 1, w)
        b = self.blob.float()
        denom = self.blob_area.clamp_min(1)
        self.centroid = torch.stack([(b * xs).flatten(2).sum(-1) / denom, (b * ys).flatten(2).sum(-1) / denom], -1)
        rows, cols = b.amax(dim=3), b.amax(dim=2)  # [N, T, H], [N, T, W]
        top = _first_index(rows)
        bottom = h - 1 - _first_index(rows.flip(-1))
        left = _first_index(cols)
        right = w - 1 - _first_index(cols.flip(-1))
        box_h = (bottom - top + 1).clamp_min(1).float()
        box_w = (right - left + 1).clamp_min(1).float()
        self.fill = self.blob_area / (box_h * box_w)
        self.offset = (self.centroid[..., 1] - (top + bottom).float() / 2) / box_h


def _first_index(x: torch.Tensor) -> torch.Tensor:
    """Index of the first nonzero entry along the last dim (the length when there is none)."""
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device).expand_as(x)
    return torch.where(x > 0, idx, torch.full_like(idx, n)).amin(-1)


def _undefined(frames: torch.Tensor) -> torch.Tensor:
    """NaN per video: the prompt does not name what the metric needs."""
    return torch.full((frames.shape[0],), float("nan"), device=frames.device)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, empty: float = 0.0) -> torch.Tensor:
    """Mean over the last dim of ``values`` where ``mask``; ``empty`` where nothing is selected."""
    mask = mask.float()
    total = mask.sum(-1)
    mean = (values * mask).sum(-1) / total.clamp_min(1)
    return torch.where(total > 0, mean, torch.full_like(mean, empty))


def background_fidelity(frames: torch.Tensor, spec: PromptSpec) -> torch.Tensor:
    frames = _as_videos(frames)
    if spec.background is None:
        return _undefined(frames)
    target = torch.tensor(PALETTE[spec.background], device=frames.device)
    d = (background_colour(frames) - target).norm(dim=-1)  # [N, T]
    return (1 - d / 0.5).clamp(0, 1).mean(dim=1)


def colour_fidelity(frames: torch.Tensor, spec: PromptSpec, tracks: dict | None = None) -> torch.Tensor:
    """Mean over frames of (share of named objects present) x (share of foreground in the named colours)."""
    frames = _as_videos(frames)
    colours = [c for c, _, _ in spec.objects if c is not None]
    if not colours:
        return _undefined(frames)
    tracks = tracks or object_tracks(frames, spec)
    fg = foreground_mask(frames).flatten(2).sum(-1).float()
    named = sum(tracks[c].area for c in dict.fromkeys(colours))
    present = torch.stack([tracks[c].present.float() for c in colours]).mean(dim=0)
    purity = torch.where(fg > 0, named / fg.clamp_min(1), torch.zeros_like(fg))
    return (present * purity).mean(dim=1)


def shape_scores(tracks: ObjectTracks, shape: str, soft: bool = True) -> torch.Tensor:
    """[N, T] probability-like score (soft) or 0/1 correctness that the object's blob has ``shape``."""
    feats = torch.stack([tracks.fill, tracks.offset * 2], -1)  # offset weighted up: it separates triangles
    targets = torch.tensor([(f, o * 2) for f, o in SHAPE_FEATURES.values()], device=feats.device)
    d2 = (feats[..., None, :] - targets).pow(2).sum(-1)  # [N, T, 3]
    named = list(SHAPE_FEATURES).index(shape)
    if soft:
        return torch.softmax(-d2 / 0.01, dim=-1)[..., named]
    return (d2.argmin(-1) == named).float()


def shape_fidelity(frames: torch.Tensor, spec: PromptSpec, tracks: dict | None = None, soft: bool = False):
    """Share of frames (where the object is present and not occluded) whose blob has the named shape."""
    frames = _as_videos(frames)
    objects = [(c, s) for c, s, _ in spec.objects if c is not None and s is not None]
    if not objects:
        return _undefined(frames)
    tracks = tracks or object_tracks(frames, spec)
    per_object = []
    for colour, shape in objects:
        tr = tracks[colour]
        typical = tr.blob_area.median(dim=1, keepdim=True).values
        usable = tr.present & (tr.blob_area >= 0.7 * typical) & (tr.count == 1)
        per_object.append(_masked_mean(shape_scores(tr, shape, soft), usable))
    return torch.stack(per_object).mean(dim=0)


def persistence(frames: torch.Tensor, spec: PromptSpec, tracks: dict | None = None) -> torch.Tensor:
    """Each object is one blob in every frame and keeps its area: mean of (share of frames with exactly
    one blob) and (1 - coefficient of variation of the area)."""
    frames = _as_videos(frames)
    tracks = tracks or object_tracks(frames, spec)
    scores = []
    for tr in tracks.values():
        single = ((tr.count == 1) & tr.present).float().mean(dim=1)
        area = tr.blob_area
        cv = area.std(dim=1) / area.mean(dim=1).clamp_min(1)
        stable = torch.where(area.mean(dim=1) >= MIN_OBJECT_PIXELS, (1 - cv).clamp(0, 1), torch.zeros_like(cv))
        scores.append(0.5 * single + 0.5 * stable)
    if not scores:
        return _undefined(frames)
    return torch.stack(scores).mean(dim=0)


def smoothness(frames: torch.Tensor, spec: PromptSpec, tracks: dict | None = None) -> torch.Tensor:
    """mean exp(-|second difference of the centroid| / 2 px) over frames where the object is present."""
    frames = _as_videos(frames)
    tracks = tracks or object_tracks(frames, spec)
    scores = []
    for tr in tracks.values():
        c, p = tr.centroid, tr.present
        if c.shape[1] < 3:
            continue
        accel = (c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).norm(dim=-1)
        valid = p[:, 2:] & p[:, 1:-1] & p[:, :-2]
        scores.append(_masked_mean(torch.exp(-accel / 2.0), valid))
    if not scores:
        return _undefined(frames)
    return torch.stack(scores).mean(dim=0)


def direction_agreement(frames: torch.Tensor, spec: PromptSpec, tracks: dict | None = None) -> torch.Tensor:
    """Over the first steps: 1 when the object moves >= 0.5 px/frame the named way, 0.5 when it stands
    still, 0 when it moves the opposite way (later steps may legitimately reverse after a bounce)."""
    frames = _as_videos(frames)
    objects = [(c, d) for c, _, d in spec.objects if c is not None and d is not None]
    if not objects or frames.shape[1] < 2:
        return _undefined(frames)
    tracks = tracks or object_tracks(frames, spec)
    scores = []
    for colour, direction in objects:
        tr = tracks[colour]
        steps = min(DIRECTION_STEPS, frames.shape[1] - 1)
        v = tr.centroid[:, 1:steps + 1] - tr.centroid[:, :steps]
        d = torch.tensor(DIRECTIONS[direction], device=frames.device)
        along = ((v * d).sum(-1) / 0.5).clamp(-1, 1)
        valid = tr.present[:, 1:steps + 1] & tr.present[:, :steps]
        scores.append(_masked_mean((1 + along) / 2, valid))
    return torch.stack(scores).mean(dim=0)


def flicker(frames: torch.Tensor) -> torch.Tensor:
    """Mean absolute frame-to-frame change of pixels that are background in both frames (lower = better)."""
    frames = _as_videos(frames)
    if frames.shape[1] < 2:
        return torch.zeros(frames.shape[0], device=frames.device)
    fg = foreground_mask(frames)
    fg = F.max_pool2d(fg.float().flatten(0, 1)[:, None], 3, 1, 1)[:, 0].view_as(fg) > 0  # ignore edges
    bg = ~(fg[:, 1:] | fg[:, :-1])
    diff = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=2)
    return _masked_mean(diff.flatten(1), bg.flatten(1), empty=1.0)


def crispness(frames: torch.Tensor) -> torch.Tensor:
    """Share of pixels within 0.2 of a palette colour: flat, clean colours rather than blur or noise."""
    frames = _as_videos(frames)
    d = (frames.movedim(2, -1)[..., None, :] - palette(frames.device)).norm(dim=-1).amin(-1)
    return (d < 0.2).float().flatten(1).mean(dim=1)


def object_tracks(frames: torch.Tensor, spec: PromptSpec) -> dict:
    """Tracks of every named colour; with no colour named, one track of the dominant foreground colour."""
    frames = _as_videos(frames)
    colours = [c for c, _, _ in spec.objects if c is not None]
    if not colours:
        return {}
    return {c: ObjectTracks(frames, PALETTE_NAMES.index(c)) for c in dict.fromkeys(colours)}


METRIC_NAMES = ("background", "colour", "shape", "persistence", "smoothness", "direction", "flicker", "crispness")


def video_metrics(frames: torch.Tensor, prompt: str | PromptSpec) -> dict[str, torch.Tensor]:
    """All metrics for videos [N, T, 3, H, W] (or one video [T, 3, H, W]) of one prompt: name -> [N]."""
    frames = _as_videos(frames)
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    tracks = object_tracks(frames, spec)
    return {
        "background": background_fidelity(frames, spec),
        "colour": colour_fidelity(frames, spec, tracks),
        "shape": shape_fidelity(frames, spec, tracks),
        "persistence": persistence(frames, spec, tracks),
        "smoothness": smoothness(frames, spec, tracks),
        "direction": direction_agreement(frames, spec, tracks),
        "flicker": flicker(frames),
        "crispness": crispness(frames),
    }
