"""Baselines that gather the valid pages into a contiguous K/V buffer and call a stock kernel.

They exist to measure what the fused kernel saves; the gather costs an extra pass over the cache and, to
pick the mask-free fast path or pack variable lengths, one host read of ``num_pages``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import require_module
from .naive import valid_page_slots


def gather_kv(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, max_pages: int | None = None):
    """Return keys, values [N, M*T + Lc, H, D] in q's dtype (pages first, then the chunk) and a bool
    key mask [N, M*T + Lc]; M is ``max_pages`` or the table width, slots past ``num_pages`` hold page 0
    and are masked out."""
    n, _, h, d = q.shape
    page_ids, slot_ok = valid_page_slots(page_table, num_pages, max_pages)
    width = page_ids.shape[1]
    if width == 0:
        valid = torch.ones(n, k_chunk.shape[1], dtype=torch.bool, device=q.device)
        return k_chunk.to(q.dtype), v_chunk.to(q.dtype), valid
    tokens = k_pool.shape[1]
    keys = torch.cat([k_pool[page_ids].reshape(n, width * tokens, h, d).to(q.dtype), k_chunk.to(q.dtype)], 1)
    values = torch.cat([v_pool[page_ids].reshape(n, width * tokens, h, d).to(q.dtype), v_chunk.to(q.dtype)], 1)
    chunk_ok = torch.ones(n, k_chunk.shape[1], dtype=torch.bool, device=q.device)
    valid = torch.cat([slot_ok.to(q.device).repeat_interleave(tokens, dim=1), chunk_ok], 1)
    return keys, values, valid


def _all_valid(page_table, num_pages, max_pages: int | None) -> bool:
    width = page_table.shape[1] if max_pages is None else min(max_pages, page_table.shape[1])
    return width == 0 or bool((num_pages >= width).all())


def attention_sdpa(q, keys, values, valid, scale, all_valid: bool):
    mask = None if all_valid else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def paged_attention_sdpa(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale=None, *,
                         max_pages: int | None = None):
    """Gather + ``torch.nn.functional.scaled_dot_product_attention`` (mask only when tables are ragged)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys, values, valid = gather_kv(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, max_pages)
    return attention_sdpa(q, keys, values, valid, scale, _all_valid(page_table, num_pages, max_pages))


def _packed(q, keys, values, valid):
    n, lq = q.shape[:2]
    lens = valid.sum(1, dtype=torch.int32)
    return (q.reshape(n * lq, *q.shape[2:]), keys[valid], values[valid], lens)


def paged_attention_flash_attn(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale=None, *,
                               max_pages: int | None = None):
    """Gather + ``flash_attn.flash_attn_varlen_func`` (fp16/bf16 on CUDA only)."""
    flash_attn = require_module("flash_attn", "flash-attn", "flash_attn")
    n, lq, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    keys, values, valid = gather_kv(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, max_pages)
    q_p, k_p, v_p, lens = _packed(q, keys, values, valid)
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (n + 1) * lq, lq, dtype=torch.int32, device=q.device)
    out = flash_attn.flash_attn_varlen_func(q_p, k_p, v_p, cu_q, cu_k, lq, int(lens.max()),
                                            softmax_scale=scale, causal=False)
    return out.reshape(n, lq, h, d)


def paged_attention_xformers(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale=None, *,
                             max_pages: int | None = None):
    """Gather + ``xformers.ops.memory_efficient_attention`` (block-diagonal bias when tables are ragged)."""
    require_module("xformers", "xformers")
    xops = require_module("xformers.ops", "xformers", "xformers")
    n, lq, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    keys, values, valid = gather_kv(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, max_pages)
    if _all_valid(page_table, num_pages, max_pages):
        return xops.memory_efficient_attention(q, keys, values, scale=scale)
    q_p, k_p, v_p, lens = _packed(q, keys, values, valid)
    bias = xops.fmha.BlockDiagonalMask.from_seqlens([lq] * n, lens.tolist())
    out = xops.memory_efficient_attention(q_p[None], k_p[None], v_p[None], attn_bias=bias, scale=scale)
    return out.reshape(n, lq, h, d)


__all__ = ["gather_kv", "attention_sdpa", "paged_attention_sdpa", "paged_attention_flash_attn",
           "paged_attention_xformers"]
