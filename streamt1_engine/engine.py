"""The user-facing engine: load a streaming video model once, then generate or stream videos with an
optional Stream-T1 search. Everything heavy lives elsewhere; this module validates input, wires the
pieces together and keeps the run record."""
from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import time
import uuid
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .cache import BlockPool, KVPool, PagedKVCache, page_tokens_for
from .config import EngineConfig, SamplerConfig, StreamConfig
from .cuda_graphs import GRAPHS_NEED_CUDA, GraphedDenoiser, NvtxEagerDenoiser, nvtx_available
from .cuda_graphs import compile_blocks as compile_dit_blocks
from .errors import EngineBusy, StreamT1Error, require
from .memory import (DEFAULT_VAE_BYTES_PER_PIXEL, HeapTrimmer, MemoryEstimate, RunShape, available_memory,
                     estimate_memory, refusal, size_text)
from .model.wan import CausalWanDiT
from .profiling import StageTimer
from .prompt_schedule import parse_prompt_schedule, split_schedule
from .sampler import EagerDenoiser, make_schedule
from .scheduler import Demand, RoundRobin, Scheduler
from .search.beam_search import BeamSearch, ChunkRecord
from .search.config import SearchConfig
from .search.executor import batch_bucket, run_batched
from .streams import StreamHandle, StreamRequest, _Progress
from .validation import short_repr

MAX_CHUNKS = 100_000
MAX_FRAME_SIDE = 16384  # pixels: beyond every model's training sizes and any device's memory
ATTENTION_BACKENDS = ("auto", "torch", "triton", "sdpa", "flash_attn", "xformers")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def require_text(text: str, what: str) -> None:
    """Text that cannot be UTF-8 encoded (bytes a command line could not decode) is refused in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StreamT1Error(f"{what} is not valid UTF-8 text (undecodable byte at position {exc.start})") from None


def parse_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StreamT1Error(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        require(torch.cuda.is_available(), f"device {device!r} requested but CUDA is not available here")
        require(dev.index is None or dev.index < torch.cuda.device_count(), f"no CUDA device {dev.index}")
    elif dev.type != "cpu":
        raise StreamT1Error(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    return dev


def parse_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        require(dtype in _DTYPES.values(), f"unsupported dtype {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    require(key in _DTYPES, f"unknown dtype {dtype!r} (use float32, float16 or bfloat16)")
    return _DTYPES[key]


_BACKEND_PACKAGES = {"triton": ("triton", "triton"), "flash_attn": ("flash_attn", "flash-attn"),
                     "xformers": ("xformers", "xformers")}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is the Triton kernel on CUDA and the PyTorch reference elsewhere; explicit choices are
    checked here so a missing package fails at load time with one line, not mid-generation."""
    require(backend in ATTENTION_BACKENDS, f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _importable("triton") else "torch"
    if backend in _BACKEND_PACKAGES:
        module, package = _BACKEND_PACKAGES[backend]
        require(_importable(module), f"attention backend {backend!r} needs the {package} package (pip install {package})")
    if backend == "triton" and device.type != "cuda":
        require(os.environ.get("TRITON_INTERPRET") == "1",
                "attention backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter)")
    if backend in ("flash_attn", "xformers"):
        require(device.type == "cuda", f"attention backend {backend!r} needs a CUDA device")
    return backend


@dataclass
class StreamChunk:
    """One chunk that is final (all surviving beams agree on it)."""

    index: int
    frames: torch.Tensor  # uint8 [T, H, W, 3], CPU
    latents: torch.Tensor  # float32 [C, F, h, w], CPU
    seed: int


@dataclass
class GenerationResult:
    prompt: str
    frames: torch.Tensor  # uint8 [T, H, W, 3], CPU
    latents: torch.Tensor  # float32 [C, F, h, w], CPU
    chunks: list[ChunkRecord]
    fps: int
    info: dict = field(default_factory=dict)

    @classmethod
    def from_chunks(cls, prompt: str, chunks: list[StreamChunk], records: list[ChunkRecord], fps: int,
                    info: dict) -> "GenerationResult":
        """The whole video from a stream's final chunks; ``info`` is the run record (its live ``records``
        entry is left out: the records are ``chunks``)."""
        info = {k: v for k, v in info.items() if k != "records"}
        info["chunk_seeds"] = [c.seed for c in chunks]
        return cls(prompt, torch.cat([c.frames for c in chunks]), torch.cat([c.latents for c in chunks], dim=1),
                   list(records), fps, info)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "num_frames": int(self.frames.shape[0]),
                "frame_size": list(self.frames.shape[1:3]), "fps": self.fps, **self.info,
                "chunks": [c.to_dict() for c in self.chunks]}

    def save_json(self, path) -> None:
        from .video_io import write_json

        write_json(path, self.to_dict())


class StreamT1Engine:
    def __init__(self, model: CausalWanDiT, text_encoder, vae, config: EngineConfig, *, device="cpu",
                 dtype=None, attention_backend: str = "auto", fps: int = 16, name: str = "custom",
                 default_rewards: dict | None = None, use_nvtx: bool = True, cuda_graphs: bool = False,
                 compile_blocks: bool = False, sync_stages: bool = False, memory_limit: int | str | None = "auto",
                 max_streams: int = 4, max_queue: int = 64, kv_pages: int | None = None, max_batch: int | None = None):
        """``cuda_graphs``: replay each chunk's denoising loop and context pass from CUDA graphs (CUDA only;
        ignored with a warning on CPU). ``compile_blocks``: experimental ``torch.compile`` of every DiT block.
        ``sync_stages``: synchronise the device at stage boundaries so per-stage seconds are exact.
        ``memory_limit``: bytes a run may take on top of the loaded weights; "auto" (default) is what the
        device has free (available RAM on CPU), None turns the up-front check off; a request whose estimate does not
        fit alone is refused, one that fits alone but not beside the running streams waits for them.
        ``max_streams``: streams running at once (their candidates denoise in one forward); ``max_queue``:
        requests waiting beyond that (``submit`` refuses past it); ``kv_pages``: a fixed KV pool size in pages, per
        frame size (None: each pool grows to what its admitted streams reserve); ``max_batch``: most candidates
        in one forward (None: no cap beyond ``max_streams``)."""
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.backend = resolve_backend(attention_backend, self.device)
        require(model.config == config.model, "model config does not match the engine config")
        self.model = model.to(self.device, self.dtype).eval()
        self.model.batch_invariant = True  # several streams share a forward; each must equal itself alone
        self.text_encoder, self.vae = text_encoder, vae
        require(isinstance(fps, int) and not isinstance(fps, bool) and 1 <= fps <= 1000,
                f"fps must be an integer in 1..1000, got {short_repr(fps)}")
        self.config, self.fps, self.name = config, fps, name
        self.default_rewards = default_rewards or {}
        self.use_nvtx = use_nvtx
        self._pools: dict[tuple, _Pool] = {}  # one KV pool per page layout, shared by its streams (worker-owned)
        self._last_pool_key: tuple | None = None
        self._turns = RoundRobin()  # which layout's streams take the next chunk step
        self.sync_stages = sync_stages
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        if cuda_graphs and not self.cuda_graphs:
            warnings.warn(GRAPHS_NEED_CUDA, RuntimeWarning, stacklevel=2)
        self._scheduler = Scheduler(max_streams, max_queue, kv_pages, max_batch)
        self.kv_pages = kv_pages
        self._lock = threading.RLock()
        self._trim_heap = HeapTrimmer()  # at chunk boundaries: a long stream's resident size stays flat
        self._wakeup = threading.Condition(self._lock)
        self._handles: dict[str, StreamHandle] = {}  # queued and running, by request id
        self._out_of_memory: dict[str, Callable] = {}
        self._worker_thread: threading.Thread | None = None
        self._closed = False
        self._counts = dict(chunks_done=0, frames_done=0, streams_finished=0, streams_cancelled=0, streams_failed=0)
        _LIVE_ENGINES.add(self)
        require(memory_limit in ("auto", None) or (isinstance(memory_limit, int) and not isinstance(memory_limit, bool)
                                                   and memory_limit > 0),
                f"memory_limit must be 'auto', None or a positive number of bytes, got {memory_limit!r}")
        self.memory_limit = memory_limit
        if compile_blocks:
            compile_dit_blocks(self.model)
        self.schedule = make_schedule(config.sampler)
        require(vae.latent_channels == config.model.in_channels,
                f"VAE latent channels ({vae.latent_channels}) != model input channels ({config.model.in_channels})")

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str | None = "tiny", *, device="cpu", dtype=None, attention_backend="auto",
                        text_encoder: str | None = None, vae: str | None = None, lora: str | None = None,
                        lora_alpha: float | None = None,
                        stream: StreamConfig | None = None, stream_preset: str | None = None,
                        sampler: SamplerConfig | None = None, **kwargs) -> "StreamT1Engine":
        """``source``: "tiny" (the embedded model), "random-tiny", an engine-format directory, a diffusers Wan
        pipeline directory, or a DiT checkpoint (Self-Forcing / CausVid / LongLive / Wan) together with
        ``text_encoder`` and ``vae`` sources; each may be a local path or a hub id. ``lora_alpha``: the alpha the
        ``lora`` was trained with (None = the file's, else its rank); it is merged with scale alpha / rank.
        The attention layout comes from the checkpoint format (``loaders.checkpoint_stream_preset``);
        ``stream_preset`` ("self-forcing", "causvid", "longlive", "stream-t1") overrides it, an explicit
        ``stream`` wins. ``sampler`` replaces the model's few-step schedule (e.g. from
        ``upstream_config.load_upstream_config``). Other keywords go to the constructor (``fps``, ``name`` and
        ``default_rewards`` there override the source's)."""
        from . import loaders  # local import keeps the engine importable without optional parts

        dev = parse_device(device)
        dt = parse_dtype(dtype, dev)
        parts = loaders.load_parts(source or "tiny", device=dev, dtype=dt, text_encoder=text_encoder, vae=vae,
                                   lora=lora, lora_alpha=lora_alpha, stream=stream, stream_preset=stream_preset,
                                   sampler=sampler)
        kwargs = {"fps": parts.fps, "name": parts.name, "default_rewards": parts.default_rewards, **kwargs}
        return cls(parts.model, parts.text_encoder, parts.vae, parts.config, device=dev, dtype=dt,
                   attention_backend=attention_backend, **kwargs)

    def save_pretrained(self, path, *, dtype=None, description: str | None = None):
        """Write an engine-format folder (``streamt1.json``, ``dit.safetensors``, the components' files and specs)
        that ``from_pretrained(path)`` loads into an engine generating the same output. ``dtype``: the DiT
        weights' dtype in the file (default: the engine's, lossless). Returns the folder's path."""
        from .engine_format import save_engine_dir

        return save_engine_dir(path, model=self.model, text_encoder=self.text_encoder, vae=self.vae,
                               stream=self.config.stream, sampler=self.config.sampler, fps=self.fps, name=self.name,
                               rewards=self.default_rewards, description=description,
                               dtype=parse_dtype(dtype, self.device) if dtype is not None else None)

    # -- generation -------------------------------------------------------------------------------
    def _check_request(self, prompt, num_chunks, seed, search, height, width, stream_preset=None):
        self._check_prompt(prompt)
        require(isinstance(num_chunks, int) and not isinstance(num_chunks, bool) and num_chunks >= 1,
                f"num_chunks must be a positive integer, got {num_chunks!r}")
        stream = self.config.stream
        if stream_preset is not None:  # another attention layout over the same latent size: pages stay shareable
            stream = StreamConfig.preset(stream_preset, latent_height=stream.latent_height,
                                         latent_width=stream.latent_width, max_frames=stream.max_frames)
        require(not stream.is_global or num_chunks * stream.chunk_frames <= stream.max_stream_frames,
                f"num_chunks {num_chunks} is too long for global attention: at most "
                f"{stream.max_stream_frames // stream.chunk_frames} chunks ({stream.max_stream_frames} latent frames, "
                "upstream's cache); use a local-attention stream preset such as 'longlive' for longer videos")
        max_chunks = min(MAX_CHUNKS, stream.max_frames // stream.chunk_frames)
        require(num_chunks <= max_chunks, f"num_chunks {num_chunks} is too large: at most {max_chunks} "
                                          f"({stream.max_frames} latent frames of RoPE positions)")
        require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**62,
                f"seed must be an integer in [0, 2**62), got {seed!r}")
        if isinstance(search, str):
            search = SearchConfig(strategy=search)
        require(isinstance(search, SearchConfig), f"search must be a strategy name or SearchConfig, got {search!r}")
        factor = self.vae.spatial_factor
        ph, pw = self.config.model.patch_size[1:]
        lh, lw = stream.latent_height, stream.latent_width
        if height is not None or width is not None:
            height = height if height is not None else lh * factor
            width = width if width is not None else lw * factor
            require(isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0,
                    "height and width must be positive integers")
            # before any estimate: a request's number may be too large even for the arithmetic of one
            require(height <= MAX_FRAME_SIDE and width <= MAX_FRAME_SIDE,
                    f"height and width must be at most {MAX_FRAME_SIDE} pixels")
            require(height % (factor * ph) == 0 and width % (factor * pw) == 0,
                    f"frame size {height}x{width} must be divisible by {factor * ph}x{factor * pw} "
                    f"(VAE factor {factor} x patch {ph}x{pw})")
            lh, lw = height // factor, width // factor
        return search, dataclasses.replace(stream, latent_height=lh, latent_width=lw)

    def _run_shape(self, stream_cfg: StreamConfig, search: SearchConfig, num_chunks: int) -> RunShape:
        f, factor = stream_cfg.chunk_frames, self.vae.spatial_factor
        return RunShape(
            children=search.children_per_beam, survivors=search.survivors, beam_pages=stream_cfg.max_pages_per_beam,
            latent_height=stream_cfg.latent_height, latent_width=stream_cfg.latent_width, chunk_latent_frames=f,
            frames_per_chunk=max(self.vae.frames_per_chunk(True, f), self.vae.frames_per_chunk(False, f)),
            frame_height=stream_cfg.latent_height * factor, frame_width=stream_cfg.latent_width * factor,
            num_chunks=num_chunks, window_chunks=search.window_chunks, uses_rewards=search.uses_rewards,
            dtype_bytes=torch.empty((), dtype=self.dtype).element_size(),
            vae_bytes_per_pixel=getattr(self.vae, "decode_bytes_per_pixel", DEFAULT_VAE_BYTES_PER_PIXEL))

    def _weight_bytes(self) -> int:
        modules = [m for m in (self.model, self.text_encoder) if isinstance(m, torch.nn.Module)]
        return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())

    def _memory_limit(self) -> tuple[int | None, str]:
        if self.memory_limit == "auto":
            free, where = available_memory(self.device)
            # the pool of the previous run is reused or freed before this one allocates: it is room too
            held = sum(p.blocks.kv.nbytes() for p in self._pools.values())
            return free + held, where
        return self.memory_limit, "memory limit"

    def estimate_memory(self, *, num_chunks: int = 7, search: str | SearchConfig = "none", height: int | None = None,
                        width: int | None = None) -> MemoryEstimate:
        """Peak memory of a run with these options (bytes per term; see ``streamt1_engine.memory``)."""
        search, stream_cfg = self._check_request("estimate", num_chunks, 0, search, height, width)
        return estimate_memory(self.config.model, self._run_shape(stream_cfg, search, num_chunks), self._weight_bytes())

    def check_memory(self, *, num_chunks: int = 7, search: str | SearchConfig = "none", height: int | None = None,
                     width: int | None = None) -> MemoryEstimate:
        """The estimate, or StreamT1Error with the largest search (or frame size) that fits ``memory_limit``."""
        search, stream_cfg = self._check_request("check", num_chunks, 0, search, height, width)
        return self._check_memory(stream_cfg, search, num_chunks)[0]

    def _check_memory(self, stream_cfg, search, num_chunks):
        """Refuse up front (one line, with the largest N or frame size that fits) a run that cannot fit."""
        shape = self._run_shape(stream_cfg, search, num_chunks)
        estimate = estimate_memory(self.config.model, shape, self._weight_bytes())
        limit, where = self._memory_limit()
        step = self.vae.spatial_factor * max(self.config.model.patch_size[1:])
        if limit is not None and estimate.run > limit:
            raise StreamT1Error(refusal(self.config.model, shape, estimate, limit, where, search.strategy, step))

        def out_of_memory(chunk: int) -> StreamT1Error:
            # the estimate was too low for this device: suggest what fits in half of what was thought to fit
            room = int(min(limit or estimate.run, estimate.run) * 0.5)
            text = refusal(self.config.model, shape, estimate, room, where, search.strategy, step)
            return StreamT1Error(f"out of memory on {self.device} at chunk {chunk}: {text}")

        return estimate, limit, out_of_memory

    def _rewards(self, search: SearchConfig, short_reward, long_reward, final_reward):
        if not search.uses_rewards:
            return None, None, None
        from .rewards import build_reward, default_long_reward, default_short_reward

        def pick(given, key, default):
            if given is not None:
                return build_reward(given)
            if key in self.default_rewards:
                return build_reward(self.default_rewards[key])
            return default()

        short = pick(short_reward, "short", default_short_reward)
        long = pick(long_reward, "long", default_long_reward)
        final = build_reward(final_reward) if final_reward is not None else long
        return short, long, final

    # -- many streams: submit, the worker thread, handles ---------------------------------------------
    def submit(self, prompt: str, num_chunks: int = 7, seed: int = 42, search: str | SearchConfig = "none",
               height: int | None = None, width: int | None = None, short_reward=None, long_reward=None,
               final_reward=None, prompt_schedule=None,
               callback_on_chunk_end: Callable | None = None, max_buffered_chunks: int = 8,
               request_id: str | None = None, stream_preset: str | None = None) -> StreamHandle:
        """Queue one stream (thread-safe) and return its handle; input errors are raised here, before queueing.

        The engine's worker thread runs one chunk step for every admitted stream per iteration, their
        candidates in one forward; a request's output equals running it alone with the same seed.
        ``prompt_schedule``: {chunk index: prompt}, a switch before that chunk (LongLive's recache), or any form
        ``prompt_schedule.parse_prompt_schedule`` reads (a LongLive JSONL line); a chunk-0 entry must equal ``prompt``.
        ``callback_on_chunk_end(handle, index, record)``: called in the worker after every chunk; returning
        False stops the stream (as ``handle.stop()``). ``max_buffered_chunks``: final chunks the stream may get
        ahead of its consumer before it pauses (backpressure). ``stream_preset``: this stream's attention layout
        ("self-forcing", "longlive", ...; default the engine's), with the engine's latent size."""
        return self._submit(prompt, num_chunks=num_chunks, seed=seed, search=search, height=height, width=width,
                            short_reward=short_reward, long_reward=long_reward, final_reward=final_reward,
                            prompt_schedule=prompt_schedule, callback_on_chunk_end=callback_on_chunk_end,
                            max_buffered_chunks=max_buffered_chunks, request_id=request_id,
                            stream_preset=stream_preset)

    def _submit(self, prompt, *, num_chunks, seed, search, height, width, short_reward, long_reward, final_reward,
                prompt_schedule=None, callback_on_chunk_end=None, max_buffered_chunks=8, request_id=None,
                stream_preset=None,
                info: dict | None = None, report_progress: bool = False) -> StreamHandle:
        search, stream_cfg = self._check_request(prompt, num_chunks, seed, search, height, width, stream_preset)
        estimate, memory_limit, out_of_memory = self._check_memory(stream_cfg, search, num_chunks)
        rewards = self._rewards(search, short_reward, long_reward, final_reward)
        require(search.uses_rewards is False or (rewards[0] is not None and rewards[1] is not None),
                f"search {search.strategy!r} needs a short-term and a long-term reward")
        _, switches = split_schedule(parse_prompt_schedule(prompt_schedule, num_chunks=num_chunks,
                                                               chunk_frames=stream_cfg.chunk_frames), prompt)
        schedule = dict(switches)
        for text in schedule.values():
            self._check_prompt(text)
        require(callback_on_chunk_end is None or callable(callback_on_chunk_end),
                "callback_on_chunk_end must be callable")
        require(isinstance(max_buffered_chunks, int) and not isinstance(max_buffered_chunks, bool)
                and max_buffered_chunks >= 1, f"max_buffered_chunks must be a positive integer, got "
                                              f"{max_buffered_chunks!r}")
        if request_id is None:
            request_id = uuid.uuid4().hex
        require(isinstance(request_id, str) and request_id != "", "request_id must be a non-empty string")
        request = StreamRequest(request_id, prompt, num_chunks, seed, search, stream_cfg, rewards, schedule,
                                callback_on_chunk_end, max_buffered_chunks, report_progress)
        handle = StreamHandle(self, request, info)
        handle.info.update(records=handle.records, memory_estimate=estimate.to_dict(), memory_limit=memory_limit)
        demand = Demand(PagedKVCache.pages_needed(stream_cfg, search.survivors, search.first_chunk_candidates),
                        max(search.first_chunk_candidates, search.survivors * search.children_per_beam),
                        _page_key(stream_cfg), estimate.run)
        with self._lock:
            if not self._scheduler.running:
                # what the streams may take together: the limit as it stands while the engine is idle ("auto":
                # the device's free memory then, which running streams would otherwise seem to shrink)
                self._scheduler.memory_budget = memory_limit
            if self._closed:
                raise EngineBusy("this engine is closed")
            self._scheduler.submit(request_id, demand)
            self._handles[request_id] = handle
            self._out_of_memory[request_id] = out_of_memory
            if self._worker_thread is None:
                self._worker_thread = threading.Thread(target=self._work, name="streamt1-engine", daemon=True)
                _WORKER_THREADS.add(self._worker_thread)
                self._worker_thread.start()
            self._wakeup.notify_all()
        return handle

    async def astream(self, prompt: str, **options):
        """``async for chunk in engine.astream(prompt, ...)``: the options of ``submit``. The stream is cancelled
        when the consumer stops: closed with ``aclose()`` / ``contextlib.aclosing`` (also when its task is
        cancelled), its pages are free when that returns; a generator merely dropped is closed by the event
        loop's finaliser, and its stream cancelled at the worker's next chunk boundary."""
        import asyncio

        handle = self.submit(prompt, **options)
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await loop.run_in_executor(None, handle._next_chunk)
                if chunk is None:
                    return
                yield chunk
        finally:
            if not handle.ended:
                handle.cancel(wait=False)
                await loop.run_in_executor(None, handle._wait_released)

    def stats(self) -> dict:
        with self._lock:
            pools = list(self._pools.values())
            scratch = sum(p.scratch_page is not None for p in pools)
            return dict(queued=len(self._scheduler.queued), running=len(self._scheduler.running),
                        pages_total=sum(p.blocks.num_pages for p in pools) - scratch,
                        pages_in_use=sum(p.blocks.num_in_use for p in pools) - scratch, **self._counts)

    def close(self) -> None:
        """Stop the worker thread; every queued and running stream is cancelled."""
        with self._lock:
            self._closed = True
            worker = self._worker_thread
            self._wakeup.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join()

    def free_pool(self) -> None:
        """Drop the KV pools and the CUDA graphs while no stream runs (the next stream allocates a new pool)."""
        with self._lock:
            require(not self._scheduler.running and not self._scheduler.queued,
                    "the KV pool is in use by running or queued streams")
            self._pools.clear()

    # the pool used last (one layout: the pool), for tests and tools that look at one pool
    @property
    def _blocks(self) -> BlockPool | None:
        pool = self._pools.get(self._last_pool_key)
        return pool.blocks if pool is not None else None

    @property
    def _graphed(self):
        pool = self._pools.get(self._last_pool_key)
        return pool.graphed if pool is not None else None

    @property
    def _scratch_page(self) -> int | None:
        pool = self._pools.get(self._last_pool_key)
        return pool.scratch_page if pool is not None else None

    def _check_prompt(self, prompt) -> None:
        require(isinstance(prompt, str), f"prompt must be a string, got {type(prompt).__name__}")
        require(prompt.strip() != "", "prompt is empty")
        require_text(prompt, "prompt")

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    def _cancel(self, handle: StreamHandle) -> None:
        with self._lock:
            if self._scheduler.is_queued(handle.request_id):
                self._drop_queued(handle.request_id)
            elif handle.ended:
                handle.mark_released()
            self._wakeup.notify_all()

    def _drop_queued(self, request_id: str) -> None:
        """A request that never ran leaves the queue cancelled (it holds no pages). Called with the lock held."""
        self._scheduler.finish(request_id)
        handle = self._handles.pop(request_id)
        self._out_of_memory.pop(request_id, None)
        self._counts["streams_cancelled"] += 1
        handle.end("cancelled")
        handle.mark_released()

    # -- the worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        active: dict[str, _Active] = {}
        idle_since = None
        try:
            while True:
                with self._lock:
                    if self._closed:
                        break
                    admitted = self._admit()
                    if not active and not admitted and not self._scheduler.queued:
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since > WORKER_IDLE_EXIT_S:
                            self._worker_thread = None  # a later submit starts a new one
                            return
                        self._wakeup.wait(0.05)
                        continue
                idle_since = None
                for request_id in admitted:
                    self._start(active, request_id)
                self._boundary(active)
                ready = [a for a in active.values() if not a.search_done and a.handle.has_room()
                         and not a.handle.cancel_requested]
                if ready:
                    # one layout's streams per step (they share forwards); the layouts take turns, and new
                    # requests are admitted between the turns
                    key = self._turns.pick(list(dict.fromkeys(a.page_key for a in ready)))
                    with torch.inference_mode():
                        self._step([a for a in ready if a.page_key == key], self._pools[key])
                    self._boundary(active)
                    self._turns.forget(a.page_key for a in active.values())
                    self._trim_heap()
                else:
                    with self._lock:
                        if not self._closed:
                            self._wakeup.wait(0.05)
        except BaseException as exc:  # noqa: BLE001 - the worker must not die silently with streams waiting
            for a in list(active.values()):
                self._fail(active, a, exc)
            raise
        finally:
            for a in list(active.values()):
                self._end(active, a, "cancelled")
            with self._lock:
                for request_id in self._scheduler.queued:
                    self._drop_queued(request_id)
                if self._worker_thread is threading.current_thread():
                    self._worker_thread = None

    def _admit(self) -> list[str]:
        """Admit what fits and size each layout's pool for it (at a chunk boundary: no forward is in flight).
        Called with the lock held. A pool that cannot grow within the device's memory fails the requests that
        needed it (one line) instead of running out of memory."""
        admitted = self._scheduler.admit()
        if not admitted:
            return admitted
        in_use = set(self._scheduler.page_keys)
        for key in [k for k in self._pools if k not in in_use]:
            del self._pools[key]  # a layout no stream uses any more: its memory goes to the others
        by_key: dict[tuple, list[str]] = {}
        for request_id in admitted:
            by_key.setdefault(_page_key(self._handles[request_id].request.stream), []).append(request_id)
        for key, ids in by_key.items():
            try:
                self._ensure_pool(key, self._handles[ids[0]].request.stream)
            except StreamT1Error as exc:
                for request_id in ids:
                    admitted.remove(request_id)
                    self._refuse_admitted(request_id, exc)
        return admitted

    def _ensure_pool(self, key: tuple, stream_cfg: StreamConfig) -> None:
        """This layout's pool holds what its running streams reserve; grown without holding two copies on a
        CUDA device (``BlockPool.grow`` stages the old pages on the host)."""
        scratch = 1 if self.cuda_graphs else 0  # the page dummy rows of a padded batch write
        need = (self.kv_pages if self.kv_pages is not None else self._scheduler.pages_reserved_for(key)) + scratch
        pool = self._pools.get(key)
        self._last_pool_key = key
        if pool is not None and pool.blocks.num_pages >= need:
            return
        page_tokens = page_tokens_for(self.config.model, stream_cfg)
        cfg = self.config.model
        page_bytes = KVPool.page_bytes(cfg, page_tokens, self.dtype)
        staged = self.device.type == "cuda"
        freed_first = pool.blocks.kv.nbytes() if pool is not None and staged else 0
        room = self._pool_room()
        if room is not None and need * page_bytes > room[0] + freed_first:
            raise StreamT1Error(
                f"the KV pool for {stream_cfg.latent_height}x{stream_cfg.latent_width} latents would grow to {need} "
                f"pages ({size_text(need * page_bytes)}), more than the {size_text(room[0] + freed_first)} {room[1]}; "
                "run fewer streams at once (max_streams) or a smaller search")
        if pool is None:
            try:
                blocks = BlockPool.allocate(cfg, need, page_tokens, self.device, self.dtype)
            except (torch.OutOfMemoryError, RuntimeError, MemoryError):  # also a size past what torch can index
                raise StreamT1Error(f"allocating a KV pool of {need} pages ({size_text(need * page_bytes)}) ran out "
                                    f"of memory on {self.device}; run fewer streams at once or a smaller search"
                                    ) from None
            self._pools[key] = _Pool(blocks, blocks.alloc() if scratch else None)
        else:
            pool.graphed = None  # the graphs read the old pool's tensors: captured again
            pool.blocks.grow(need, stage_on="cpu" if staged else None)

    def _pool_room(self) -> tuple[int, str] | None:
        """(bytes, where) a pool may newly take on the device, or None (no check). With an explicit limit the
        scheduler's budget already counts every stream's pages; "auto" also asks the device what is free now."""
        return available_memory(self.device) if self.memory_limit == "auto" else None

    def _refuse_admitted(self, request_id: str, exc: BaseException) -> None:
        """An admitted request that never started fails (it holds no pages). Called with the lock held."""
        self._scheduler.finish(request_id)
        handle = self._handles.pop(request_id)
        self._out_of_memory.pop(request_id, None)
        self._counts["streams_failed"] += 1
        handle.end("failed", exc)
        handle.mark_released()

    def _batch_denoiser(self, text, pool: "_Pool", batch: list["_Active"]):
        """One denoiser for every stream of the pool; each call carries its own prompt context. The eager
        loop stops between denoising steps once every stream of the batch is cancelled."""
        if self.cuda_graphs:
            if pool.graphed is None or pool.graphed.pool is not pool.blocks.kv:
                pool.graphed = None
                pool.graphed = GraphedDenoiser(self.model, self.schedule, text, pool.blocks.kv,
                                               self.config.sampler.context_timestep)
            return pool.graphed

        def stop_if_all_cancelled(step: int) -> None:
            if all(a.handle.cancel_requested for a in batch):
                raise _Cancelled(step)

        kind = NvtxEagerDenoiser if self.use_nvtx and nvtx_available() else EagerDenoiser
        return kind(self.model, self.schedule, text, self.config.sampler.context_timestep,
                    between_steps=stop_if_all_cancelled)

    def _encode(self, prompt: str):
        text_states = self.text_encoder.encode([prompt]).to(self.device)
        return self.model.encode_text(text_states)

    def _start(self, active: dict, request_id: str) -> None:
        handle = self._handles[request_id]
        req = handle.request
        a = _Active(handle, StageTimer(use_nvtx=self.use_nvtx, synchronize=self.sync_stages),
                    self._out_of_memory.pop(request_id), _page_key(req.stream))
        active[request_id] = a
        try:
            with torch.inference_mode(), a.timer.range("text_encode"):
                text = self._encode(req.prompt)
            cfg = req.stream
            cache = PagedKVCache.shared(self._pools[a.page_key].blocks, self.config.model, cfg,
                                        "triton" if self.backend == "triton" else "torch")
            latent_shape = (self.config.model.in_channels, cfg.chunk_frames, cfg.latent_height, cfg.latent_width)
            short, long, _ = req.rewards
            a.runner = BeamSearch(model=self.model, vae=self.vae, cache=cache, text=text, prompt=req.prompt,
                                  search=req.search, schedule=self.schedule, num_chunks=req.num_chunks,
                                  seed=req.seed, latent_shape=latent_shape, short_reward=short, long_reward=long,
                                  attention_backend=self.backend, hooks=a.timer,
                                  context_timestep=self.config.sampler.context_timestep,
                                  # the engine runs the DiT work itself (batched); this one serves a direct step()
                                  denoiser=EagerDenoiser(self.model, self.schedule, text,
                                                         self.config.sampler.context_timestep))
            a.runner.records = handle.records
            handle.set_status("running")
        except Exception as exc:  # noqa: BLE001 - this stream fails, the others go on
            self._fail(active, a, exc)

    def _step(self, ready: list["_Active"], pool: "_Pool") -> None:
        """One chunk for every ready stream of one pool: their denoise work in one call, then their context
        passes. A cancelled stream leaves at once: between denoising steps (the eager loop), after the denoise
        call (no VAE decode, rewards or context pass for it), and before the context pass."""
        gens, works = {}, {}
        for a in ready:
            try:
                self._apply_prompt_switches(a)
                gens[a] = a.runner.phases()
                works[a] = next(gens[a])
            except Exception as exc:  # noqa: BLE001
                self._fail_soon(a, self._map_error(a, exc))

        def drop(a: "_Active") -> None:
            gens[a].close()  # the chunk is abandoned; its pages return with the stream's at the boundary
            del works[a]

        for phase in ("denoise", "context_pass"):
            for a in [a for a in works if a.handle.cancel_requested]:
                drop(a)
            batch = [a for a in ready if a in works]
            if not batch:
                return
            denoiser = self._batch_denoiser(works[batch[0]].text, pool, batch)
            rows = sum(works[a].rows for a in batch)
            pad = batch_bucket(rows) if self.cuda_graphs and len(batch) > 1 else None
            started = time.perf_counter()
            try:
                with batch[0].timer.range(phase):  # one profiler range per batched call
                    results = run_batched(denoiser, [works[a] for a in batch], pad_to=pad,
                                          scratch_page=pool.scratch_page)
            except _Cancelled:  # every stream of the call was cancelled mid-chunk
                for a in batch:
                    drop(a)
                return
            except Exception as exc:  # noqa: BLE001 - the batched forward failed: every stream in it fails
                for a in batch:
                    self._fail_soon(a, self._map_error(a, exc))
                return
            seconds = time.perf_counter() - started
            for i, (a, result) in enumerate(zip(batch, results)):
                if i:  # every stream of the batch waited for the whole call
                    a.timer.seconds[phase] += seconds
                    a.timer.calls[phase] += 1
                if a.handle.cancel_requested:
                    drop(a)
                    continue
                try:
                    works[a] = gens[a].send(result)
                except StopIteration as done:
                    del works[a]
                    self._after_chunk(a, done.value)
                except Exception as exc:  # noqa: BLE001 - this stream's host work failed
                    del works[a]
                    self._fail_soon(a, self._map_error(a, exc))

    def _map_error(self, a: "_Active", exc: BaseException) -> BaseException:
        oom = isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                          and "can't allocate memory" in str(exc))
        return a.out_of_memory(a.runner.chunk_index) if oom else exc

    def _fail_soon(self, a: "_Active", exc: BaseException) -> None:
        a.error = exc  # ended at the boundary right after the step

    def _apply_prompt_switches(self, a: "_Active") -> None:
        req, runner = a.handle.request, a.runner
        switches = list(a.handle.prompt_switches)
        a.handle.prompt_switches.clear()
        scheduled = req.prompt_schedule.get(runner.chunk_index)
        if scheduled is not None and runner.chunk_index not in a.switched_at:
            a.switched_at.add(runner.chunk_index)
            switches.insert(0, scheduled)
        for prompt in switches:
            runner.switch_prompt(prompt, self._encode(prompt))

    def _after_chunk(self, a: "_Active", record) -> None:
        handle, req, runner = a.handle, a.handle.request, a.runner
        c = record.index
        with self._lock:
            self._counts["chunks_done"] += 1
        if req.report_progress:
            handle.put(_Progress(c + 1, req.num_chunks))
        if req.callback_on_chunk_end is not None:
            try:
                if req.callback_on_chunk_end(handle, c, record) is False:
                    handle.stop_requested = True
            except Exception as exc:  # noqa: BLE001
                self._fail_soon(a, exc)
                return
        try:
            if runner.chunk_index >= req.num_chunks or handle.stop_requested:
                self._finish_search(a)
                return
            final_nodes = runner.final_chunks()
            for node in final_nodes[a.emitted:]:
                a.pending.append(_to_stream_chunk(node))
                runner.mark_emitted(node)
            a.emitted = max(a.emitted, len(final_nodes))
        except Exception as exc:  # noqa: BLE001
            self._fail_soon(a, exc)

    def _finish_search(self, a: "_Active") -> None:
        """The final pick over what exists; its remaining chunks wait for room, the pages are free at once."""
        handle, req, runner = a.handle, a.handle.request, a.runner
        if runner.chunk_index > 0:
            pool = self._pools[a.page_key]
            with torch.inference_mode(), a.timer.range("final_pick"):
                best, beam_scores = runner.choose_final(req.rewards[2])
            for node in runner.beams[best].node.lineage()[a.emitted:]:
                a.pending.append(_to_stream_chunk(node))
            handle.info.update(
                records=handle.records, chosen_beam=best, final_beam_scores=beam_scores,
                search=req.search.used_dict(), stream=req.stream.to_dict(), seed=req.seed,
                num_chunks=req.num_chunks, model=self.name, device=str(self.device),
                dtype=str(self.dtype).removeprefix("torch."), attention_backend=self.backend,
                kv_pool_pages=pool.blocks.num_pages, kv_pool_bytes=pool.blocks.kv.nbytes(),
                seconds=round(time.perf_counter() - a.started, 4), stages=a.timer.summary(),
                cuda_graphs=self.cuda_graphs,
                graph_capture_seconds=dict(pool.graphed.capture_seconds) if pool.graphed else {})
            if runner.prompt_switches:
                handle.info["prompt_switches"] = [s.to_dict() for s in runner.prompt_switches]
        a.search_done = True
        a.final_status = "stopped" if handle.stop_requested else "finished"
        self._release(a)

    def _release(self, a: "_Active", mark: bool = True) -> None:
        if a.runner is not None:
            a.runner.release()
        a.pages_returned = True
        with self._lock:
            self._scheduler.finish(a.handle.request_id)
            self._wakeup.notify_all()
        if mark:
            a.handle.mark_released()

    def _boundary(self, active: dict) -> None:
        """Between chunk steps: cancels, failures, early stops, and chunks moved to the consumers' queues."""
        for a in list(active.values()):
            handle = a.handle
            if handle.cancel_requested:
                self._end(active, a, "cancelled")
                continue
            if a.error is not None:
                self._fail(active, a, a.error)
                continue
            if handle.stop_requested and not a.search_done:
                try:
                    self._finish_search(a)
                except Exception as exc:  # noqa: BLE001
                    self._fail(active, a, exc)
                    continue
            while a.pending and handle.has_room():
                chunk = a.pending.popleft()
                handle.put(chunk)
                with self._lock:
                    self._counts["frames_done"] += int(chunk.frames.shape[0])
            if a.search_done and not a.pending:
                self._end(active, a, a.final_status)

    def _fail(self, active: dict, a: "_Active", exc: BaseException) -> None:
        """A failed stream keeps the chunks it already made final (delivered before the error)."""
        for chunk in a.pending:
            a.handle.put(chunk)
        a.pending.clear()
        self._end(active, a, "failed", exc)

    def _end(self, active: dict, a: "_Active", status: str, error: BaseException | None = None) -> None:
        """The stream is over: pages back (if not yet), counted, the consumer told, then a waiting cancel()."""
        if not a.pages_returned:
            self._release(a, mark=False)
        active.pop(a.handle.request_id, None)
        with self._lock:
            self._handles.pop(a.handle.request_id, None)
            key = {"finished": "streams_finished", "stopped": "streams_finished", "cancelled": "streams_cancelled",
                   "failed": "streams_failed"}[status]
            self._counts[key] += 1
        a.handle.end(status, error)
        a.handle.mark_released()

    # -- the single-stream API on top of submit() -----------------------------------------------------
    def stream(self, prompt: str, *, num_chunks: int = 7, seed: int = 42, search: str | SearchConfig = "none",
               short_reward=None, long_reward=None, final_reward=None, height: int | None = None,
               width: int | None = None, progress: Callable[[int, int], None] | None = None,
               info: dict | None = None, prompt_schedule=None, stream_preset: str | None = None
               ) -> Iterator[StreamChunk]:
        """Yield each chunk as soon as every surviving beam agrees on it; the rest after the final pick.

        ``search``: "none", "best_of_n", "stream_t1" or a SearchConfig. Rewards: names, reward objects or
        callables ``f(frames [N, T, 3, H, W] in [0, 1], prompt) -> [N]`` (defaults: the model's, else the
        weight-free built-ins). ``progress(done, total)`` is called after every chunk, in the caller's thread.
        ``prompt_schedule``, ``stream_preset``: as in ``submit``.

        The stream is submitted at the first ``next()``; several streams (generators, threads) run at once,
        their candidates batched. Closing the generator early cancels the stream.

        ``info``: a dict that the run record fills as the stream goes (``records``, the per-chunk search
        records, and ``memory_estimate`` from the start; the rest once the stream has finished)."""
        return self._stream(prompt, num_chunks=num_chunks, seed=seed, search=search, short_reward=short_reward,
                            long_reward=long_reward, final_reward=final_reward, height=height, width=width,
                            progress=progress, info=info, prompt_schedule=prompt_schedule,
                            stream_preset=stream_preset)

    def _stream(self, prompt, *, progress, info, **options) -> Iterator[StreamChunk]:
        handle = self._submit(prompt, info=info, report_progress=progress is not None, **options)
        try:
            for item in handle._events():
                if isinstance(item, _Progress):
                    progress(item.done, item.total)
                else:
                    yield item
        finally:
            if not handle.ended:
                handle.cancel()

    def generate(self, prompt: str, *, num_chunks: int = 7, seed: int = 42, search: str | SearchConfig = "none",
                 **kwargs) -> GenerationResult:
        """Run the whole stream and return frames uint8 [T, H, W, 3], latents and the per-chunk records."""
        info: dict[str, Any] = {}
        options = dict(short_reward=None, long_reward=None, final_reward=None, height=None, width=None, progress=None,
                       prompt_schedule=None, stream_preset=None)
        unknown = set(kwargs) - set(options)
        require(not unknown, f"unknown generate() options: {sorted(unknown)}")
        options.update(kwargs)
        chunks = list(self._stream(prompt, num_chunks=num_chunks, seed=seed, search=search, info=info, **options))
        return GenerationResult.from_chunks(prompt, chunks, info["records"], self.fps, info)


WORKER_IDLE_EXIT_S = 2.0  # an idle worker thread ends; the next submit starts another
_LIVE_ENGINES: "weakref.WeakSet[StreamT1Engine]" = weakref.WeakSet()
_WORKER_THREADS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


@atexit.register
def _close_engines_at_exit() -> None:
    """A worker thread still running Python when the interpreter tears down aborts the process (inside a forward,
    or freeing the last reference to its engine's tensors after an idle exit): stop them, then wait for every
    worker thread, including those already on their way out."""
    for engine in list(_LIVE_ENGINES):
        engine.close()
    for thread in list(_WORKER_THREADS):
        if thread is not threading.current_thread():
            thread.join()


def _page_key(stream_cfg: StreamConfig) -> tuple:
    return (stream_cfg.chunk_frames, stream_cfg.latent_height, stream_cfg.latent_width)


@dataclass(eq=False)
class _Pool:
    """The KV pool of one page layout and what is bound to it."""

    blocks: BlockPool
    scratch_page: int | None  # the page dummy rows of a padded batch write (CUDA graphs)
    graphed: Any = None  # GraphedDenoiser captured against blocks.kv


class _Cancelled(Exception):
    """Raised between denoising steps when every stream of the batched call was cancelled."""


@dataclass(eq=False)
class _Active:
    """Worker-side state of one admitted stream."""

    handle: StreamHandle
    timer: StageTimer
    out_of_memory: Callable
    page_key: tuple  # its pool's layout
    runner: BeamSearch | None = None
    started: float = field(default_factory=time.perf_counter)
    emitted: int = 0  # chunks of the lineage already made final
    pending: deque = field(default_factory=deque)  # final chunks waiting for room in the handle's queue
    search_done: bool = False
    final_status: str = "finished"
    error: BaseException | None = None
    switched_at: set = field(default_factory=set)
    pages_returned: bool = False

def _to_stream_chunk(node) -> StreamChunk:
    latents = node.latents.float().cpu()
    # checked on the host copy the output needs anyway: no extra device synchronisation
    if not bool(torch.isfinite(latents).all()):
        raise StreamT1Error(f"chunk {node.index} has non-finite latents (NaN or infinity): the model's weights or "
                            "inputs are corrupt, or the dtype overflows")
    return StreamChunk(node.index, node.frames.cpu(), latents, node.seed)


__all__ = ["StreamT1Engine", "GenerationResult", "StreamChunk", "parse_device", "parse_dtype"]
