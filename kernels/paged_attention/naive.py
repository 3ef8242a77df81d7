"""Reference semantics of candidate-batched attention over a shared paged KV cache.

Every candidate n attends, with one softmax, to
  1. the pages ``page_table[n, :num_pages[n]]`` of the shared pool, then
  2. its own chunk's keys/values ``k_chunk[n], v_chunk[n]``.
Pages hold keys already rotated at their own positions (RoPE is applied once, when the context pass writes
a page; a memory-sink merge rotates the evicted keys onto the sink's positions before blending), so
attention is plain attention over the gathered pages. Queries arrive rotated.

Why this equals the reference. Stream-T1's reference keeps pre-RoPE keys in its cache and rotates them at
attention time, every call: the EMA sink at frames 0.., each appended sink page at its own start frame,
the window at its global frames; LongLive's causal model caches keys after RoPE. A page's positions never
change once it is written, so rotating once when writing and rotating on every read give the same keys.
The one rewrite of a page, the EMA merge, is done by the reference on pre-RoPE keys and the blend is then
rotated at the sink's positions; here the evicted keys are rotated by the frame offset (sink frame -
evicted frame) and blended with the sink's rotated keys. Both agree because the rotation is linear,
R_s (a k_s + (1 - a) k_e) = a R_s k_s + (1 - a) R_(s-e) R_e k_e, and the spatial parts of R are the same for
both pages. Only rounding differs (the reference rotates in float64 and casts to the model dtype; here the
rotation is float32, once, before the key is stored in the pool's dtype).

``max_pages`` (a host int, the longest table row) lets a caller that knows the page counts attend only the
slots that can be valid; without it the full table width is read and invalid slots are masked, which
needs no host synchronisation (CUDA-graph capture). ``row_pages`` (host ints, each row's own count) goes
further: each row attends exactly its own pages, rows of equal count in one unmasked call, so a row's result
does not depend on the other rows of the batch (a masked, padded row differs from the unpadded one by
rounding); this is what makes several streams batched together equal each stream alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def valid_page_slots(page_table, num_pages, max_pages: int | None = None):
    """Slice the table to ``max_pages`` columns; returns (page ids with invalid slots as page 0, slot mask)."""
    if max_pages is not None:
        page_table = page_table[:, :max_pages]
    width = page_table.shape[1]
    valid = torch.arange(width, device=page_table.device)[None, :] < num_pages.to(page_table.device)[:, None]
    page_ids = torch.where(valid, page_table.long(), torch.zeros_like(page_table, dtype=torch.long))
    return page_ids, valid


def paged_attention_naive(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale: float | None = None,
                          *, max_pages: int | None = None, row_pages: tuple[int, ...] | None = None) -> torch.Tensor:
    """Shapes: q [N, Lq, H, D]; k_chunk, v_chunk [N, Lc, H, D]; k_pool, v_pool [P, T, H, D] (keys rotated);
    page_table [N, M] int; num_pages [N] int. Returns [N, Lq, H, D] in q's dtype; math in float32.
    """
    if row_pages is not None:
        return _attend_exact_rows(q, k_chunk, v_chunk, k_pool, v_pool, page_table, row_pages, scale)
    n, lq, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    page_ids, valid = valid_page_slots(page_table, num_pages, max_pages)
    width = page_ids.shape[1]
    keys = [k_chunk.float()]
    values = [v_chunk.float()]
    mask = [torch.ones(n, k_chunk.shape[1], dtype=torch.bool, device=q.device)]
    if width > 0:
        tokens = k_pool.shape[1]
        keys.insert(0, k_pool[page_ids].float().reshape(n, width * tokens, h, d))
        values.insert(0, v_pool[page_ids].float().reshape(n, width * tokens, h, d))
        mask.insert(0, valid.to(q.device).repeat_interleave(tokens, dim=1))
    k_all = torch.cat(keys, 1).transpose(1, 2)
    v_all = torch.cat(values, 1).transpose(1, 2)
    attn_mask = torch.cat(mask, 1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k_all, v_all, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def _attend_exact_rows(q, k_chunk, v_chunk, k_pool, v_pool, page_table, row_pages, scale) -> torch.Tensor:
    """One unmasked attention per group of rows with the same page count, each over exactly its pages."""
    n, lq, h, d = q.shape
    if len(row_pages) != n:
        raise ValueError(f"row_pages has {len(row_pages)} entries for {n} rows")
    scale = d ** -0.5 if scale is None else scale
    groups: dict[int, list[int]] = {}
    for row, count in enumerate(row_pages):
        groups.setdefault(int(count), []).append(row)
    out = None if len(groups) == 1 else torch.empty(n, h, lq, d, dtype=torch.float32, device=q.device)
    tokens = k_pool.shape[1]
    for count, rows in groups.items():
        idx = None if out is None else torch.tensor(rows, device=q.device)
        pick = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
        keys, values = [pick(k_chunk).float()], [pick(v_chunk).float()]
        if count > 0:
            ids = pick(page_table[:, :count].to(q.device)).long()
            g = ids.shape[0]
            keys.insert(0, k_pool[ids].float().reshape(g, count * tokens, h, d))
            values.insert(0, v_pool[ids].float().reshape(g, count * tokens, h, d))
        k_all = torch.cat(keys, 1).transpose(1, 2)
        v_all = torch.cat(values, 1).transpose(1, 2)
        res = F.scaled_dot_product_attention(pick(q).float().transpose(1, 2), k_all, v_all, scale=scale)
        if out is None:
            return res.transpose(1, 2).to(q.dtype)
        out[idx] = res
    return out.transpose(1, 2).to(q.dtype)
