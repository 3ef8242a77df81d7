"""Writing and reading videos (MP4 through PyAV) and frame strips (PNG through Pillow).

A whole file (``write_mp4``, ``write_json``, a strip) goes to a temporary file in the target's folder and is
renamed over the target at the end, so it never appears half written. A video written as a stream goes
(``Mp4StreamWriter``) is a fragmented MP4 under its own name from the first chunk on, playable at any moment.
"""
from __future__ import annotations

import io
import json
import os
import struct
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
    rate, codec = _rate_and_codec(fps, codec)
    with _atomic_path(path) as temporary:
        with av.open(temporary, mode="w", format="mp4") as container:
            _encode_frames(container, frames, rate, codec, crf)
    return Path(path)


def _rate_and_codec(fps, codec: str | None) -> tuple[Fraction, str]:
    """The checked frame rate and codec (libx264 when available, else MPEG-4 part 2)."""
    import av

    require(isinstance(fps, (int, float, Fraction)) and not isinstance(fps, bool) and fps > 0,
            f"fps must be a positive number, got {fps!r}")
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    require(codec in ("libx264", "mpeg4"), f"unsupported codec {codec!r} (use libx264 or mpeg4)")
    require(codec in av.codecs_available, f"codec {codec} is not available in this PyAV build")
    return Fraction(fps).limit_denominator(1001), codec


def _encode_frames(container, frames: np.ndarray, rate: Fraction, codec: str, crf: int, x264_options=None):
    """Encode uint8 frames (even sizes) as one yuv420p video stream of ``container``; returns the stream."""
    import av

    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
        stream.options = {"crf": str(crf), **(x264_options or {})}
    else:
        stream.bit_rate = int(frames.shape[1] * frames.shape[2] * float(rate) * 2)
    for index, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = index
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    return stream


# Fragmented MP4 (a header, then one moof+mdat fragment per keyframe run): each fragment plays once it is on disk.
_FRAGMENTED = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}


def _boxes(data, start: int = 0, end: int | None = None):
    """(type, offset, size, header size) of the ISO-BMFF boxes in ``data[start:end]``."""
    end = len(data) if end is None else end
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, start + 8)[0], 16
        elif size == 0:
            size = end - start
        require(size >= header and start + size <= end, "the encoder wrote a malformed MP4 box")
        yield kind.decode("latin-1"), start, size, header
        start += size


class Mp4StreamWriter:
    """An MP4 written chunk by chunk as a stream goes, straight under ``path`` and fragmented: ``append``
    encodes the chunk as fragments of their own (the chunk starts with a keyframe) and writes them out before
    it returns, so the file is a playable video of every appended chunk at any moment, even after the process
    is killed without warning (SIGKILL, OOM killer). ``close`` ends it; ``abort`` removes it. The file exists
    from the first ``append`` on; whether the run behind it finished is for its run record to say. Frames are
    uint8 [T, H, W, 3]; every chunk must have the first one's size.

    Each chunk is encoded by an encoder of its own into a fragmented MP4 in memory; its fragments are appended
    to the file with their sequence numbers and decode times moved to follow the chunks before (the header,
    identical for every chunk, is written once)."""

    def __init__(self, path: str | Path, fps: float = 16, crf: int = 18, codec: str | None = None):
        self.path = Path(path)
        self.rate, self.codec = _rate_and_codec(fps, codec)
        self.crf = crf
        self.frames_written = 0
        self.size: tuple[int, int] | None = None
        self._file = None
        self._header: bytes | None = None
        self._sequence = 1

    def _encode(self, frames: np.ndarray) -> tuple[bytearray, Fraction]:
        """One chunk as a fragmented MP4 of its own (timestamps from 0) and its track's time base."""
        import av

        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mp4", options=_FRAGMENTED) as container:
            # no B-frames: decode order is frame order
            time_base = _encode_frames(container, frames, self.rate, self.codec, self.crf, {"bf": "0"}).time_base
        return bytearray(buffer.getvalue()), Fraction(time_base)

    def _fragments(self, data: bytearray, start_time: int) -> bytes:
        """The chunk's moof+mdat pairs, renumbered after the fragments already written and shifted by
        ``start_time`` (track ticks); with the header first, for the first chunk."""
        header, out = [], []
        for kind, offset, size, head in _boxes(data):
            if kind in ("ftyp", "moov"):
                header.append(bytes(data[offset:offset + size]))
            elif kind == "moof":
                for inner, at, inner_size, inner_head in _boxes(data, offset + head, offset + size):
                    if inner == "mfhd":
                        struct.pack_into(">I", data, at + inner_head + 4, self._sequence)
                        self._sequence += 1
                    elif inner == "traf":
                        self._shift_decode_time(data, at + inner_head, at + inner_size, start_time)
                out.append(bytes(data[offset:offset + size]))
            elif kind == "mdat":
                out.append(bytes(data[offset:offset + size]))
        header_bytes = b"".join(header)
        require(len(header) == 2 and out, "the encoder wrote an MP4 without a header or fragments")
        if self._header is None:
            self._header = header_bytes
            out.insert(0, header_bytes)
        require(header_bytes == self._header, "the encoder changed the video's parameters between chunks")
        return b"".join(out)

    @staticmethod
    def _shift_decode_time(data: bytearray, start: int, end: int, ticks: int) -> None:
        for kind, offset, _, head in _boxes(data, start, end):
            if kind == "tfdt":
                fmt = ">Q" if data[offset + head] == 1 else ">I"  # version 1: 64-bit decode time
                struct.pack_into(fmt, data, offset + head + 4, struct.unpack_from(fmt, data, offset + head + 4)[0]
                                 + ticks)

    def append(self, frames) -> None:
        frames = _pad_to_even(_check_uint8_frames(frames))
        size = (frames.shape[1], frames.shape[2])
        if self.size is None:
            self.size = size
        require(size == self.size, f"chunk frames are {size[0]}x{size[1]}, the video is {self.size[0]}x{self.size[1]}")
        data, time_base = self._encode(frames)
        fragments = self._fragments(data, round(Fraction(self.frames_written) / self.rate / time_base))
        if self._file is None:
            self._file = open(self.path, "wb")
        self._file.write(fragments)
        self._file.flush()  # on disk (the page cache) before append returns: a kill keeps this chunk
        self.frames_written += frames.shape[0]

    def close(self) -> Path:
        """Finish the video; an error removes the file and re-raises."""
        require(self._file is not None, f"no frames were written to {self.path}")
        try:
            self._file.close()
            self._file = None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Remove what was written (nothing is there before the first ``append``)."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # the file is removed anyway
                pass
            self.path.unlink(missing_ok=True)


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
