"""Named factories for pluggable components, built from small JSON-able specs (``{"type": ..., ...}``)."""
from __future__ import annotations

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


class ComponentRegistry:
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Factory] = {}

    def register(self, type_name: str, factory: Factory) -> None:
        """Accept ``{"type": type_name, ...}`` specs; ``factory(spec, base_dir, device, dtype)``."""
        self._factories[type_name] = factory

    def build(self, spec: dict, base_dir: Path | None = None, device="cpu", dtype: torch.dtype = torch.float32):
        require(isinstance(spec, dict) and "type" in spec, f"{self.kind} spec must be a dict with a 'type'")
        factory = self._factories.get(spec["type"])
        if factory is None:
            raise StreamT1Error(f"unknown {self.kind} type {spec['type']!r} (known: {', '.join(sorted(self._factories))})")
        return factory(spec, base_dir, device, dtype)
