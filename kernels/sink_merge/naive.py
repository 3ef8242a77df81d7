"""Reference semantics of the memory-sink merge applied when window pages are evicted.

The cache manager decides on the host, once per chunk, what happens to each evicted page and writes one
op per eviction into a small device tensor ``ops`` [M, 4] int32 = (mode, evicted, sink, dst):
  DISCARD (0) and APPEND (2) move no data (they only change page tables);
  EMA (1) writes ``dst = alpha * sink + (1 - alpha) * evicted`` for every layer, K and V (float32 math),
  and gives ``dst`` the sink page's frame position. ``dst == sink`` blends in place; a different ``dst``
  is the copy-on-write target when the sink page is shared by several beams.
"""
from __future__ import annotations

import torch

DISCARD, EMA, APPEND = 0, 1, 2


def sink_merge_naive_(k_pool: torch.Tensor, v_pool: torch.Tensor, page_frame_pos: torch.Tensor,
                      ops: torch.Tensor, alpha: float) -> None:
    """k_pool, v_pool [L, P, T, H, D]; page_frame_pos [P]; ops [M, 4]. In place."""
    for mode, evicted, sink, dst in ops.tolist():
        if mode != EMA:
            continue
        for pool in (k_pool, v_pool):
            blended = alpha * pool[:, sink].float() + (1.0 - alpha) * pool[:, evicted].float()
            pool[:, dst] = blended.to(pool.dtype)
        page_frame_pos[dst] = page_frame_pos[sink]
