"""Writing and reading videos (MP4 through PyAV) and frame strips (PNG through Pillow).

Every write goes to a temporary file in the target's folder and is renamed over the target at the end,
so an interrupted run never leaves a truncated file under the requested name.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import StreamT1Error, require


def to_uint8_frames(video) -> np.ndarray:
    """float frames [T, 3, H, W] in [0, 1] (as the VAEs return them) -> uint8 [T, H, W, 3]."""
    video = torch.as_tensor(video)
    require(video.dim() == 4 and video.shape[1] == 3, f"expected float frames [T, 3, H, W], got {tuple(video.shape)}")
    video = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 1).cpu().numpy()


def _check_uint8_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    require(frames.ndim == 4 and frames.shape[-1] == 3,
            f"frames must be an array [T, H, W, 3], got shape {frames.shape}")
    require(frames.dtype == np.uint8, f"frames must be uint8, got {frames.dtype}")
    require(frames.shape[0] > 0 and frames.shape[1] > 0 and frames.shape[2] > 0, "frames are empty")
    return frames


@contextmanager
def _atomic_path(path: str | Path):
    """A temporary path next to ``path``; renamed onto ``path`` only if the block finishes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name rather than mkstemp, whose 0600 mode would stick to the renamed file.
    temporary = str(target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: an odd height/width gets one more row/column copied from the edge."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_mp4(path: str | Path, frames, fps: float = 16, crf: int = 18, codec: str | None = None) -> Path:
    """Write uint8 frames [T, H, W, 3] as a yuv420p MP4: H.264 (libx264) when available, else MPEG-4 part 2.

    Odd heights or widths are padded to even by repeating the last row/column, so a read-back video can be
    one pixel larger than ``frames``. ``crf`` is x264's quality (lower is better).
    """
    import av

    frames = _pad_to_even(_check_uint8_frames(frames))
    require(isinstance(fps, (int, float, Fraction)) and fps > 0, f"fps must be a positive number, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    require(codec in ("libx264", "mpeg4"), f"unsupported codec {codec!r} (use libx264 or mpeg4)")
    require(codec in av.codecs_available, f"codec {codec} is not available in this PyAV build")
    with _atomic_path(path) as temporary:
        with av.open(temporary, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf)}
            else:
                stream.bit_rate = int(frames.shape[1] * frames.shape[2] * float(rate) * 2)
            for image in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode(None))
    return Path(path)


class Mp4StreamWriter:
    """An MP4 written chunk by chunk as a stream goes: ``append`` encodes frames right away (an encoder kept
    open on a hidden temporary file next to ``path``), ``close`` flushes it and renames it onto ``path``, so
    whatever was appended becomes a playable video; ``abort`` removes the temporary file. Frames are
    uint8 [T, H, W, 3]; every chunk must have the first one's size."""

    def __init__(self, path: str | Path, fps: float = 16, crf: int = 18, codec: str | None = None):
        import av

        require(isinstance(fps, (int, float, Fraction)) and not isinstance(fps, bool) and fps > 0,
                f"fps must be a positive number, got {fps!r}")
        self.path = Path(path)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        require(self.codec in ("libx264", "mpeg4"), f"unsupported codec {self.codec!r} (use libx264 or mpeg4)")
        require(self.codec in av.codecs_available, f"codec {self.codec} is not available in this PyAV build")
        self.crf = crf
        self.temporary = self.path.parent / f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        self.frames_written = 0
        self.size: tuple[int, int] | None = None
        self._container = self._stream = None

    def _open(self, height: int, width: int) -> None:
        import av

        self._container = av.open(str(self.temporary), mode="w", format="mp4")
        stream = self._container.add_stream(self.codec, rate=self.rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if self.codec == "libx264":
            stream.options = {"crf": str(self.crf)}
        else:
            stream.bit_rate = int(height * width * float(self.rate) * 2)
        self._stream = stream

    def append(self, frames) -> None:
        import av

        frames = _pad_to_even(_check_uint8_frames(frames))
        size = (frames.shape[1], frames.shape[2])
        if self._container is None:
            self.size = size
            self._open(*size)
        require(size == self.size, f"chunk frames are {size[0]}x{size[1]}, the video is {self.size[0]}x{self.size[1]}")
        for image in frames:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        self.frames_written += frames.shape[0]

    def close(self) -> Path:
        """Finish the video and move it onto ``path``; an error removes the temporary file and re-raises."""
        require(self._container is not None, f"no frames were written to {self.path}")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None
            os.replace(self.temporary, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except Exception:  # the file is removed anyway
                pass
        self.temporary.unlink(missing_ok=True)


def write_json(path: str | Path, data) -> Path:
    """Strict JSON (no NaN/Infinity, which JSON does not have) written atomically next to ``path``."""
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise StreamT1Error(f"cannot write {path}: the record holds a non-finite number ({exc})") from None
    with _atomic_path(path) as temporary:
        Path(temporary).write_text(text)
    return Path(path)


def read_video(path: str | Path) -> np.ndarray:
    """All frames of the first video stream as uint8 [T, H, W, 3] (RGB)."""
    import av

    path = Path(path)
    require(path.is_file(), f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            require(len(container.streams.video) > 0, f"{path} has no video stream")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.FFmpegError as exc:
        raise StreamT1Error(f"cannot read video {path}: {exc}") from None
    require(len(frames) > 0, f"{path} has no frames")
    return np.stack(frames)


def save_frame_strip(path: str | Path, frames, every: int = 4) -> Path:
    """Save every ``every``-th frame of uint8 [T, H, W, 3], side by side, as one PNG (for READMEs)."""
    from PIL import Image

    frames = _check_uint8_frames(frames)
    require(isinstance(every, int) and every >= 1, f"every must be a positive int, got {every}")
    strip = np.concatenate(list(frames[::every]), axis=1)
    with _atomic_path(path) as temporary:
        Image.fromarray(strip).save(temporary, format="PNG")
    return Path(path)
