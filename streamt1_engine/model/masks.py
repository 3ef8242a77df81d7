"""Dense attention masks that state the streaming semantics explicitly (training and reference checks)."""
from __future__ import annotations

import torch


def block_causal_mask(num_frames: int, chunk_frames: int, frame_tokens: int, local_attn_size: int = -1,
                      sink_size: int = 0, device=None) -> torch.Tensor:
    """bool [L, L]: a token sees every token of its own chunk and earlier chunks.

    With a ``local_attn_size`` (upstream's: the sink and the current chunk included) a chunk sees the first
    ``sink_size`` frames and the last ``local_attn_size - sink_size`` frames up to its own end: LongLive's
    fixed-sink rolling cache. -1 is global attention.
    """
    frame = torch.arange(num_frames, device=device)
    chunk = frame // chunk_frames
    visible = chunk[None, :] <= chunk[:, None]
    if local_attn_size != -1:
        chunk_end = (chunk + 1) * chunk_frames  # first frame after the query's chunk
        in_window = frame[None, :] >= (chunk_end[:, None] - (local_attn_size - sink_size))
        visible &= in_window | (frame[None, :] < sink_size)
    return visible.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)
