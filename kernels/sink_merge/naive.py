"""Reference semantics of the memory-sink merge applied when window pages are evicted.

The cache manager decides on the host, once per chunk, what happens to each evicted page and writes one
op per eviction into a small device tensor ``ops`` [M, 5] int32 = (mode, evicted, sink, dst, frame_offset):
  DISCARD (0) and APPEND (2) move no data (they only change page tables; an appended page keeps its keys,
  already rotated at its own positions);
  EMA (1) writes, for every layer (float32 math),
      K[dst] = alpha * K[sink] + (1 - alpha) * R(frame_offset) K[evicted]
      V[dst] = alpha * V[sink] + (1 - alpha) * V[evicted]
  and gives ``dst`` the sink page's frame position. Keys in the pool are rotated at their page's positions,
  so the evicted keys are first moved onto the sink's positions: ``frame_offset`` = sink frame - evicted
  frame, and R rotates the frame part of RoPE only (both pages share the spatial layout, so the spatial
  parts already agree). RoPE is linear, so this equals blending pre-RoPE keys and rotating the blend at the
  sink's positions. ``dst == sink`` blends in place; a different ``dst`` is the copy-on-write target when
  the sink page is shared by several beams.
"""
from __future__ import annotations

import torch

DISCARD, EMA, APPEND = 0, 1, 2


def frame_rotation(offset: int, frame_cos: torch.Tensor, frame_sin: torch.Tensor):
    """cos/sin [D/2] of a rotation by ``offset`` frames (negative: backwards) from the frame tables [F, D/2]."""
    row = min(abs(offset), frame_cos.shape[0] - 1)
    return frame_cos[row].float(), frame_sin[row].float() * (1.0 if offset >= 0 else -1.0)


def rotate_half_layout(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of ``keys`` [..., D] in float32."""
    half = keys.shape[-1] // 2
    k = keys.float()
    lo, hi = k[..., :half], k[..., half:]
    return torch.cat([lo * cos - hi * sin, lo * sin + hi * cos], dim=-1)


def sink_merge_naive_(k_pool: torch.Tensor, v_pool: torch.Tensor, page_frame_pos: torch.Tensor,
                      ops: torch.Tensor, alpha: float, frame_cos: torch.Tensor, frame_sin: torch.Tensor) -> None:
    """k_pool, v_pool [L, P, T, H, D] (keys in the half-split layout); page_frame_pos [P]; ops [M, 5];
    frame_cos/sin [F, D/2] (RoPE frame tables, non-frame columns cos=1, sin=0). In place."""
    for mode, evicted, sink, dst, offset in ops.tolist():
        if mode != EMA:
            continue
        cos, sin = frame_rotation(offset, frame_cos.to(k_pool.device), frame_sin.to(k_pool.device))
        moved = rotate_half_layout(k_pool[:, evicted], cos, sin)
        k_pool[:, dst] = (alpha * k_pool[:, sink].float() + (1.0 - alpha) * moved).to(k_pool.dtype)
        v_pool[:, dst] = (alpha * v_pool[:, sink].float() + (1.0 - alpha) * v_pool[:, evicted].float()).to(v_pool.dtype)
        page_frame_pos[dst] = page_frame_pos[sink]
