"""The DiT work of one chunk step for any number of streams, run as one batch.

Each stream's search (``BeamSearch.phases``) yields its work items; ``run_batched`` concatenates them (noise
along N, page tables padded to the widest, page counts, frame starts, write pages, each stream's prompt
context expanded to its candidates), makes one denoiser call and splits the result back. With the torch
attention path attending each row over exactly its own pages (``ChunkAttention.row_pages``) and per-row
GEMMs, every stream's rows get the bits they would get alone (CPU float32; checked by the tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import require
from ..model.wan import ChunkAttention, TextContext
from ..sampler import ChunkNoise


@dataclass
class DenoiseWork:
    """All denoising steps of one stream's candidates; the result is their x0."""

    noise: ChunkNoise
    attn: ChunkAttention
    text: TextContext

    @property
    def rows(self) -> int:
        return self.noise.initial.shape[0]


@dataclass
class ContextWork:
    """The clean context pass of one stream's survivors, writing ``attn.write_pages``."""

    x0: torch.Tensor
    attn: ChunkAttention
    text: TextContext

    @property
    def rows(self) -> int:
        return self.x0.shape[0]


def run_batched(denoiser, works: list[DenoiseWork] | list[ContextWork], pad_to: int | None = None,
                scratch_page: int | None = None) -> list:
    """Run works of one kind as one denoiser call; returns each work's result (x0 for denoise, None for the
    context pass). ``pad_to``: pad the batch with dummy rows to this size (CUDA graphs keyed by batch bucket;
    see ``pad_rows``)."""
    require(len(works) > 0, "no work to run")
    kind = type(works[0])
    require(all(type(w) is kind for w in works), "one batch runs works of one kind")
    if len(works) == 1 and pad_to is None:
        return [_run_one(denoiser, works[0])]
    counts = [w.rows for w in works]
    attn = concat_attention([w.attn for w in works])
    text = concat_text([w.text for w in works], counts)
    if kind is DenoiseWork:
        noise = ChunkNoise(torch.cat([w.noise.initial for w in works]),
                           torch.cat([w.noise.renoise for w in works], dim=1))
        if pad_to is not None:
            noise, attn, text = pad_rows(noise, attn, text, pad_to, scratch_page)
        x0 = denoiser.denoise(noise, attn, text)
        return list(x0[:sum(counts)].split(counts))
    x0 = torch.cat([w.x0 for w in works])
    if pad_to is not None:
        x0, attn, text = pad_rows(x0, attn, text, pad_to, scratch_page)
    denoiser.context(x0, attn, text)
    return [None] * len(works)


def _run_one(denoiser, work):
    if isinstance(work, DenoiseWork):
        return denoiser.denoise(work.noise, work.attn, work.text)
    denoiser.context(work.x0, work.attn, work.text)
    return None


def concat_attention(attns: list[ChunkAttention]) -> ChunkAttention:
    pool, backend = attns[0].pool, attns[0].backend
    require(all(a.pool is pool for a in attns), "batched streams must share one KV pool")
    require(all(a.backend == backend for a in attns), "batched streams must use one attention backend")
    require(all(a.dense_mask is None and a.frame_positions is None for a in attns),
            "dense or explicit-position attention is not batched across streams")
    writes = [a.write_pages for a in attns]
    require(all(w is None for w in writes) or all(w is not None for w in writes),
            "a batch either writes pages for every row or for none")
    width = max(a.page_table.shape[1] for a in attns)
    table = torch.cat([torch.nn.functional.pad(a.page_table, (0, width - a.page_table.shape[1]), value=-1)
                       for a in attns])
    rows = None
    if all(a.row_pages is not None for a in attns):
        rows = tuple(r for a in attns for r in a.row_pages)
    longest = None if any(a.max_pages is None for a in attns) else max(a.max_pages for a in attns)
    return ChunkAttention(pool, table, torch.cat([a.num_pages for a in attns]),
                          torch.cat([a.frame_start for a in attns]),
                          None if writes[0] is None else torch.cat(writes), backend=backend, max_pages=longest,
                          row_pages=rows)


def concat_text(texts: list[TextContext], counts: list[int]) -> TextContext:
    """Per-candidate cross-attention K/V: each stream's context (B = 1 or its own N) expanded to its rows."""
    if all(t is texts[0] for t in texts) and all(k.shape[0] == 1 for k, _ in texts[0].kv):
        return texts[0]  # one prompt context for every row: broadcast as a single stream does
    layers = len(texts[0].kv)
    require(all(len(t.kv) == layers for t in texts), "prompt contexts of different depths")
    kv = []
    for layer in range(layers):
        parts = [(t.kv[layer][0].expand(n, -1, -1, -1), t.kv[layer][1].expand(n, -1, -1, -1))
                 for t, n in zip(texts, counts)]
        shapes = {k.shape[1:] for k, _ in parts}
        require(len(shapes) == 1, f"prompt contexts of different lengths cannot share a batch: {sorted(shapes)}")
        kv.append((torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])))
    return TextContext(kv)


def pad_rows(x, attn: ChunkAttention, text: TextContext, size: int, scratch_page: int | None = None):
    """Pad a batch to ``size`` rows with dummy rows that attend no page (their outputs are discarded); a
    context pass writes their K/V into ``scratch_page`` (a page no stream holds)."""
    n = attn.num_pages.shape[0]
    extra = size - n
    require(extra >= 0, f"batch of {n} rows does not fit the bucket of {size}")
    if extra == 0:
        return x, attn, text

    def grow(t: torch.Tensor, dim: int = 0, value: float = 0) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, t.new_full(shape, value)], dim=dim)

    if isinstance(x, ChunkNoise):
        x = ChunkNoise(grow(x.initial), grow(x.renoise, dim=1))
    else:
        x = grow(x)
    write = attn.write_pages
    if write is not None:
        require(scratch_page is not None, "padding a context pass needs a scratch page for the dummy rows")
        write = torch.cat([write, write.new_full((extra,), scratch_page)])
    attn = ChunkAttention(attn.pool, grow(attn.page_table, value=-1), grow(attn.num_pages), grow(attn.frame_start),
                          write, backend=attn.backend, max_pages=attn.max_pages,
                          row_pages=None if attn.row_pages is None else attn.row_pages + (0,) * extra)
    kv = [(k.expand(n, -1, -1, -1) if k.shape[0] == 1 else k, v.expand(n, -1, -1, -1) if v.shape[0] == 1 else v)
          for k, v in text.kv]
    text = TextContext([(grow(k), grow(v)) for k, v in kv])
    return x, attn, text


def batch_bucket(rows: int, buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> int:
    """The smallest bucket that holds ``rows`` candidates (beyond the last: the next multiple of it)."""
    require(rows >= 1, "a batch needs at least one row")
    for b in buckets:
        if rows <= b:
            return b
    last = buckets[-1]
    return -(-rows // last) * last
