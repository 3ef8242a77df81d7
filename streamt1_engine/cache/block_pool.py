"""Host bookkeeping of the shared KV pages: one block pool for every stream of an engine.

The device pool (``KVPool``) holds the pages; this holds, per page, its reference count, memory-sink flag and
first latent frame, and the free list (vLLM's block pool). Each stream's cache rules (``PagedKVCache``) take and
return pages here, so several streams share one pool and a finished stream's pages are free at once.
"""
from __future__ import annotations

import enum

import torch

from ..config import WanConfig
from ..errors import StreamT1Error, require
from .kv_pool import KVPool


class RouteFlag(enum.IntEnum):
    """What happens to a chunk's page when it leaves the rolling window (Stream-T1 memory sinking)."""

    DISCARD = 0
    EMA = 1
    APPEND = 2


class BlockPool:
    """Reference-counted pages of one ``KVPool``; all host ints, changed once per chunk."""

    def __init__(self, kv: KVPool):
        self.kv = kv
        n = kv.num_pages
        self.refcount = [0] * n
        self.flag = [RouteFlag.DISCARD] * n
        self.frame_pos = [0] * n  # host mirror of kv.page_frame_pos
        self._free = list(range(n - 1, -1, -1))  # stack: lowest page id first

    @classmethod
    def allocate(cls, model_cfg: WanConfig, num_pages: int, page_tokens: int, device, dtype) -> "BlockPool":
        return cls(KVPool.allocate(model_cfg, num_pages, page_tokens, device, dtype))

    @property
    def num_pages(self) -> int:
        return self.kv.num_pages

    @property
    def page_tokens(self) -> int:
        return self.kv.k.shape[2]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - len(self._free)

    def reset(self) -> None:
        """Forget every page (contents stay; they are overwritten before being read again)."""
        n = self.num_pages
        self.refcount[:] = [0] * n
        self.flag[:] = [RouteFlag.DISCARD] * n
        self.frame_pos[:] = [0] * n
        self._free = list(range(n - 1, -1, -1))

    def alloc(self) -> int:
        if not self._free:
            raise StreamT1Error(f"KV page pool exhausted ({self.num_pages} pages); raise num_pages")
        page = self._free.pop()
        self.refcount[page] = 1
        self.flag[page] = RouteFlag.DISCARD
        return page

    def retain(self, page: int) -> None:
        require(self.refcount[page] > 0, f"page {page} is not allocated")
        self.refcount[page] += 1

    def release(self, page: int) -> None:
        require(self.refcount[page] > 0, f"page {page} released twice")
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            self._free.append(page)

    def grow(self, num_pages: int, stage_on=None) -> None:
        """A larger device pool; page ids and contents stay (callers rebuild anything that holds the old
        pool's tensors, e.g. captured CUDA graphs, and must hold no other reference to them).

        ``stage_on``: a device (the host) that holds the old pages while the pool is replaced: the old device
        pool is freed before the new one is allocated, so the device never holds both (a 20 -> 80 page growth
        peaks at 80 pages, not 100). None: copied device to device (a CPU pool: staging would not save memory).
        The kernels read one K/V tensor with a page table, so a grown pool is one new tensor, not an extra slab."""
        old = self.kv
        extra = num_pages - old.num_pages
        if extra <= 0:
            return
        shape = list(old.k.shape)
        shape[1] = num_pages
        n_old, device, dtype, cos, sin = old.num_pages, old.k.device, old.k.dtype, old.frame_cos, old.frame_sin
        if stage_on is not None:
            old_k, old_v, old_pos = (_stage(t, stage_on) for t in (old.k, old.v, old.page_frame_pos))
            self.kv = old = None  # the last references: the device pages are free before the new ones exist
        else:
            old_k, old_v, old_pos = old.k, old.v, old.page_frame_pos
        try:
            k, v = _new_pages(shape, device, dtype), _new_pages(shape, device, dtype)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            k = v = None
            if stage_on is not None:  # the old pages go back: the running streams keep the pool they had
                self.kv = KVPool(old_k.to(device), old_v.to(device), old_pos.to(device), cos, sin)
            raise StreamT1Error(f"growing the KV pool from {n_old} to {num_pages} pages ran out of memory on "
                                f"{device}; the pool keeps its {n_old} pages") from None
        k[:, :n_old].copy_(old_k)
        v[:, :n_old].copy_(old_v)
        pos = torch.zeros(num_pages, device=device, dtype=old_pos.dtype)
        pos[:n_old].copy_(old_pos)
        del old_k, old_v, old_pos, old
        self.kv = KVPool(k, v, pos, cos, sin)
        self.refcount.extend([0] * extra)
        self.flag.extend([RouteFlag.DISCARD] * extra)
        self.frame_pos.extend([0] * extra)
        # new ids go below the existing stack so the lowest free id still comes first
        self._free[:0] = list(range(num_pages - 1, n_old - 1, -1))

    def set_frame_pos(self, pages: list[int], frame_start: int) -> torch.Tensor:
        """Record the first frame of freshly written pages (host and device); returns their ids on the device."""
        for p in pages:
            self.frame_pos[p] = frame_start
        ids = torch.tensor(pages, dtype=torch.long, device=self.kv.k.device)
        self.kv.page_frame_pos.index_fill_(0, ids, frame_start)
        return ids


def _new_pages(shape, device, dtype) -> torch.Tensor:
    """Every allocation of a grown pool goes through here (tests count what growth allocates)."""
    return torch.zeros(shape, device=device, dtype=dtype)


def _stage(t: torch.Tensor, device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` (pinned host memory for a CUDA tensor: a fast copy back)."""
    if t.is_cuda and torch.device(device).type == "cpu":
        try:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        except RuntimeError:  # no pinnable memory left: pageable host memory is slower, not wrong
            pass
    return t.to(device, copy=True)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)
