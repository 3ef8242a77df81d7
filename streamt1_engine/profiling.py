"""Named ranges around the algorithm's stages: NVTX for profiler timelines (if the optional ``nvtx``
package is present) and wall-clock totals per stage for the run record."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

try:  # optional dependency
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None


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
