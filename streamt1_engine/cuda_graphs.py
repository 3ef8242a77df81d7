"""Replay the per-chunk work from CUDA graphs, and the eager-path helpers that go with it.

A chunk's work has a fixed shape once the number of candidates N, the latent shape, the page-table width
and the attention backend are fixed, and everything that changes between chunks (noise, page tables,
frame positions, write pages) lives in device tensors. ``GraphedDenoiser`` therefore captures, per shape,
one graph of the whole denoising loop (all steps for all candidates) and one of the clean context pass,
and replays them after copying the new inputs into static buffers. This removes the host cost of the
thousands of kernel launches a chunk makes, which matters most where kernels are short (few candidates,
small latents); ``bench/bench_chunk.py`` measures it against eager in the same run.

What capture relies on (checked in the model and kernels):
  * the forward never reads device values on the host for the ``torch`` and ``triton`` attention
    backends; ``sdpa``, ``flash_attn`` and ``xformers`` do (mask choice, varlen lengths), so those run
    eagerly with a warning;
  * RoPE tables (``model.rope``, its spatial tables) are created lazily and Triton autotunes on first
    use: both happen in the eager warm-up before capture;
  * the KV pool, the rope tables and the model weights keep their addresses while graphs exist
    (``StreamT1Engine`` reuses its pool across runs; a new pool means a new ``GraphedDenoiser``).
"""
from __future__ import annotations

import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from . import profiling
from .errors import StreamT1Error, require
from .cache import KVPool
from .model.wan import ChunkAttention, TextContext
from .sampler import ChunkNoise, EagerDenoiser, Schedule, context_pass, denoise_chunk

CAPTURABLE_BACKENDS = ("torch", "triton")
GRAPHS_NEED_CUDA = "CUDA graphs need a CUDA device; running eagerly"


class CudaGraphCapture:
    """Warm up on a side stream, then capture into a graph memory pool shared by all graphs of one owner."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mempool = torch.cuda.graph_pool_handle()

    def capture(self, work: Callable[[], torch.Tensor | None], warmup_iters: int):
        """Returns (replay, output): ``replay()`` reruns the captured work, which rewrites ``output``."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy tables, Triton compilation and autotuning happen here
            for _ in range(warmup_iters):
                work()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            output = work()
        return graph.replay, output


@dataclass
class _CapturedWork:
    replay: Callable[[], None]
    inputs: dict[str, torch.Tensor]  # static buffers the graph reads
    output: torch.Tensor | None  # static buffer the graph writes (denoise: x0)


class GraphedDenoiser:
    """Same interface as ``EagerDenoiser``; one graph per (kind, N, latent shape, table width, backend, page
    bound: ``graph_page_bound``). The pages a beam reads grow over the first chunks of a stream; the Triton
    kernel bounds its page loop by each row's count on the device, so its graphs are captured once at the
    table's width and serve every page count; the torch path attends exact per-row counts (a host value) and
    keeps one graph per count.

    Graphs stay valid across chunks and prompts: ``set_text`` copies a new prompt's cross-attention K/V
    into the static copy every graph reads. ``captures`` and ``replays`` count what happened;
    ``capture_seconds`` records, per captured (or failed) shape, the seconds of its one-time warm-up and
    capture (Triton compilation and autotuning happen in that warm-up), to be reported apart from the
    steady-state replays. Any capture failure (a CUDA error, Triton's OutOfResources or PTXASError, an
    autotuner error) makes that shape run eagerly; the first failure warns once.
    """

    def __init__(self, model, schedule: Schedule, text: TextContext, pool: KVPool, context_timestep: float = 0.0,
                 *, warmup_iters: int = 2, capture: CudaGraphCapture | None = None):
        if capture is None:  # ``capture`` is replaceable so the buffer plumbing can be tested without a GPU
            require(torch.cuda.is_available() and pool.k.is_cuda, GRAPHS_NEED_CUDA.split(";")[0])
            capture = CudaGraphCapture(pool.k.device)
        require(warmup_iters >= 1, "CUDA graph capture needs at least one warm-up iteration")
        self.model, self.schedule = model, schedule
        self._pool = weakref.ref(pool)  # a new pool must be freeable before it is allocated (engine._ensure_pool)
        self.context_timestep = context_timestep
        self.warmup_iters = warmup_iters
        self.device = pool.k.device
        self._capturer = capture
        self.captures = 0
        self.replays = 0
        self.capture_seconds: dict[str, float] = {}
        self._graphs: dict[tuple, _CapturedWork | None] = {}  # None: capture failed, run eagerly
        self._warned: set[str] = set()
        self._rope = None
        self._text: TextContext | None = None
        self._text_source: TextContext | None = None  # the context last given to set_text
        self.set_text(text)

    @property
    def pool(self) -> KVPool | None:
        """The pool the graphs were captured against (None once it is freed: then nothing matches it)."""
        return self._pool()

    # -- static state -----------------------------------------------------------------------------
    def set_text(self, text: TextContext) -> None:
        """Make the graphs read ``text``: an in-place copy when the shapes match, else drop all graphs."""
        self._text_source = text
        with torch.inference_mode():
            if self._text is not None and _same_shapes(self._text, text):
                for (k_static, v_static), (k, v) in zip(self._text.kv, text.kv):
                    k_static.copy_(k)
                    v_static.copy_(v)
                return
            self.reset()
            self._text = TextContext([(k.clone(), v.clone()) for k, v in text.kv])

    def reset(self) -> None:
        """Forget every graph (the next call of each shape captures again)."""
        self._graphs.clear()

    @property
    def num_graphs(self) -> int:
        return sum(g is not None for g in self._graphs.values())

    # -- the denoiser interface -------------------------------------------------------------------
    def denoise(self, noise: ChunkNoise, attn: ChunkAttention, text: TextContext | None = None) -> torch.Tensor:
        """``text``: this call's prompt context (e.g. one row per candidate of several streams); None or the
        context given to ``set_text``: the static default copy."""
        with torch.inference_mode():  # the static buffers are inference tensors
            text = self._call_text(text)
            if not self._capturable(attn):
                return denoise_chunk(self.model, self.schedule, noise, text or self._text, attn)
            max_pages = graph_page_bound(attn)
            key = ("denoise", noise.initial.shape[0], tuple(noise.initial.shape[1:]), attn.page_table.shape[1],
                   attn.backend, noise.initial.dtype, max_pages, _rows_key(attn), _text_key(text))
            sources = {"initial": noise.initial, "renoise": noise.renoise, **_attention_inputs(attn),
                       **_text_inputs(text)}
            # the work must not hold ``attn`` (nor the pool)
            backend, rows, own_text = attn.backend, _rows_key(attn), text is not None

            def work(buf):
                return denoise_chunk(self.model, self.schedule, ChunkNoise(buf["initial"], buf["renoise"]),
                                     self._buffer_text(buf, own_text),
                                     self._static_attention(buf, backend, max_pages, rows))

            return self._run(key, sources, work).clone()

    def context(self, x0: torch.Tensor, attn: ChunkAttention, text: TextContext | None = None) -> None:
        require(attn.write_pages is not None, "the context pass needs pages to write")
        with torch.inference_mode():
            text = self._call_text(text)
            if not self._capturable(attn):
                context_pass(self.model, x0, text or self._text, attn, self.context_timestep)
                return
            max_pages = graph_page_bound(attn)
            key = ("context", x0.shape[0], tuple(x0.shape[1:]), attn.page_table.shape[1], attn.backend, x0.dtype,
                   max_pages, _rows_key(attn), _text_key(text))
            sources = {"x0": x0, **_attention_inputs(attn), **_text_inputs(text)}
            backend, rows, own_text = attn.backend, _rows_key(attn), text is not None

            def work(buf):
                context_pass(self.model, buf["x0"], self._buffer_text(buf, own_text),
                             self._static_attention(buf, backend, max_pages, rows), self.context_timestep)

            self._run(key, sources, work)

    def _call_text(self, text: TextContext | None) -> TextContext | None:
        """None: the graphs read the static copy (a prompt of the static copy's shapes is copied into it, so
        one stream's graphs serve every prompt); else a per-call context (e.g. one row per candidate of several
        streams), which is a static input of its own graphs."""
        if text is None or text is self._text_source:
            return None
        if _same_shapes(self._text, text):
            self.set_text(text)
            return None
        return text

    def _buffer_text(self, buf: dict[str, torch.Tensor], own: bool) -> TextContext:
        if not own:
            return self._text
        return TextContext([(buf[f"text_k{i}"], buf[f"text_v{i}"]) for i in range(len(self._text.kv))])

    # -- capture and replay -----------------------------------------------------------------------
    def _capturable(self, attn: ChunkAttention) -> bool:
        require(attn.pool is self.pool, "GraphedDenoiser was built for another KV pool")
        if attn.backend not in CAPTURABLE_BACKENDS:
            self._warn_once(attn.backend, f"attention backend {attn.backend!r} reads device values on the host "
                                          f"and cannot be captured in a CUDA graph; running eagerly")
            return False
        if attn.dense_mask is not None or attn.frame_positions is not None:
            self._warn_once("dense", "dense or explicit-position attention is not graphed; running eagerly")
            return False
        return True

    def _static_attention(self, buf: dict[str, torch.Tensor], backend: str, max_pages: int | None,
                          rows: tuple[int, ...] | None) -> ChunkAttention:
        # ``max_pages`` (``graph_page_bound``) and the torch path's per-row counts are part of the graph's key:
        # a graph reads at most the table columns it was captured with.
        return ChunkAttention(self.pool, buf["page_table"], buf["num_pages"], buf["frame_start"],
                              buf.get("write_pages"), backend=backend, max_pages=max_pages, row_pages=rows)

    def _run(self, key: tuple, sources: dict[str, torch.Tensor],
             work: Callable[[dict[str, torch.Tensor]], torch.Tensor | None]) -> torch.Tensor | None:
        self._check_rope()
        captured = self._graphs.get(key, False)
        if captured is None:  # capture failed before: same work, eagerly
            return work(sources)
        if captured is False:
            captured = self._capture(key, sources, work)
            if captured is None:
                return work(sources)
        else:
            for name, src in sources.items():
                captured.inputs[name].copy_(src)
        captured.replay()
        self.replays += 1
        return captured.output

    def _capture(self, key, sources, work) -> _CapturedWork | None:
        inputs = {name: src.clone() for name, src in sources.items()}  # allocated outside the graph pool
        started = time.perf_counter()
        try:
            replay, output = self._capturer.capture(lambda: work(inputs), self.warmup_iters)
        except Exception as exc:  # noqa: BLE001 - any failure: keep the results, lose the speed-up
            self._graphs[key] = None
            self.capture_seconds[_shape_name(key) + " (failed)"] = round(time.perf_counter() - started, 4)
            first_line = (str(exc).splitlines() or [""])[0][:200]
            self._warn_once("capture", f"CUDA graph capture of {key[0]} (N={key[1]}) failed "
                                       f"({type(exc).__name__}: {first_line}); running eagerly (later capture "
                                       f"failures of this denoiser are not reported again)")
            return None
        self.capture_seconds[_shape_name(key)] = round(time.perf_counter() - started, 4)
        captured = _CapturedWork(replay, inputs, output)
        self._graphs[key] = captured
        self.captures += 1
        return captured

    def _check_rope(self) -> None:
        """The graphs read the model's RoPE tables; new tables (the model moved) invalidate them."""
        rope = self.model.rope
        if self._rope is not None and rope is not self._rope:
            self.reset()
        self._rope = rope

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def graph_page_bound(attn: ChunkAttention) -> int | None:
    """The page bound a graph of ``attn``'s work is captured with (part of its key).

    Triton: None, the whole table width. The kernel loops over ``min(num_pages[row], bound)`` pages, reading
    the counts on the device at every replay, so at any bound >= the longest row it does exactly the eager
    call's work, bit for bit; the table's -1 padding past a row's count is never read. One graph then serves
    a stream from its first chunk on. Torch: the host bound itself (its slicing and per-row groups are host
    decisions baked into the graph; padding would change the masked softmax's rounding)."""
    return None if attn.backend == "triton" else attn.max_pages


def _shape_name(key: tuple) -> str:
    kind, n, latent, width, backend, _, pages, rows = key[:8]
    pages = f"<={width}" if pages is None else pages  # None: the device counts, up to the table width
    name = f"{kind} N={n} latent={'x'.join(map(str, latent))} table={width} pages={pages} {backend}"
    if rows is not None and any(r != pages for r in rows):  # ragged rows (the torch path's exact-rows graphs)
        name += " rows=" + ",".join(map(str, rows))
    if key[8] is not None:
        name += " text=" + "x".join(map(str, key[8]))
    return name


def _attention_inputs(attn: ChunkAttention) -> dict[str, torch.Tensor]:
    inputs = {"page_table": attn.page_table, "num_pages": attn.num_pages, "frame_start": attn.frame_start}
    if attn.write_pages is not None:
        inputs["write_pages"] = attn.write_pages
    return inputs


def _rows_key(attn: ChunkAttention) -> tuple[int, ...] | None:
    """Per-row page counts matter to the torch path only (exact rows); the Triton kernel reads the counts."""
    return attn.row_pages if attn.backend == "torch" else None


def _text_key(text: TextContext | None) -> tuple | None:
    return None if text is None else tuple(text.kv[0][0].shape)


def _text_inputs(text: TextContext | None) -> dict[str, torch.Tensor]:
    if text is None:
        return {}
    return {f"{side}{i}": t for i, (k, v) in enumerate(text.kv) for side, t in (("text_k", k), ("text_v", v))}


def _same_shapes(a: TextContext, b: TextContext) -> bool:
    return len(a.kv) == len(b.kv) and all(
        ka.shape == kb.shape and va.shape == vb.shape and ka.dtype == kb.dtype and ka.device == kb.device
        for (ka, va), (kb, vb) in zip(a.kv, b.kv))


# -- eager-path helpers -------------------------------------------------------------------------------
def nvtx_available() -> bool:
    return profiling._nvtx is not None


@contextmanager
def model_call_ranges(model: torch.nn.Module, prefix: str):
    """An NVTX range around every forward of ``model`` inside the block ("<prefix> 0", "<prefix> 1", ...).

    Without NVTX (no ``nvtx`` package and no CUDA) this is a no-op; the hooks cost a few microseconds per call.
    """
    nvtx = profiling._nvtx
    if nvtx is None:
        yield
        return
    calls = [0]

    def push(module, args):
        nvtx.push_range(f"{prefix} {calls[0]}", domain="streamt1")
        calls[0] += 1

    def pop(module, args, output):
        nvtx.pop_range(domain="streamt1")

    handles = [model.register_forward_pre_hook(push), model.register_forward_hook(pop)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class NvtxEagerDenoiser(EagerDenoiser):
    """The eager loop with one NVTX range per denoising step (profiler timelines only)."""

    def denoise(self, noise: ChunkNoise, attn: ChunkAttention, text=None) -> torch.Tensor:
        with model_call_ranges(self.model, "denoise_step"):
            return super().denoise(noise, attn, text)


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Experimental: ``torch.compile`` every WanBlock (fuses the norm/modulation/gating elementwise work).

    The custom Triton kernels inside may cause graph breaks; results match eager within float rounding,
    not bit for bit. Returns the number of blocks compiled (0 where ``torch.compile`` is unavailable).
    """
    if not hasattr(torch, "compile"):
        return 0
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise StreamT1Error("compile_blocks needs a model with a .blocks list of WanBlocks")
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
    return len(blocks)


__all__ = ["CAPTURABLE_BACKENDS", "GRAPHS_NEED_CUDA", "CudaGraphCapture", "GraphedDenoiser", "NvtxEagerDenoiser",
           "compile_blocks", "graph_page_bound", "model_call_ranges", "nvtx_available"]
