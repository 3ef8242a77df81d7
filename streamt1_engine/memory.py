"""Peak memory of a run, estimated up front from shapes alone (plain arithmetic, no tensors), and the memory
the device has for it; a run that cannot fit is refused before any work with the largest search (or frame
size) that would.

The estimate is deliberately an upper bound of the dominant terms: the shared KV pool, one DiT layer's
activations for all N candidates (hidden states, FFN, the gathered keys/values each candidate attends to),
the VAE decode of N chunks, the reward batch (N clips of the long-term window) and the decoded frames kept
for the output. Weights are loaded before the check and counted apart.
"""
from __future__ import annotations

import ctypes
import os
import re
import time
from dataclasses import asdict, dataclass, replace

import torch

from .config import WanConfig
from .errors import require

# Float32 working copies per decoded output value (input planes, intermediates, clamp/convert); a VAE class
# may override with a ``decode_bytes_per_pixel`` attribute (per output pixel of one frame, all channels).
DEFAULT_VAE_BYTES_PER_PIXEL = 3 * 4 * 4
# Copies of the window clips a reward holds (float frames, the model's resized/normalised input).
REWARD_COPIES = 3


@dataclass(frozen=True)
class RunShape:
    """What fixes a run's memory besides the model: search width, frame size and stream length."""

    children: int  # B, candidates per surviving beam (num_candidates for best_of_n)
    survivors: int  # K, beams kept per chunk
    beam_pages: int  # the most cache pages one beam holds (grown sink + window)
    latent_height: int
    latent_width: int
    chunk_latent_frames: int
    frames_per_chunk: int  # decoded frames per chunk
    frame_height: int
    frame_width: int
    num_chunks: int
    window_chunks: int
    uses_rewards: bool
    dtype_bytes: int
    vae_bytes_per_pixel: int = DEFAULT_VAE_BYTES_PER_PIXEL


    @property
    def candidates(self) -> int:
        return self.children * self.survivors

    @property
    def kv_pages(self) -> int:
        """Pages of the shared pool, as ``PagedKVCache.pages_needed`` allocates them."""
        k = self.survivors
        return k * (self.beam_pages + 2) + max(self.candidates - k, 0)


@dataclass(frozen=True)
class MemoryEstimate:
    kv_pool: int
    activations: int
    vae: int
    rewards: int
    frames: int
    weights: int

    @property
    def run(self) -> int:
        """Bytes the run needs on top of the loaded weights."""
        return self.kv_pool + self.activations + self.vae + self.rewards + self.frames

    @property
    def total(self) -> int:
        return self.run + self.weights

    def to_dict(self) -> dict:
        return {**asdict(self), "run": self.run, "total": self.total}

    def describe(self) -> str:
        parts = ", ".join(f"{name.replace('_', ' ')} {size_text(getattr(self, name))}"
                          for name in ("kv_pool", "activations", "vae", "rewards", "frames"))
        return f"{size_text(self.run)} ({parts})"


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def size_text(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1, so a small size never reads as 0.00 GiB."""
    if n < 1024:
        return f"{n} bytes" if n != 1 else "1 byte"
    value, unit = float(n), "bytes"
    for unit in _UNITS:
        value /= 1024
        if value < 1024:
            break
    return f"{value:.2f} {unit}"


def estimate_memory(model: WanConfig, shape: RunShape, weight_bytes: int = 0) -> MemoryEstimate:
    ph, pw = model.patch_size[1:]
    chunk_tokens = shape.chunk_latent_frames * (shape.latent_height // ph) * (shape.latent_width // pw)
    n, b = shape.candidates, shape.dtype_bytes
    kv_pool = 2 * model.num_layers * shape.kv_pages * chunk_tokens * model.dim * b
    key_tokens = (shape.beam_pages + 1) * chunk_tokens  # a candidate reads its beam's pages and its own chunk
    hidden = n * chunk_tokens * (8 * model.dim + 2 * model.ffn_dim) * b
    gathered = n * key_tokens * model.dim * 4 * 4  # float32 keys, rotated keys, values, concatenation
    # the clean context pass of K survivors runs after the N candidates, so it never adds to their peak
    activations = hidden + gathered
    pixels = shape.frames_per_chunk * shape.frame_height * shape.frame_width
    vae = n * pixels * shape.vae_bytes_per_pixel
    rewards = n * shape.window_chunks * pixels * 3 * 4 * REWARD_COPIES if shape.uses_rewards else 0
    # decoded uint8 frames of every surviving lineage (the final pick scores whole videos) and their latents
    frames = shape.survivors * shape.num_chunks * pixels * 3 * (2 if shape.uses_rewards else 1)
    return MemoryEstimate(kv_pool, activations, vae, rewards, frames, weight_bytes)


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for the run, where the number comes from) on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable by torch
        return int(free + cached), f"free on {device}"
    return host_available_memory(), "available RAM"


def host_available_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages; cgroup limits where they are lower."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 1 << 62  # unknown: do not refuse
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _cgroup_room() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(int(text) - int(f.read().strip()), 0)
    except (OSError, ValueError):
        return None


def parse_size(text: str) -> int | None:
    """'16G', '512M', '1.5GiB', '3000000000' -> bytes; 'none' / 'off' -> None (no check)."""
    value = str(text).strip().lower()
    if value in ("none", "off"):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?", value)
    require(match is not None and float(match.group(1)) > 0,
            f"memory limit {text!r} is not a positive size (e.g. 16G, 512M or a number of bytes)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def _glibc_malloc_trim():
    """glibc's ``malloc_trim`` where the C library has it (not musl, macOS or Windows), else None."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Hands the C heap's free pages back to the system at chunk boundaries, so a stream that runs for hours
    keeps a flat resident size. Live memory is flat over a long stream, but each chunk's temporaries are
    allocated by the worker and compute threads and freed by others, in per-thread glibc arenas: their free
    pages stay resident (fragmentation) unless trimmed. ``malloc_trim(0)`` takes about a millisecond at a few
    hundred MB; it runs at most every ``min_interval_s`` (the first call always), a no-op off glibc."""

    def __init__(self, min_interval_s: float = 0.2):
        self.min_interval_s = min_interval_s
        self.trims = 0
        self._trim = _glibc_malloc_trim()
        self._last = float("-inf")

    def __call__(self) -> None:
        now = time.monotonic()
        if self._trim is not None and now - self._last >= self.min_interval_s:
            self._last = now
            self._trim(0)
            self.trims += 1


def largest_fitting(fits, high: int) -> int:
    """The largest n in [1, high] with fits(n) (fits must be monotone), 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def refusal(model: WanConfig, shape: RunShape, estimate: MemoryEstimate, limit: int, where: str, strategy: str,
            step: int) -> str:
    """The one-line refusal: the estimate, the limit, and the largest search (else frame size) that fits."""
    def fits(s: RunShape) -> bool:
        return estimate_memory(model, s).run <= limit

    head = f"estimated peak memory {estimate.describe()} exceeds the {size_text(limit)} {where}"
    tail = "or set a higher --memory-limit" if where == "memory limit" else "or pass --memory-limit to override"
    b, k = shape.children, shape.survivors
    if strategy == "stream_t1":
        top_k = largest_fitting(lambda k: fits(replace(shape, survivors=k)), k)
        if top_k:
            return f"{head}; at most --top-k {top_k} fits with --beam-size {b} ({b * top_k} candidates per chunk), {tail}"
        beam = largest_fitting(lambda b: fits(replace(shape, children=b, survivors=1)), b)
        if beam:
            return f"{head}; at most --beam-size {beam} fits with --top-k 1 ({beam} candidates per chunk), {tail}"
    elif strategy == "best_of_n":
        n = largest_fitting(lambda n: fits(replace(shape, children=n)), b)
        if n:
            return f"{head}; at most --num-candidates {n} fits, {tail}"
    one = replace(shape, children=1, survivors=1)
    ratio = shape.frame_width / shape.frame_height

    def sized(h: int) -> RunShape:
        w = max(step, int(h * ratio) // step * step)
        return replace(one, frame_height=h, frame_width=w,
                       latent_height=max(1, shape.latent_height * h // shape.frame_height),
                       latent_width=max(1, shape.latent_width * w // shape.frame_width))

    m = largest_fitting(lambda m: fits(sized(m * step)), max(shape.frame_height // step, 1))
    if m:
        s = sized(m * step)
        return f"{head}; with one candidate per chunk at most --height {s.frame_height} --width {s.frame_width} " \
               f"fits, {tail}"
    return f"{head}; even one candidate at the smallest frame size does not fit, {tail}"
