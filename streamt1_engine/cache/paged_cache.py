"""Shared paged KV cache: one device pool of chunk-sized pages, host-side page tables per beam.

Beams that descend from the same candidate share pages by reference count; a new chunk takes a free
page; only an EMA merge into a shared sink page copies (copy-on-write). The host owns the bookkeeping
(Python ints, once per chunk); the device sees fixed-shape index tensors, so a chunk's forward never
synchronises and can be replayed as a CUDA graph.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..config import StreamConfig, WanConfig
from ..errors import StreamT1Error, require
from ..kernels.sink_merge import sink_merge_
from .kv_pool import KVPool


class RouteFlag(enum.IntEnum):
    """What happens to a chunk's page when it leaves the rolling window (Stream-T1 memory sinking)."""

    DISCARD = 0
    EMA = 1
    APPEND = 2


@dataclass
class BeamPages:
    """Pages one beam attends to: sink pages first, then the rolling window (oldest first)."""

    sink: list[int] = field(default_factory=list)
    window: list[int] = field(default_factory=list)

    def all_pages(self) -> list[int]:
        return self.sink + self.window


class PagedKVCache:
    def __init__(self, model_cfg: WanConfig, stream_cfg: StreamConfig, num_pages: int, device, dtype,
                 merge_backend: str = "torch"):
        self.stream = stream_cfg
        ph, pw = model_cfg.patch_size[1:]
        require(stream_cfg.latent_height % ph == 0 and stream_cfg.latent_width % pw == 0,
                f"latent size {stream_cfg.latent_height}x{stream_cfg.latent_width} is not divisible by the "
                f"patch size {ph}x{pw}")
        self.frame_tokens = (stream_cfg.latent_height // ph) * (stream_cfg.latent_width // pw)
        self.page_tokens = stream_cfg.chunk_frames * self.frame_tokens
        self.pool = KVPool.allocate(model_cfg, num_pages, self.page_tokens, device, dtype)
        self.merge_backend = merge_backend
        self.refcount = [0] * num_pages
        self.flag = [RouteFlag.DISCARD] * num_pages
        self.frame_pos = [0] * num_pages  # host mirror of pool.page_frame_pos
        self._free = list(range(num_pages - 1, -1, -1))  # stack: lowest page id first
        self._pending_ops: list[tuple[int, int, int, int]] = []
        self._pending_release: list[int] = []

    def reset(self) -> None:
        """Forget every page (contents stay; they are overwritten before being read again)."""
        n = self.pool.num_pages
        self.refcount = [0] * n
        self.flag = [RouteFlag.DISCARD] * n
        self.frame_pos = [0] * n
        self._free = list(range(n - 1, -1, -1))
        self._pending_ops, self._pending_release = [], []

    @staticmethod
    def pages_needed(stream_cfg: StreamConfig, num_beams: int, num_candidates: int) -> int:
        """Worst case: every beam with a private full sink and window, plus one new page per survivor and
        one copy-on-write page per beam during routing."""
        per_beam = stream_cfg.max_sink_pages + stream_cfg.window_pages + 1
        return num_beams * (per_beam + 1) + max(num_candidates - num_beams, 0)

    # -- allocation -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise StreamT1Error(f"KV page pool exhausted ({self.pool.num_pages} pages); raise num_pages")
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

    def fork(self, beam: BeamPages) -> BeamPages:
        for p in beam.all_pages():
            self.retain(p)
        return BeamPages(list(beam.sink), list(beam.window))

    def drop(self, beam: BeamPages) -> None:
        for p in beam.all_pages():
            self.release(p)
        beam.sink.clear()
        beam.window.clear()

    # -- device views -----------------------------------------------------------------------------
    @property
    def max_pages_per_beam(self) -> int:
        return self.stream.max_pages_per_beam

    def page_table(self, beams: list[BeamPages], out: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, max_pages] int32 (-1 padded) and [N] counts; written in place into ``out``/``counts`` if given."""
        width = self.max_pages_per_beam
        rows, lens = [], []
        for b in beams:
            pages = b.all_pages()
            require(len(pages) <= width or not self.stream.is_global,
                    f"global attention covers at most {self.stream.max_stream_frames} latent frames (upstream's "
                    "cache); a longer stream needs local attention (a local_attn_size, e.g. stream preset 'longlive')")
            require(len(pages) <= width, "a beam holds more pages than the table width")
            rows.append(pages + [-1] * (width - len(pages)))
            lens.append(len(pages))
        table = torch.tensor(rows, dtype=torch.int32).reshape(len(beams), width)
        num = torch.tensor(lens, dtype=torch.int32)
        device = self.pool.k.device
        if out is None:
            return table.to(device), num.to(device)
        out.copy_(table, non_blocking=True)
        counts.copy_(num, non_blocking=True)
        return out, counts

    def new_chunk_pages(self, count: int, frame_start: int) -> torch.Tensor:
        """Allocate ``count`` pages for chunks starting at ``frame_start``; returns their ids on the device."""
        pages = [self.alloc() for _ in range(count)]
        for p in pages:
            self.frame_pos[p] = frame_start
        ids = torch.tensor(pages, dtype=torch.long, device=self.pool.k.device)
        self.pool.page_frame_pos.index_fill_(0, ids, frame_start)
        return ids

    # -- commit and memory sinking ----------------------------------------------------------------
    def commit(self, beam: BeamPages, page: int, flag: RouteFlag) -> None:
        """Add a freshly written chunk page (owned by ``beam``) and evict past the window.

        Upstream evicts (and appends or merges into the sink) in the first forward of the *next* chunk;
        doing it here decides on the same flag and sink size, and the next chunk attends to the same frames:
        the sink plus ``window_pages`` cached chunks plus itself, ``local_attn_size`` frames before any
        APPEND. Global attention never evicts: upstream's cache just ends (``max_stream_frames``)."""
        self.flag[page] = flag
        if len(beam.sink) < self.stream.sink_pages and not beam.window:
            beam.sink.append(page)
            return
        beam.window.append(page)
        if self.stream.is_global:
            return
        while len(beam.window) > self.stream.window_pages:
            self._evict(beam, beam.window.pop(0))

    def _evict(self, beam: BeamPages, page: int) -> None:
        flag = self.flag[page]
        if flag == RouteFlag.APPEND and len(beam.sink) < self.stream.max_sink_pages:
            beam.sink.append(page)  # the beam's reference moves from window to sink
            self._pending_ops.append((int(RouteFlag.APPEND), page, page, page))
            return
        if flag in (RouteFlag.EMA, RouteFlag.APPEND) and beam.sink:
            sink = beam.sink[-1]
            if self.refcount[sink] > 1:
                dst = self.alloc()
                self.frame_pos[dst] = self.frame_pos[sink]
                beam.sink[-1] = dst
                self._pending_release.append(sink)
            else:
                dst = sink
            self._pending_ops.append((int(RouteFlag.EMA), page, sink, dst))
        self._pending_release.append(page)

    def flush(self, alpha: float) -> list[tuple[int, int, int, int]]:
        """Apply the merges of this chunk's evictions in one launch, then free what they released."""
        ops = self._pending_ops
        merges = [op for op in ops if op[0] == RouteFlag.EMA]
        if merges:
            # Column 4: the frame offset that moves the evicted (rotated) keys onto the sink's frames.
            rows = [(*op, self.frame_pos[op[2]] - self.frame_pos[op[1]]) for op in merges]
            op_tensor = torch.tensor(rows, dtype=torch.int32, device=self.pool.k.device)
            sink_merge_(self.pool.k, self.pool.v, self.pool.page_frame_pos, op_tensor, alpha, self.pool.frame_cos,
                        self.pool.frame_sin, backend=self.merge_backend)
        for p in self._pending_release:
            self.release(p)
        self._pending_ops, self._pending_release = [], []
        return ops

    def check_consistency(self, beams: list[BeamPages]) -> None:
        """Every page's refcount equals the number of beam references to it (tests, debugging)."""
        counts = [0] * self.pool.num_pages
        for b in beams:
            for p in b.all_pages():
                counts[p] += 1
        if counts != self.refcount:
            bad = [i for i, (a, b) in enumerate(zip(counts, self.refcount)) if a != b]
            raise AssertionError(f"refcount mismatch on pages {bad[:10]}")
