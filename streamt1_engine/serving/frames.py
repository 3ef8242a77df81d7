"""What goes over the wire for a chunk: its frames as JPEG images, its record as JSON-safe data.

JPEG rather than fragmented MP4: each frame is drawn the moment it arrives (a browser decodes a JPEG blob
natively, no MediaSource or codec support needed), a chunk never waits for an encoder's GOP, and the
frame count a client sees is exactly the stream's. The POST answer is a real MP4 (``video_io``)."""
from __future__ import annotations

import io
import math
import numbers
import tempfile
from pathlib import Path

import numpy as np


def jpeg_frames(frames, quality: int = 95) -> list[bytes]:
    """uint8 frames [T, H, W, 3] (tensor or array) -> one JPEG per frame (4:4:4: small frames keep their colours)."""
    from PIL import Image

    array = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)
    out = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
        out.append(buffer.getvalue())
    return out


def json_safe(value):
    """Records as strict JSON: tuples and arrays become lists, numpy / torch scalars plain numbers, non-finite
    floats (no JSON form) None."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "to_dict"):
        return json_safe(value.to_dict())
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return json_safe(value.tolist())
    return str(value)


def run_record(handle) -> dict:
    """The stream's run record as the CLI writes it: ``handle.info`` with the per-chunk records under
    ``chunks``."""
    info = dict(handle.info or {})
    info.pop("records", None)
    return json_safe({**info, "request_id": handle.request_id, "status": handle.status,
                      "chunks": [r.to_dict() for r in handle.records]})


class Mp4Bytes:
    """An MP4 encoded chunk by chunk (``video_io.Mp4StreamWriter`` on a private temporary folder)."""

    def __init__(self, fps: int):
        from ..video_io import Mp4StreamWriter

        self._folder = tempfile.TemporaryDirectory(prefix="streamt1-serve-")
        self.writer = Mp4StreamWriter(Path(self._folder.name) / "video.mp4", fps=fps)

    def append(self, frames) -> None:
        self.writer.append(frames.numpy() if hasattr(frames, "numpy") else frames)

    def finish(self) -> bytes:
        try:
            return self.writer.close().read_bytes()
        finally:
            self._folder.cleanup()

    def abort(self) -> None:
        self.writer.abort()
        self._folder.cleanup()
