"""The reward plug-in contract, adapters around it, and the short/long hybrid of Stream-T1.

A reward scores all candidates of a chunk in one batched call on the device: ``reward(frames, prompt)`` with
frames float ``[N, T, 3, H, W]`` in [0, 1] returns float32 scores ``[N]`` on the same device, higher = better.
``kind`` says what the reward looks at: ``"image"`` rewards score every frame on its own and average over T,
``"video"`` rewards see the whole clip.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from ..errors import StreamT1Error

KINDS = ("image", "video")


@runtime_checkable
class Reward(Protocol):
    name: str
    kind: str

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        """frames float [N, T, 3, H, W] in [0, 1] -> float32 scores [N] on frames.device (higher = better)."""
        ...


def check_frames(frames: torch.Tensor, who: str) -> None:
    """Reject inputs that are not float [N, T, 3, H, W] video batches, naming the reward that got them."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or frames.shape[2] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise StreamT1Error(f"reward {who!r} expects frames [N, T, 3, H, W], got {shape}")
    if not frames.is_floating_point():
        raise StreamT1Error(f"reward {who!r} expects float frames in [0, 1], got {frames.dtype}")


class ImageReward:
    """Base for image rewards: subclasses score a flat batch of images; frames are averaged over T here."""

    name = "image_reward"
    kind = "image"

    def score_images(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """images float [M, 3, H, W] in [0, 1] -> scores [M]."""
        raise NotImplementedError

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        check_frames(frames, self.name)
        n, t = frames.shape[:2]
        per_frame = self.score_images(frames.flatten(0, 1), prompt)
        return per_frame.float().reshape(n, t).mean(dim=1)


class CallableReward:
    """Wrap a user function as a reward.

    ``kind="video"``: ``fn(frames [N, T, 3, H, W], prompt) -> [N]``.
    ``kind="image"``: ``fn(images [M, 3, H, W], prompt) -> [M]``, called once on all N*T frames and averaged over T.
    """

    def __init__(self, fn: Callable[[torch.Tensor, str], torch.Tensor], name: str | None = None,
                 kind: str = "video"):
        if not callable(fn):
            raise StreamT1Error(f"reward must be callable, got {type(fn).__name__}")
        if kind not in KINDS:
            raise StreamT1Error(f"reward kind must be one of {KINDS}, got {kind!r}")
        self.fn = fn
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)
        self.kind = kind

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        check_frames(frames, self.name)
        if self.kind == "video":
            return _as_scores(self.fn(frames, prompt), frames.shape[0], self.name)
        n, t = frames.shape[:2]
        per_frame = _as_scores(self.fn(frames.flatten(0, 1), prompt), n * t, self.name)
        return per_frame.reshape(n, t).mean(dim=1)

    def __repr__(self) -> str:
        return f"CallableReward({self.name!r}, kind={self.kind!r})"


def _as_scores(scores, count: int, name: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (count,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise StreamT1Error(f"reward {name!r} must return a tensor of shape [{count}], got {got}")
    return scores.float()


def reward_name(reward) -> str:
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


def score(reward, frames: torch.Tensor, prompt: str, check_finite: bool = True) -> torch.Tensor:
    """Call ``reward`` and enforce the contract: float32 ``[N]`` on frames.device, finite.

    The finiteness check reads one flag back from the device; pass ``check_finite=False`` to keep the call
    free of host syncs.
    """
    name = reward_name(reward)
    check_frames(frames, name)
    scores = _as_scores(reward(frames, prompt), frames.shape[0], name)
    if scores.device != frames.device:
        raise StreamT1Error(f"reward {name!r} returned scores on {scores.device}, frames are on {frames.device}")
    if check_finite and not bool(torch.isfinite(scores).all()):
        raise StreamT1Error(f"reward {name!r} returned non-finite scores")
    return scores


class WeightedSum:
    """``sum_i w_i * reward_i(frames, prompt)``; a video reward as soon as one part sees the whole clip."""

    def __init__(self, parts: Sequence[tuple[object, float]], name: str | None = None):
        parts = list(parts)
        if not parts:
            raise StreamT1Error("WeightedSum needs at least one (reward, weight) pair")
        for part in parts:
            if not (isinstance(part, (tuple, list)) and len(part) == 2 and callable(part[0])
                    and isinstance(part[1], (int, float))):
                raise StreamT1Error(f"WeightedSum parts must be (reward, weight) pairs, got {part!r}")
        self.parts = [(reward, float(weight)) for reward, weight in parts]
        self.kind = "image" if all(getattr(r, "kind", "video") == "image" for r, _ in self.parts) else "video"
        self.name = name or " + ".join(f"{w:g}*{reward_name(r)}" for r, w in self.parts)

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        check_frames(frames, self.name)
        total = None
        for reward, weight in self.parts:
            term = weight * _as_scores(reward(frames, prompt), frames.shape[0], reward_name(reward))
            total = term if total is None else total + term
        return total

    def __repr__(self) -> str:
        return f"WeightedSum({self.name!r})"


def hybrid_weight(start_frame: int, total_frames: int, chunk_frames: int, cap: float = 0.4) -> float:
    """Share of the short-term reward: grows with the chunk's position in the video, capped at ``cap``.

    ``a = min(cap, start_frame / (total_frames - chunk_frames))``, and 0 when that denominator is <= 0
    (a single-chunk video has no "later" chunks to favour).
    """
    denominator = total_frames - chunk_frames
    if denominator <= 0:
        return 0.0
    return float(min(cap, start_frame / denominator))


def hybrid_score(short, long, a: float):
    """``a * short + (1 - a) * long``; works on floats and on score tensors alike."""
    return a * short + (1.0 - a) * long
