"""Named ranges around the algorithm's stages: NVTX for profiler timelines (the optional ``nvtx`` package,
else torch's own NVTX bindings on a CUDA machine) and wall-clock totals per stage for the run record."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class TorchNvtx:
    """torch's built-in NVTX calls with the ``nvtx`` package's interface; ranges land in the default
    domain instead of "streamt1"."""

    @staticmethod
    def push_range(message: str, domain: str | None = None) -> None:
        torch.cuda.nvtx.range_push(message)

    @staticmethod
    def pop_range(domain: str | None = None) -> None:
        torch.cuda.nvtx.range_pop()


try:  # optional dependency
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = TorchNvtx() if torch.cuda.is_available() else None


class StageTimer:
    def __init__(self, use_nvtx: bool = True, synchronize: bool = False):
        self.use_nvtx = use_nvtx and _nvtx is not None
        self.synchronize = synchronize and torch.cuda.is_available()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def range(self, name: str):
        if self.use_nvtx:
            _nvtx.push_range(name, domain="streamt1")
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            if self.use_nvtx:
                _nvtx.pop_range(domain="streamt1")

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": round(v, 6), "calls": self.calls[k]} for k, v in self.seconds.items()}
