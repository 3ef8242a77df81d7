"""Paged KV cache rules of one stream over a shared pool of chunk-sized pages.

Beams that descend from the same candidate share pages by reference count; a new chunk takes a free
page; only an EMA merge into a shared sink page copies (copy-on-write). The host owns the bookkeeping
(Python ints, once per chunk, in ``BlockPool``, shared by every stream of an engine); the device sees
fixed-shape index tensors, so a chunk's forward never synchronises and can be replayed as a CUDA graph.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..config import StreamConfig, WanConfig
from ..errors import require
from ..kernels.sink_merge import sink_merge_
from .block_pool import BlockPool, RouteFlag
from .kv_pool import KVPool


@dataclass
class BeamPages:
    """Pages one beam attends to: sink pages first, then the rolling window (oldest first)."""

    sink: list[int] = field(default_factory=list)
    window: list[int] = field(default_factory=list)

    def all_pages(self) -> list[int]:
        return self.sink + self.window


def page_tokens_for(model_cfg: WanConfig, stream_cfg: StreamConfig) -> int:
    """Tokens of one chunk page for this stream layout (streams share a pool only with equal pages)."""
    ph, pw = model_cfg.patch_size[1:]
    require(stream_cfg.latent_height % ph == 0 and stream_cfg.latent_width % pw == 0,
            f"latent size {stream_cfg.latent_height}x{stream_cfg.latent_width} is not divisible by the "
            f"patch size {ph}x{pw}")
    return stream_cfg.chunk_frames * (stream_cfg.latent_height // ph) * (stream_cfg.latent_width // pw)


class PagedKVCache:
    """One stream's cache rules (commit, eviction, memory-sink merges, page tables for its ``StreamConfig``).

    ``PagedKVCache(model_cfg, stream_cfg, num_pages, ...)`` allocates a pool of its own;
    ``PagedKVCache.shared(blocks, ...)`` works over an engine's shared ``BlockPool``. The references this
    stream holds are counted so ``release_all`` returns every one of them, whatever step failed."""

    def __init__(self, model_cfg: WanConfig, stream_cfg: StreamConfig, num_pages: int | None = None, device=None,
                 dtype=None, merge_backend: str = "torch", *, blocks: BlockPool | None = None):
        self.stream = stream_cfg
        self.page_tokens = page_tokens_for(model_cfg, stream_cfg)
        self.frame_tokens = self.page_tokens // stream_cfg.chunk_frames
        if blocks is None:
            require(num_pages is not None, "num_pages is needed without a shared block pool")
            blocks = BlockPool.allocate(model_cfg, num_pages, self.page_tokens, device, dtype)
        require(blocks.page_tokens == self.page_tokens,
                f"the shared KV pool has pages of {blocks.page_tokens} tokens, this stream needs {self.page_tokens}")
        self.blocks = blocks
        self.merge_backend = merge_backend
        self._held: Counter[int] = Counter()  # references this stream holds, per page
        self._pending_ops: list[tuple[int, int, int, int]] = []
        self._pending_release: list[int] = []

    @classmethod
    def shared(cls, blocks: BlockPool, model_cfg: WanConfig, stream_cfg: StreamConfig,
               merge_backend: str = "torch") -> "PagedKVCache":
        return cls(model_cfg, stream_cfg, merge_backend=merge_backend, blocks=blocks)

    @property
    def pool(self) -> KVPool:
        return self.blocks.kv

    @property
    def refcount(self) -> list[int]:
        return self.blocks.refcount

    @property
    def flag(self) -> list[RouteFlag]:
        return self.blocks.flag

    @property
    def frame_pos(self) -> list[int]:
        return self.blocks.frame_pos

    @property
    def pages_held(self) -> int:
        """Distinct pages this stream references."""
        return len(self._held)

    def reset(self) -> None:
        """Forget every page of the pool (only for a pool this stream alone uses)."""
        self.blocks.reset()
        self._held.clear()
        self._pending_ops, self._pending_release = [], []

    def release_all(self) -> None:
        """Return every reference this stream still holds (after its end, a cancel or a failure)."""
        for page, count in list(self._held.items()):
            for _ in range(count):
                self.blocks.release(page)
        self._held.clear()
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
        return self.blocks.num_free

    def alloc(self) -> int:
        page = self.blocks.alloc()
        self._held[page] += 1
        return page

    def retain(self, page: int) -> None:
        self.blocks.retain(page)
        self._held[page] += 1

    def release(self, page: int) -> None:
        require(self._held[page] > 0, f"page {page} is not held by this stream")
        self.blocks.release(page)
        self._held[page] -= 1
        if self._held[page] == 0:
            del self._held[page]

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
        return self.blocks.set_frame_pos(pages, frame_start)

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
        """This stream's references to every page equal its beams' references (tests, debugging); for a
        pool of its own, that is every page's refcount."""
        counts = Counter(p for b in beams for p in b.all_pages())
        if counts != self._held:
            bad = sorted(p for p in set(counts) | set(self._held) if counts[p] != self._held[p])
            raise AssertionError(f"refcount mismatch on pages {bad[:10]}")
