"""Dense attention masks that state the streaming semantics explicitly (training and reference checks)."""
from __future__ import annotations

import torch


def block_causal_mask(num_frames: int, chunk_frames: int, frame_tokens: int, window_frames: int | None = None,
                      sink_frames: int = 0, device=None) -> torch.Tensor:
    """bool [L, L]: a token sees every token of its own chunk and earlier chunks.

    With ``window_frames`` (current chunk included) older frames are hidden, except the first
    ``sink_frames`` frames, which stay visible: the fixed-sink rolling cache of LongLive.
    """
    frame = torch.arange(num_frames, device=device)
    chunk = frame // chunk_frames
    visible = chunk[None, :] <= chunk[:, None]
    if window_frames is not None:
        chunk_end = (chunk + 1) * chunk_frames  # first frame after the query's chunk
        in_window = frame[None, :] >= (chunk_end[:, None] - window_frames)
        visible &= in_window | (frame[None, :] < sink_frames)
    return visible.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)
