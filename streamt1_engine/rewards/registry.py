"""Build rewards from short specs: ``"name"``, ``"name:path_or_hub_id"``, a dict, a list (summed), or a callable."""
from __future__ import annotations

import inspect
from collections.abc import Callable

from ..errors import StreamT1Error
from ..registry import Registry
from .base import KINDS, CallableReward, WeightedSum
from .builtin import ClipTextAlignment, MotionSmoothness, SharpnessExposure, TemporalConsistency


def default_short_reward() -> WeightedSum:
    """Weight-free short-term reward: per-frame sharpness/exposure plus consistency inside the chunk."""
    return WeightedSum([(SharpnessExposure(), 1.0), (TemporalConsistency(), 1.0)], name="default_short")


def default_long_reward() -> WeightedSum:
    """Weight-free long-term reward: smooth motion plus consistency over the window."""
    return WeightedSum([(MotionSmoothness(), 1.0), (TemporalConsistency(), 1.0)], name="default_long")


def _hpsv3():
    from .models import HPSv3Reward

    return HPSv3Reward


def _videoalign():
    from .models import VideoAlignReward

    return VideoAlignReward


# the reward factories by name; ``takes_path``: whether ``"name:path"`` is accepted (the path is the first argument)
REWARDS = Registry("reward", normalize=lambda name: name.strip().lower())
BUILDERS = REWARDS  # the name this table had before the one registry mechanism
for _name, _factory in (("temporal_consistency", TemporalConsistency), ("motion_smoothness", MotionSmoothness),
                        ("sharpness_exposure", SharpnessExposure), ("default_short", default_short_reward),
                        ("default_long", default_long_reward)):
    REWARDS.register(_name, _factory, builtin=True, takes_path=False)
REWARDS.register("clip", ClipTextAlignment, builtin=True, takes_path=True)
REWARDS.register_lazy("hpsv3", _hpsv3, builtin=True, takes_path=True)
REWARDS.register_lazy("videoalign", _videoalign, builtin=True, takes_path=True)


def register_reward(name: str, factory: Callable, takes_path: bool = False) -> None:
    """Make ``factory`` buildable as ``"name"`` (and ``"name:path"`` when ``takes_path``; the path is passed as
    the first argument). Built-in names cannot be replaced."""
    REWARDS.register(name, factory, takes_path=takes_path)


def known_rewards() -> list[str]:
    return REWARDS.names()


def _is_reward(obj) -> bool:
    return callable(obj) and isinstance(getattr(obj, "name", None), str) and getattr(obj, "kind", None) in KINDS


def build_reward(spec):
    """A reward from ``spec``:

    - ``"temporal_consistency"``, ``"motion_smoothness"``, ``"sharpness_exposure"``, ``"default_short"``,
      ``"default_long"``; ``"clip[:path_or_id]"``, ``"hpsv3[:path_or_id]"``, ``"videoalign[:path_or_id]"``;
    - ``{"name": ..., "path": ..., **constructor options}``;
    - a list of specs or ``(spec, weight)`` pairs -> their weighted sum;
    - a reward object (``name``, ``kind``, callable) as is, or any ``fn(frames, prompt) -> [N]`` (video kind).
    """
    if _is_reward(spec):
        return spec
    if isinstance(spec, str):
        name, _, path = spec.strip().partition(":")
        return _build(name.strip().lower(), path.strip() or None, {})
    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise StreamT1Error(f"reward dict needs a 'name' string, got {spec!r}")
        return _build(name.strip().lower(), options.pop("path", None), options)
    if isinstance(spec, (list, tuple)):
        parts = [_weighted(item) for item in spec]
        if not parts:
            raise StreamT1Error("an empty list is not a reward")
        return WeightedSum(parts)
    if callable(spec):
        return CallableReward(spec)
    raise StreamT1Error(f"cannot build a reward from {type(spec).__name__}; known names: {', '.join(known_rewards())}")


def _weighted(item) -> tuple:
    if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], (int, float)):
        return build_reward(item[0]), float(item[1])
    return build_reward(item), 1.0


def _build(name: str, path, options: dict):
    factory = REWARDS.get(name)
    if path and not REWARDS.info(name)["takes_path"]:
        raise StreamT1Error(f"reward {name!r} takes no path, got {path!r}")
    args = (path,) if path else ()
    try:
        inspect.signature(factory).bind(*args, **options)
    except TypeError as exc:
        raise StreamT1Error(f"bad options for reward {name!r}: {exc}") from None
    return factory(*args, **options)
