"""Reference of the previous cache layout: pre-RoPE keys in the pool, rotated at attention time.

Kept one release beside the rotating kernel (``fused_rope.py``, bench backend ``triton_rope``) for the
kernel-level A/B and as the old path the post-RoPE cache is checked against. Every candidate n attends,
with one softmax, to
  1. the pages ``page_table[n, :num_pages[n]]`` of the shared pool (pre-RoPE keys, rotated here at the
     page's frame positions), then
  2. its own chunk's keys/values ``k_chunk[n], v_chunk[n]`` (already rotated).
Queries arrive rotated. All q/k tensors use the engine's half-split RoPE layout (pair i = channels i and
i + D/2). No host synchronisation: invalid page slots are masked, not sliced away.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rotated_page_keys(k_pool, page_ids, page_frame_pos, frame_cos, frame_sin, spatial_cos, spatial_sin,
                      frame_tokens: int) -> torch.Tensor:
    """Gather pages ``page_ids`` [N, M] from ``k_pool`` [P, T, H, D] and rotate them: float32 [N, M, T, H, D]."""
    tokens_per_page = k_pool.shape[1]
    keys = k_pool[page_ids].float()
    t = torch.arange(tokens_per_page, device=k_pool.device)
    frame_of_token = t // frame_tokens
    spatial = t % frame_tokens
    frames = (page_frame_pos[page_ids].long()[..., None] + frame_of_token).clamp(0, frame_cos.shape[0] - 1)
    fc, fs = frame_cos[frames], frame_sin[frames]
    sc, ss = spatial_cos[spatial], spatial_sin[spatial]
    cos = (fc * sc - fs * ss)[..., None, :]
    sin = (fs * sc + fc * ss)[..., None, :]
    half = keys.shape[-1] // 2
    lo, hi = keys[..., :half], keys[..., half:]
    return torch.cat([lo * cos - hi * sin, lo * sin + hi * cos], dim=-1)


def paged_attention_rope_naive(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, page_frame_pos,
                          frame_cos, frame_sin, spatial_cos, spatial_sin, frame_tokens: int,
                          scale: float | None = None) -> torch.Tensor:
    """Shapes: q [N, Lq, H, D]; k_chunk, v_chunk [N, Lc, H, D]; k_pool, v_pool [P, T, H, D];
    page_table [N, M] int; num_pages [N] int; page_frame_pos [P] int; frame_cos/sin [F_max, D/2];
    spatial_cos/sin [frame_tokens, D/2]. Returns [N, Lq, H, D] in q's dtype; math in float32.
    """
    n, lq, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    max_pages = page_table.shape[1]
    keys = [k_chunk.float()]
    values = [v_chunk.float()]
    mask = [torch.ones(n, k_chunk.shape[1], dtype=torch.bool, device=q.device)]
    if max_pages > 0:
        valid = torch.arange(max_pages, device=q.device)[None, :] < num_pages.to(q.device)[:, None]
        page_ids = torch.where(valid, page_table.long(), torch.zeros_like(page_table, dtype=torch.long))
        tokens = k_pool.shape[1]
        k_pages = rotated_page_keys(k_pool, page_ids, page_frame_pos, frame_cos, frame_sin, spatial_cos,
                                    spatial_sin, frame_tokens)
        keys.insert(0, k_pages.reshape(n, max_pages * tokens, h, d))
        values.insert(0, v_pool[page_ids].float().reshape(n, max_pages * tokens, h, d))
        mask.insert(0, valid.repeat_interleave(tokens, dim=1))
    k_all = torch.cat(keys, 1).transpose(1, 2)
    v_all = torch.cat(values, 1).transpose(1, 2)
    attn_mask = torch.cat(mask, 1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k_all, v_all, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2).to(q.dtype)
