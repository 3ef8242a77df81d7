"""The one registry mechanism behind every pluggable part (text encoders, VAEs, rewards): a name -> factory
table with one way to register, one way to look up and one error message, ``unknown X type 'y' (known: ...)``.
Component registries build from small JSON-able specs (``{"type": ..., ...}``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import StreamT1Error, require

Factory = Callable[[dict, "Path | None", Any, torch.dtype], Any]


def component_path(spec: dict, base_dir: Path | None) -> str:
    """``spec["path"]`` under ``base_dir`` when it exists there, else as given (a path or hub id);
    no path means ``base_dir`` itself (a pipeline dir holding every component)."""
    path = spec.get("path")
    if path is None:
        require(base_dir is not None, f"the {spec.get('type')!r} component spec needs a 'path'")
        return str(base_dir)
    if base_dir is not None and not Path(path).is_absolute() and (Path(base_dir) / path).exists():
        return str(Path(base_dir) / path)
    return str(path)


@dataclass
class _Entry:
    factory: Callable | None
    load: Callable[[], Callable] | None  # a lazy entry: imports its factory on first use
    builtin: bool
    info: dict = field(default_factory=dict)


class Registry:
    """Named factories of one ``kind`` ("text encoder", "VAE", "reward"). Built-in names cannot be replaced;
    ``normalize`` maps names before use (rewards are case-insensitive)."""

    def __init__(self, kind: str, normalize: Callable[[str], str] | None = None):
        self.kind = kind
        self._normalize = normalize
        self._entries: dict[str, _Entry] = {}

    def _key(self, name) -> str:
        require(isinstance(name, str), f"a {self.kind} type name must be a string, got {name!r}")
        return self._normalize(name) if self._normalize is not None else name

    def register(self, name: str, factory: Callable, *, builtin: bool = False, **info) -> Callable:
        """Make ``factory`` buildable under ``name``; ``info`` is kept for the registry's users (e.g. whether a
        reward takes a path). Returns ``factory``."""
        require(callable(factory), f"{self.kind} factory for {name!r} must be callable")
        self._add(name, _Entry(factory, None, builtin, info))
        return factory

    def register_lazy(self, name: str, load: Callable[[], Callable], *, builtin: bool = False, **info) -> None:
        """Like ``register``, but ``load()`` returns the factory on first use (keeps heavy imports lazy)."""
        self._add(name, _Entry(None, load, builtin, info))

    def _add(self, name: str, entry: _Entry) -> None:
        key = self._key(name)
        if not key.strip() or ":" in key or (key in self._entries and self._entries[key].builtin):
            raise StreamT1Error(f"cannot register a {self.kind} type under the name {name!r}"
                                + (" (built in)" if key in self._entries else ""))
        self._entries[key] = entry

    def _entry(self, name) -> _Entry:
        entry = self._entries.get(self._key(name))
        if entry is None:
            raise StreamT1Error(f"unknown {self.kind} type {name!r} (known: {', '.join(self.names())})")
        return entry

    def get(self, name: str) -> Callable:
        """The factory registered under ``name``; an unknown name is one line listing the known ones."""
        entry = self._entry(name)
        if entry.factory is None:
            entry.factory = entry.load()
        return entry.factory

    def info(self, name: str) -> dict:
        return dict(self._entry(name).info)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def pop(self, name: str, default=None):
        """Unregister ``name`` (not a built-in); returns its factory, or ``default`` when it was not there."""
        key = self._key(name)
        entry = self._entries.get(key)
        if entry is None:
            return default
        require(not entry.builtin, f"cannot unregister the built-in {self.kind} type {name!r}")
        del self._entries[key]
        return entry.factory if entry.factory is not None else entry.load

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and self._key(name) in self._entries

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


class ComponentRegistry(Registry):
    """A registry of components built from specs: ``factory(spec, base_dir, device, dtype)``."""

    def build(self, spec: dict, base_dir: Path | None = None, device="cpu", dtype: torch.dtype = torch.float32):
        require(isinstance(spec, dict) and "type" in spec, f"{self.kind} spec must be a dict with a 'type'")
        return self.get(spec["type"])(spec, base_dir, device, dtype)
