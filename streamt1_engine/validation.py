"""Field checks for the config dataclasses, driven by their type annotations plus a small table of ranges
and choices per class, so a wrong value fails where the config is built, in one line naming the field.

Types: ``int`` (a bool, float or str is refused), ``float`` (an int is accepted and stored as float; NaN and
infinities are refused), ``bool`` (strictly True/False), ``str``, ``tuple[X, ...]`` / ``tuple[X, Y]`` (a list
is accepted and stored as a tuple), ``X | None``. Fields of other types are left to the class.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from functools import lru_cache

from .errors import StreamT1Error, require


@dataclass(frozen=True)
class Range:
    """Inclusive bounds; ``None`` leaves a side open."""

    low: float | None = None
    high: float | None = None

    def check(self, where: str, value) -> None:
        ok = (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        if not ok:
            if self.high is None:
                wanted = f">= {self.low}"
            elif self.low is None:
                wanted = f"<= {self.high}"
            else:
                wanted = f"in [{self.low}, {self.high}]"
            raise StreamT1Error(f"{where} must be {wanted}, got {short_repr(value)}")


def at_least(low) -> Range:
    return Range(low, None)


def between(low, high) -> Range:
    return Range(low, high)


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def check(self, where: str, value) -> None:
        require(value in self.choices, f"{where} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")


def one_of(*choices) -> OneOf:
    return OneOf(tuple(choices))


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(where: str, tp, value):
    """``value`` checked against annotation ``tp``; returns the value to store (lists become tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        rest = [t for t in options if t is not type(None)]
        if len(rest) == 1:
            return _convert(where, rest[0], value)
        return value  # a real union of several types: left to the class
    if tp is bool:
        require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool),
                f"{where} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf
        require(math.isfinite(number), f"{where} must be a finite number, got {short_repr(value)}")
        return number
    if tp is str:
        require(isinstance(value, str), f"{where} must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        require(isinstance(value, (tuple, list)), f"{where} must be a list of values, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{where}[{i}]", args[0], v) for i, v in enumerate(value))
        require(len(value) == len(args), f"{where} must have {len(args)} entries, got {value!r}")
        return tuple(_convert(f"{where}[{i}]", t, v) for i, (t, v) in enumerate(zip(args, value)))
    return value


def short_repr(value) -> str:
    """``repr`` cut short: a refusal stays one readable line whatever number it refuses."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def validate_fields(obj, rules: dict | None = None) -> None:
    """Check (and normalise) every field of dataclass ``obj``; ``rules`` maps field names to a Range/OneOf
    (or a tuple of them; a Range applies to each entry of a tuple field)."""
    cls = type(obj)
    hints = _hints(cls)
    rules = rules or {}
    stray = set(rules) - {f.name for f in dataclasses.fields(obj)}
    assert not stray, f"rules for fields {cls.__name__} does not have: {sorted(stray)}"
    for f in dataclasses.fields(obj):
        where = f"{cls.__name__}.{f.name}"
        value = getattr(obj, f.name)
        tp = hints.get(f.name)
        checked = _convert(where, tp, value) if tp is not None else value
        if checked is not value:
            object.__setattr__(obj, f.name, checked)
        rule = rules.get(f.name)
        if rule is None or checked is None:
            continue
        for r in rule if isinstance(rule, tuple) else (rule,):
            for v in checked if isinstance(checked, tuple) else (checked,):
                r.check(where, v)


def build_config(cls, data, what: str, build=None):
    """``cls(**data)`` for a config section read from a file: an unknown key or a wrong value is one line.
    ``build`` replaces ``cls(**data)`` where the class reads its own file format (e.g. renamed keys)."""
    require(isinstance(data, dict), f"{what} must be a JSON object, got {type(data).__name__}")
    if build is None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        require(not unknown, f"{what} has unknown keys {unknown}; known: {sorted(known)}")
    try:
        return build(data) if build is not None else cls(**data)
    except StreamT1Error as exc:
        raise StreamT1Error(f"{what}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise StreamT1Error(f"{what}: {exc}") from None
