"""The user-facing engine: load a streaming video model once, then generate or stream videos with an
optional Stream-T1 search. Everything heavy lives elsewhere; this module validates input, wires the
pieces together and keeps the run record."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .cache import PagedKVCache
from .config import EngineConfig, SamplerConfig, StreamConfig
from .cuda_graphs import GRAPHS_NEED_CUDA, GraphedDenoiser, NvtxEagerDenoiser, nvtx_available
from .cuda_graphs import compile_blocks as compile_dit_blocks
from .errors import StreamT1Error, require
from .memory import DEFAULT_VAE_BYTES_PER_PIXEL, MemoryEstimate, RunShape, available_memory, estimate_memory, refusal
from .model.wan import CausalWanDiT
from .profiling import StageTimer
from .sampler import make_schedule
from .search.beam_search import BeamSearch, ChunkRecord
from .search.config import SearchConfig

MAX_CHUNKS = 100_000
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
                 compile_blocks: bool = False, sync_stages: bool = False, memory_limit: int | str | None = "auto"):
        """``cuda_graphs``: replay each chunk's denoising loop and context pass from CUDA graphs (CUDA only;
        ignored with a warning on CPU). ``compile_blocks``: experimental ``torch.compile`` of every DiT block.
        ``sync_stages``: synchronise the device at stage boundaries so per-stage seconds are exact.
        ``memory_limit``: bytes a run may take on top of the loaded weights; "auto" (default) is what the
        device has free (available RAM on CPU), None turns the up-front check off."""
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        self.backend = resolve_backend(attention_backend, self.device)
        require(model.config == config.model, "model config does not match the engine config")
        self.model = model.to(self.device, self.dtype).eval()
        self.text_encoder, self.vae = text_encoder, vae
        self.config, self.fps, self.name = config, fps, name
        self.default_rewards = default_rewards or {}
        self.use_nvtx = use_nvtx
        self._cache: PagedKVCache | None = None
        self.sync_stages = sync_stages
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        if cuda_graphs and not self.cuda_graphs:
            warnings.warn(GRAPHS_NEED_CUDA, RuntimeWarning, stacklevel=2)
        self._graphed = None  # GraphedDenoiser bound to self._cache's pool
        self._running = threading.Lock()  # held by the one stream that owns the KV pool and the graphs
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
        ``upstream_config.load_upstream_config``)."""
        from . import loaders  # local import keeps the engine importable without optional parts

        dev = parse_device(device)
        dt = parse_dtype(dtype, dev)
        parts = loaders.load_parts(source or "tiny", device=dev, dtype=dt, text_encoder=text_encoder, vae=vae,
                                   lora=lora, lora_alpha=lora_alpha, stream=stream, stream_preset=stream_preset,
                                   sampler=sampler)
        return cls(parts.model, parts.text_encoder, parts.vae, parts.config, device=dev, dtype=dt,
                   attention_backend=attention_backend, fps=parts.fps, name=parts.name,
                   default_rewards=parts.default_rewards, **kwargs)

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
    def _check_request(self, prompt, num_chunks, seed, search, height, width):
        require(isinstance(prompt, str) and prompt.strip() != "", "prompt is empty")
        require_text(prompt, "prompt")
        require(isinstance(num_chunks, int) and not isinstance(num_chunks, bool) and num_chunks >= 1,
                f"num_chunks must be a positive integer, got {num_chunks!r}")
        stream = self.config.stream
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
            held = self._cache.pool.nbytes() if self._cache is not None else 0
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

    def _cache_for(self, stream_cfg: StreamConfig, search: SearchConfig) -> PagedKVCache:
        """Reuse the pool of the previous run when it fits: no reallocation, and captured graphs stay valid."""
        pages = PagedKVCache.pages_needed(stream_cfg, search.survivors, search.first_chunk_candidates)
        cache = self._cache
        if cache is None or cache.stream != stream_cfg or cache.pool.num_pages < pages:
            self._cache = None  # free the old pool before allocating the new one
            merge_backend = "triton" if self.backend == "triton" else "torch"
            cache = PagedKVCache(self.config.model, stream_cfg, pages, self.device, self.dtype, merge_backend)
            self._cache = cache
        cache.reset()
        return cache

    def _denoiser_for(self, cache: PagedKVCache, text):
        """Graphs are kept across runs while the pool is reused; None means BeamSearch's eager default."""
        if self.cuda_graphs:
            if self._graphed is None or self._graphed.pool is not cache.pool:
                self._graphed = None  # release the old graphs before capturing against a new pool
                self._graphed = GraphedDenoiser(self.model, self.schedule, text, cache.pool,
                                                self.config.sampler.context_timestep)
            else:
                self._graphed.set_text(text)
            return self._graphed
        if self.use_nvtx and nvtx_available():
            return NvtxEagerDenoiser(self.model, self.schedule, text, self.config.sampler.context_timestep)
        return None

    def stream(self, prompt: str, *, num_chunks: int = 7, seed: int = 42, search: str | SearchConfig = "none",
               short_reward=None, long_reward=None, final_reward=None, height: int | None = None,
               width: int | None = None, progress: Callable[[int, int], None] | None = None,
               info: dict | None = None) -> Iterator[StreamChunk]:
        """Yield each chunk as soon as every surviving beam agrees on it; the rest after the final pick.

        ``search``: "none", "best_of_n", "stream_t1" or a SearchConfig. Rewards: names, reward objects or
        callables ``f(frames [N, T, 3, H, W] in [0, 1], prompt) -> [N]`` (defaults: the model's, else the
        weight-free built-ins). ``progress(done, total)`` is called after every chunk.

        An engine runs one stream at a time (it owns one KV pool): while this generator is neither exhausted
        nor closed, another ``stream``/``generate`` on the same engine raises StreamT1Error.

        ``info``: a dict that the run record fills as the stream goes (``records``, the per-chunk search
        records, and ``memory_estimate`` from the start; the rest once the stream has finished)."""
        return self._stream(prompt, num_chunks=num_chunks, seed=seed, search=search, short_reward=short_reward,
                            long_reward=long_reward, final_reward=final_reward, height=height, width=width,
                            progress=progress, info=info)

    def _stream(self, prompt, *, num_chunks, seed, search, short_reward, long_reward, final_reward, height, width,
                progress, info: dict | None) -> Iterator[StreamChunk]:
        search, stream_cfg = self._check_request(prompt, num_chunks, seed, search, height, width)
        estimate, memory_limit, out_of_memory = self._check_memory(stream_cfg, search, num_chunks)
        short, long, final = self._rewards(search, short_reward, long_reward, final_reward)
        # One KV pool and one set of CUDA graphs per engine: a second stream running at the same time (an
        # interleaved generator, another thread) would reset the pool under the first one.
        if not self._running.acquire(blocking=False):
            raise StreamT1Error("this engine is already running a stream (a generate() in another thread, or a "
                                "stream() generator that is neither exhausted nor closed); finish or close() it "
                                "first, or use one engine per concurrent request")
        try:
            timer = StageTimer(use_nvtx=self.use_nvtx, synchronize=self.sync_stages)
            started = time.perf_counter()
            with torch.inference_mode(), timer.range("text_encode"):
                text_states = self.text_encoder.encode([prompt]).to(self.device)
                text = self.model.encode_text(text_states)
            cache = self._cache_for(stream_cfg, search)
            latent_shape = (self.config.model.in_channels, stream_cfg.chunk_frames, stream_cfg.latent_height,
                            stream_cfg.latent_width)
            runner = BeamSearch(model=self.model, vae=self.vae, cache=cache, text=text, prompt=prompt,
                                search=search, schedule=self.schedule, num_chunks=num_chunks, seed=seed,
                                latent_shape=latent_shape, short_reward=short, long_reward=long,
                                attention_backend=self.backend, hooks=timer,
                                context_timestep=self.config.sampler.context_timestep,
                                denoiser=self._denoiser_for(cache, text))
            emitted = 0
            if info is not None:  # filled as the stream goes, so a caller can write the record after every chunk
                info.update(records=runner.records, memory_estimate=estimate.to_dict(), memory_limit=memory_limit)
            try:
                for c in range(num_chunks):
                    try:
                        with torch.inference_mode():
                            runner.step()
                    except torch.OutOfMemoryError:
                        raise out_of_memory(c) from None
                    except RuntimeError as exc:
                        if "can't allocate memory" not in str(exc):
                            raise
                        raise out_of_memory(c) from None
                    if progress is not None:
                        progress(c + 1, num_chunks)
                    final_nodes = runner.final_chunks() if c + 1 < num_chunks else []
                    for node in final_nodes[emitted:]:
                        chunk = _to_stream_chunk(node)
                        runner.mark_emitted(node)
                        yield chunk
                    emitted = max(emitted, len(final_nodes))
                with torch.inference_mode(), timer.range("final_pick"):
                    best, beam_scores = runner.choose_final(final)
                for node in runner.beams[best].node.lineage()[emitted:]:
                    yield _to_stream_chunk(node)
                if info is not None:
                    info.update(
                        records=runner.records, chosen_beam=best, final_beam_scores=beam_scores,
                        search=search.used_dict(), stream=stream_cfg.to_dict(), seed=seed, num_chunks=num_chunks,
                        model=self.name,
                        device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                        attention_backend=self.backend, kv_pool_pages=cache.pool.num_pages,
                        kv_pool_bytes=cache.pool.nbytes(), seconds=round(time.perf_counter() - started, 4),
                        stages=timer.summary(), cuda_graphs=self.cuda_graphs,
                        graph_capture_seconds=dict(self._graphed.capture_seconds) if self._graphed else {})
            finally:
                runner.release()
        finally:
            self._running.release()

    def generate(self, prompt: str, *, num_chunks: int = 7, seed: int = 42, search: str | SearchConfig = "none",
                 **kwargs) -> GenerationResult:
        """Run the whole stream and return frames uint8 [T, H, W, 3], latents and the per-chunk records."""
        info: dict[str, Any] = {}
        options = dict(short_reward=None, long_reward=None, final_reward=None, height=None, width=None, progress=None)
        unknown = set(kwargs) - set(options)
        require(not unknown, f"unknown generate() options: {sorted(unknown)}")
        options.update(kwargs)
        chunks = list(self._stream(prompt, num_chunks=num_chunks, seed=seed, search=search, info=info, **options))
        records = info.pop("records")
        frames = torch.cat([c.frames for c in chunks])
        latents = torch.cat([c.latents for c in chunks], dim=1)
        info["chunk_seeds"] = [c.seed for c in chunks]
        return GenerationResult(prompt, frames, latents, records, self.fps, info)


def _to_stream_chunk(node) -> StreamChunk:
    latents = node.latents.float().cpu()
    # checked on the host copy the output needs anyway: no extra device synchronisation
    if not bool(torch.isfinite(latents).all()):
        raise StreamT1Error(f"chunk {node.index} has non-finite latents (NaN or infinity): the model's weights or "
                            "inputs are corrupt, or the dtype overflows")
    return StreamChunk(node.index, node.frames.cpu(), latents, node.seed)


__all__ = ["StreamT1Engine", "GenerationResult", "StreamChunk", "parse_device", "parse_dtype"]
