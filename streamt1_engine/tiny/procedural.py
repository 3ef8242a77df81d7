"""Procedural videos of coloured shapes: the training data and the ground truth of the tiny model.

Every sample is a pure function of (seed, index): a plain background, one or two shapes (circle, square,
triangle) that move left/right/up/down, bounce off the frame edges and sometimes change speed, and a
prompt from a small grammar that names them ("a red circle moving left on a blue background").
Because the grammar is closed, prompts can be parsed back into what a video must show, which is what
the metrics in ``metrics.py`` check.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from ..errors import require

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.65, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "white")
BACKGROUND_COLOURS = ("black", "white", "gray", "blue", "green", "purple")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0),
                                              "up": (0.0, -1.0), "down": (0.0, 1.0)}
GRAMMAR_WORDS = ("a", "an", "the", "moving", "and", "on", "background")
VOCABULARY = tuple(dict.fromkeys(GRAMMAR_WORDS + tuple(PALETTE) + SHAPES + tuple(DIRECTIONS)))


@dataclass
class ObjectSpec:
    """One moving shape: what the prompt says about it plus its hidden motion parameters."""

    colour: str
    shape: str
    direction: str
    size: float  # half-extent in pixels
    start: tuple[float, float]  # (x, y) centre in pixels at frame 0
    speed: float  # pixels per frame
    speed_change_frame: int  # frame at which the speed switches to speed * speed_factor (large = never)
    speed_factor: float = 1.0


@dataclass
class SceneSpec:
    background: str
    objects: list[ObjectSpec] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        parts = [f"a {o.colour} {o.shape} moving {o.direction}" for o in self.objects]
        return " and ".join(parts) + f" on a {self.background} background"


@dataclass
class ProceduralSample:
    frames: torch.Tensor  # float [T, 3, H, W] in [0, 1]
    prompt: str
    scene: SceneSpec
    times: torch.Tensor  # long [T], the frame index in the scene's timeline of each frame
    positions: torch.Tensor  # float [num_objects, T, 2], (x, y) centre of each object per frame
    visible: torch.Tensor  # float [num_objects, T, H, W], pixels each object covers after occlusion


def trajectory(obj: ObjectSpec, num_steps: int, width: int, height: int) -> torch.Tensor:
    """[num_steps, 2] centre positions, frame by frame, reflecting off the frame edges."""
    x, y = obj.start
    dx, dy = DIRECTIONS[obj.direction]
    e = obj.size
    out = []
    for step in range(num_steps):
        out.append((x, y))
        speed = obj.speed * (obj.speed_factor if step >= obj.speed_change_frame else 1.0)
        x, y = x + dx * speed, y + dy * speed
        if x - e < 0:
            x, dx = 2 * e - x, -dx
        elif x + e > width:
            x, dx = 2 * (width - e) - x, -dx
        if y - e < 0:
            y, dy = 2 * e - y, -dy
        elif y + e > height:
            y, dy = 2 * (height - e) - y, -dy
    return torch.tensor(out, dtype=torch.float32)


def shape_mask(shape: str, centres: torch.Tensor, size: float, height: int, width: int) -> torch.Tensor:
    """float [T, H, W] in {0, 1}: pixels whose centre lies inside the shape at each of ``centres`` [T, 2]."""
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
    dx = xs - centres[:, 0, None, None]
    dy = ys - centres[:, 1, None, None]
    if shape == "circle":
        inside = dx * dx + dy * dy <= size * size
    elif shape == "square":
        half = size * 0.85  # about the area of the circle of the same size
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "triangle":
        # apex up, base down: the half width grows linearly from 0 at the apex to ``size`` at the base
        frac = (dy + size) / (2 * size)
        inside = (frac >= 0) & (frac <= 1) & (dx.abs() <= frac * size)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.float()


def random_scene(rng: random.Random, width: int = 32, height: int = 32, two_object_prob: float = 0.3,
                 speed_change_prob: float = 0.1, room_steps: int = 4) -> SceneSpec:
    """A scene with 1-2 objects placed anywhere that leaves ``room_steps`` frames of motion before the
    first bounce (so they visibly move as named); overlapping objects occlude each other.

    Placement is (nearly) translation invariant on purpose: a RoPE-only DiT has no absolute position
    signal when it starts from pure noise, so "starts at the left edge" is a prior it cannot learn,
    while "somewhere" it can."""
    background = rng.choice(BACKGROUND_COLOURS)
    scale = min(width, height) / 32  # sizes and speeds are drawn for 32x32 frames
    count = 2 if rng.random() < two_object_prob else 1
    objects: list[ObjectSpec] = []
    for _ in range(count):
        taken = {background} | {o.colour for o in objects}
        colour = rng.choice([c for c in OBJECT_COLOURS if c not in taken])
        shape = rng.choice(SHAPES)
        direction = rng.choice(tuple(DIRECTIONS))
        size = rng.uniform(4.75, 5.75) * scale
        speed = rng.uniform(1.25, 1.75) * scale
        dx, dy = DIRECTIONS[direction]
        along_extent, across_extent = (width, height) if dx else (height, width)
        room = room_steps * speed
        low, high = size, along_extent - size
        low, high = (low + room, high) if (dx < 0 or dy < 0) else (low, high - room)
        along = rng.uniform(low, high)
        across = rng.uniform(size, across_extent - size)
        start = (along, across) if dx else (across, along)
        change = rng.randrange(3, 12) if rng.random() < speed_change_prob else 10 ** 6
        objects.append(ObjectSpec(colour, shape, direction, size, start, speed, change, rng.choice((0.5, 1.5))))
    return SceneSpec(background, objects)


# Scenes never drawn for training when ``hold_out`` is on (no object of a training scene has one of these
# colour/shape/direction/background combinations), so benchmarks can ask for prompts the model never saw.
# Every colour, shape, direction and background still occurs in training, only not in these combinations.
HELD_OUT_SCENES = (
    ("red", "square", "right", "black"), ("green", "circle", "up", "gray"), ("blue", "triangle", "left", "white"),
    ("yellow", "circle", "down", "purple"), ("purple", "square", "left", "gray"), ("cyan", "square", "up", "white"),
    ("white", "triangle", "down", "blue"), ("red", "triangle", "up", "green"), ("green", "square", "down", "black"),
    ("yellow", "triangle", "right", "blue"), ("cyan", "circle", "right", "purple"),
    ("white", "square", "left", "green"),
)
HELD_OUT_PROMPTS = tuple(f"a {c} {s} moving {d} on a {b} background" for c, s, d, b in HELD_OUT_SCENES)


def is_held_out(scene: SceneSpec) -> bool:
    """Some object of ``scene`` has one of the held-out combinations (such scenes are not trained on)."""
    return any((o.colour, o.shape, o.direction, scene.background) in HELD_OUT_SCENES for o in scene.objects)


def render(scene: SceneSpec, times: torch.Tensor, width: int = 32, height: int = 32):
    """Frames float [T, 3, H, W], positions [num_objects, T, 2] and per-object visible masks at ``times``."""
    steps = int(times.max()) + 1
    frames = torch.tensor(PALETTE[scene.background]).view(1, 3, 1, 1).repeat(len(times), 1, height, width)
    positions, masks = [], []
    for obj in scene.objects:
        pos = trajectory(obj, steps, width, height)[times]
        mask = shape_mask(obj.shape, pos, obj.size, height, width)
        colour = torch.tensor(PALETTE[obj.colour]).view(1, 3, 1, 1)
        frames = frames * (1 - mask[:, None]) + colour * mask[:, None]
        masks = [m * (1 - mask) for m in masks]  # later objects are drawn on top
        positions.append(pos)
        masks.append(mask)
    return frames, torch.stack(positions), torch.stack(masks)


def sample_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2 ** 63)


def make_sample(seed: int, index: int, num_frames: int = 12, width: int = 32, height: int = 32,
                times: torch.Tensor | None = None, two_object_prob: float = 0.3,
                hold_out: bool = False) -> ProceduralSample:
    """Sample ``index`` of the stream with ``seed``: always the same scene, prompt and frames. With
    ``hold_out`` a held-out scene is redrawn from the same generator (other samples stay as they were)."""
    rng = random.Random(sample_seed(seed, index))
    scene = random_scene(rng, width, height, two_object_prob=two_object_prob)
    while hold_out and is_held_out(scene):
        scene = random_scene(rng, width, height, two_object_prob=two_object_prob)
    if times is None:
        times = torch.arange(num_frames)
    frames, positions, visible = render(scene, times, width, height)
    return ProceduralSample(frames, scene.prompt, scene, times, positions, visible)


def streaming_times(rng: random.Random, num_chunks: int, chunk_frames: int, max_gap_chunks: int = 12,
                    gap_prob: float = 0.5) -> torch.Tensor:
    """Frame times of a training clip shaped like a streaming cache. With probability ``gap_prob`` time
    jumps after the first chunk (the sink, once the window has moved on) and sometimes after the second
    too (a chunk appended to the sink by memory sinking); the remaining chunks are consecutive."""
    starts = [0]
    gaps_after = set()
    if rng.random() < gap_prob:
        gaps_after = {0, 1} if num_chunks > 3 and rng.random() < 0.4 else {0}
    for k in range(1, num_chunks):
        gap = chunk_frames * rng.randint(1, max_gap_chunks) if (k - 1) in gaps_after else 0
        starts.append(starts[-1] + chunk_frames + gap)
    return torch.tensor([s + j for s in starts for j in range(chunk_frames)])


def contiguous_chunks(times: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """bool [..., num_chunks]: the chunk directly follows the previous one in time (the first always does).
    Only such chunks are ever generated while streaming; the others are context only."""
    first = times[..., ::chunk_frames]
    prev_last = times[..., chunk_frames - 1::chunk_frames]
    follows = first[..., 1:] == prev_last[..., :-1] + 1
    return torch.cat([torch.ones_like(follows[..., :1]), follows], dim=-1)


class ProceduralVideos:
    """An endless, deterministic stream of procedural samples (``videos[i]``) and training batches."""

    def __init__(self, seed: int = 0, num_frames: int = 12, width: int = 32, height: int = 32,
                 two_object_prob: float = 0.3, hold_out: bool = False):
        require(num_frames >= 1, "num_frames must be >= 1")
        self.seed, self.num_frames, self.width, self.height = seed, num_frames, width, height
        self.two_object_prob = two_object_prob
        self.hold_out = hold_out

    def __getitem__(self, index: int) -> ProceduralSample:
        return make_sample(self.seed, index, self.num_frames, self.width, self.height,
                           two_object_prob=self.two_object_prob, hold_out=self.hold_out)

    def streaming_batch(self, start: int, batch: int, num_chunks: int, chunk_frames: int, gap_prob: float = 0.5):
        """Frames [B, T, 3, H, W], prompts and frame times [B, T] of samples ``start .. start + batch - 1``."""
        frames, prompts, times = [], [], []
        for index in range(start, start + batch):
            rng = random.Random(sample_seed(self.seed, index) ^ 0x5EED)
            t = streaming_times(rng, num_chunks, chunk_frames, gap_prob=gap_prob)
            s = make_sample(self.seed, index, width=self.width, height=self.height, times=t,
                            two_object_prob=self.two_object_prob, hold_out=self.hold_out)
            frames.append(s.frames)
            prompts.append(s.prompt)
            times.append(t)
        return torch.stack(frames), prompts, torch.stack(times)


@dataclass
class PromptSpec:
    """What a prompt asks for; fields the prompt does not mention are None / empty."""

    background: str | None
    objects: list[tuple[str | None, str | None, str | None]]  # (colour, shape, direction)


def tokenize(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a prompt of the procedural grammar, tolerating unknown words: every "<colour> <shape>"
    phrase opens an object, "moving <direction>" sets its direction, "<colour> background" the background."""
    words = tokenize(prompt)
    background = None
    objects: list[list[str | None]] = []
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if word in PALETTE and nxt == "background":
            background = word
        elif word in PALETTE and nxt in SHAPES:
            objects.append([word, nxt, None])
        elif word in SHAPES and (i == 0 or words[i - 1] not in PALETTE):
            objects.append([None, word, None])
        elif word in DIRECTIONS and objects and objects[-1][2] is None:
            objects[-1][2] = word
    return PromptSpec(background, [tuple(o) for o in objects])
