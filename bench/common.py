"""Shared pieces of the bench scripts: arguments, model/engine builders, timing, environment, result files.

Every script answers one question, runs at full Wan2.1-1.3B size on a GPU by default, and with ``--tiny``
(automatic without CUDA) at toy sizes on a CPU in seconds. Tiny numbers only show that a script works.
Weights are random: latency and memory do not depend on their values.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamt1_engine.config import EngineConfig, SamplerConfig, StreamConfig, WanConfig
from streamt1_engine.model.wan import CausalWanDiT, RMSNorm, WanBlock, WanHead

from report_tables import markdown_table  # noqa: F401 - also for the scripts that import it from here

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VIDEO_FPS = 16  # Wan2.1 / Self-Forcing output frame rate
WAN_TEMPORAL_FACTOR = 4  # video frames per latent frame of the real Wan VAE (after the first)
# Spec-sheet dense bf16/fp16 tensor-core peaks, TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("A100", 312.0),
               ("L40S", 362.0), ("4090", 165.2))


# -- arguments ------------------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tiny", action="store_true", help="toy sizes for a CPU smoke run (automatic without CUDA)")
    p.add_argument("--backend", default="auto", help="attention backend (auto: triton on CUDA, torch on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing")
    p.add_argument("--repeat", type=int, default=None, help="timed iterations")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="directory for CSV/JSON/markdown results (default: print only)")
    p.add_argument("--estimate", action="store_true",
                   help="print the FLOPs and the estimated H100 seconds of this run (full size unless --tiny) "
                        "and exit without running it")
    return p


def finish_args(args: argparse.Namespace, *, warmup: int = 3, repeat: int = 10) -> argparse.Namespace:
    """Resolve device, dtype and tiny mode; fill timing defaults (smaller in tiny mode)."""
    from streamt1_engine.engine import parse_device, resolve_backend

    args.device = parse_device(args.device)
    if getattr(args, "estimate", False):  # arithmetic only: the sizes of the GPU run, whatever this machine is
        args.dtype = args.dtype or "bf16"
        args.torch_dtype = DTYPES[args.dtype]
        args.backend = "triton" if args.backend == "auto" else args.backend
        args.warmup = (1 if args.tiny else warmup) if args.warmup is None else args.warmup
        args.repeat = (2 if args.tiny else repeat) if args.repeat is None else args.repeat
        return args
    if args.device.type != "cuda" and not args.tiny:
        print("no CUDA device: running with --tiny (CPU numbers only show that the script works)")
        args.tiny = True
    if args.dtype is None:
        args.dtype = "bf16" if args.device.type == "cuda" else "fp32"
    args.torch_dtype = DTYPES[args.dtype]
    args.backend = resolve_backend(args.backend, args.device)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else warmup
    if args.repeat is None:
        args.repeat = 2 if args.tiny else repeat
    return args


# -- shapes and models ----------------------------------------------------------------------------------
def model_config(tiny: bool) -> WanConfig:
    """Wan2.1-T2V-1.3B, or a toy of the same structure (16 latent channels, head dim 16)."""
    if tiny:
        return WanConfig.tiny(in_channels=16, out_channels=16, text_dim=32, text_len=16)
    return WanConfig.wan_1_3b()


def stream_config(tiny: bool) -> StreamConfig:
    """Self-Forcing / LongLive layout (3-frame chunks, 12-frame window, sink 3 -> 15 frames) at 480x832,
    or the same page layout on an 8x8 latent."""
    if tiny:
        return StreamConfig(latent_height=8, latent_width=8)
    return StreamConfig()


def random_dit(cfg: WanConfig, device, dtype, seed: int = 0) -> CausalWanDiT:
    """A random-weight DiT initialised directly on ``device`` (no 5 GB CPU detour at 1.3B)."""
    with torch.device("meta"):
        model = CausalWanDiT(cfg)
    model = model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (WanBlock, WanHead)):
                module.modulation.normal_().div_(cfg.dim ** 0.5)
            elif isinstance(module, (nn.Linear, nn.Conv3d, nn.LayerNorm)):
                module.reset_parameters()
    return model.to(dtype).eval()


class TiledSpaceToDepthVAE:
    """Weight-free stand-in decoder: each latent pixel becomes an f x f block (channels tiled to 3*f*f,
    then pixel-shuffled). Costs almost nothing, so it is NOT the real Wan VAE's cost."""

    def __init__(self, latent_channels: int, factor: int = 8, device="cpu"):
        assert (3 * factor * factor) % latent_channels == 0
        self.latent_channels, self.factor = latent_channels, factor
        self.spatial_factor, self.temporal_factor = factor, 1
        self.device = torch.device(device)

    def frames_per_chunk(self, first: bool, latent_frames: int) -> int:
        return latent_frames

    def decode_chunk(self, latents: torch.Tensor, state=None):
        n, c, t, h, w = latents.shape
        planes = latents.to(self.device, torch.float32).permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        planes = planes.repeat(1, 3 * self.factor * self.factor // c, 1, 1)
        frames = F.pixel_shuffle(planes, self.factor).reshape(n, t, 3, h * self.factor, w * self.factor)
        return ((frames + 1.0) / 2.0).clamp(0.0, 1.0), None

    def select_state(self, state, index):
        return None


def build_vae(kind: str, cfg: WanConfig, device, seed: int = 0, dtype=None):
    """``wan-random``: diffusers AutoencoderKLWan (Wan2.1 VAE architecture) with random weights, so the
    decode cost is real, in ``dtype`` (default: the engine's, bf16 on CUDA); ``light``:
    ``TiledSpaceToDepthVAE`` (decode cost ~0)."""
    if kind == "light":
        return TiledSpaceToDepthVAE(cfg.in_channels, 8, device)
    if kind == "wan-random":
        try:
            from diffusers import AutoencoderKLWan
        except ImportError as exc:
            raise SystemExit(f"--vae wan-random needs diffusers ({exc}); install it, or use --vae light "
                             "(leaves the VAE out of the numbers)") from exc

        from streamt1_engine.vae import WanVAE

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoencoderKLWan(z_dim=cfg.in_channels)
        return WanVAE(model, device=device, dtype=dtype)
    raise SystemExit(f"unknown --vae {kind!r} (use wan-random or light)")


def build_engine(args, *, vae: str = "light", cuda_graphs: bool = False, **engine_kwargs):
    """An engine over a random-weight DiT, the weight-free hashed text encoder and the chosen VAE."""
    from streamt1_engine.engine import StreamT1Engine
    from streamt1_engine.text_encoders import HashedTextEncoder

    cfg = model_config(args.tiny)
    model = random_dit(cfg, args.device, args.torch_dtype, seed=args.seed)
    text = HashedTextEncoder(cfg.text_dim, cfg.text_len, seed=args.seed)
    config = EngineConfig(cfg, stream_config(args.tiny), SamplerConfig())
    engine_kwargs.setdefault("sync_stages", True)
    return StreamT1Engine(model, text, build_vae(vae, cfg, args.device, args.seed), config, device=args.device,
                          dtype=args.torch_dtype, attention_backend=args.backend, fps=VIDEO_FPS,
                          name="random-tiny" if args.tiny else "random-wan2.1-1.3b", cuda_graphs=cuda_graphs,
                          **engine_kwargs)


def parts_note(args) -> str:
    vae = {"wan-random": "AutoencoderKLWan (Wan2.1 architecture) with random weights: the real decode cost",
           "light": "weight-free space-to-depth stand-in: decode cost ~0, NOT the real Wan VAE's"}[args.vae]
    dit = "toy random-weight DiT" if args.tiny else "random-weight Wan2.1-1.3B DiT"
    return f"{dit}; VAE: {vae}; text encoder: weight-free hashed encoder (not umT5, once per prompt)"


def chunks_for_seconds(seconds: float, chunk_frames: int = 3) -> int:
    """Chunks of a ``seconds`` long 16 fps Wan video: 5 s -> 7 chunks (21 latent frames), 30 s -> 40."""
    return max(1, round(seconds * VIDEO_FPS / (WAN_TEMPORAL_FACTOR * chunk_frames)))


# -- FLOPs ----------------------------------------------------------------------------------------------
def token_linear_params(cfg: WanConfig) -> int:
    """Weights applied to every chunk token per forward: patch embedding, per block self q/k/v/o, cross q/o
    (cross k/v act on the text once per prompt), the FFN, and the head."""
    d = cfg.dim
    patch = cfg.in_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2] * d
    block = 6 * d * d + 2 * d * cfg.ffn_dim
    head = d * cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    return patch + cfg.num_layers * block + head


def forward_flops(cfg: WanConfig, n: int, lq: int, kv_tokens: int) -> float:
    """One forward of ``n`` candidates of ``lq`` tokens: 2 * params * tokens for the linear layers, plus
    attention 4 * Lq * S * dim per layer for self (S = cached + own tokens) and cross (S = text tokens)."""
    linear = 2.0 * token_linear_params(cfg) * n * lq
    attention = 4.0 * n * lq * (kv_tokens + cfg.text_len) * cfg.dim * cfg.num_layers
    return linear + attention


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


# -- run-time estimates (--estimate) -------------------------------------------------------------------
# What bench/gpu_run.sh sizes its steps by, from FLOP counts; assumptions, not measurements:
ASSUMED_TFLOPS = 400.0  # H100 SXM: 989 TFLOP/s dense bf16 spec peak; ~40% is what 1.3B GEMMs + attention reach
ASSUMED_VAE_TFLOPS = 200.0  # the VAE's 3-D convolutions (cuDNN) reach less
PROCESS_START_S = 15.0  # interpreter, torch + CUDA init, random 1.3B weights on the device
TRITON_WARMUP_S = 15.0  # per process: Triton compile (disk-cached after the first step) and autotuning
CAPTURE_HOST_S = 1.0  # per captured graph: recording the launches (its warm-up runs are counted as FLOPs)
# Wan2.1 VAE decode per 480x832 video frame: 3.45 TFLOP (31.45 TFLOP for 3 latent -> 9 video frames),
# counted with torch.utils.flop_counter on the meta device (diffusers AutoencoderKLWan, z_dim 16)
VAE_TFLOP_PER_FRAME = 3.5


def estimate(step: str, flops: float, *, overhead_s: float, vae_flops: float = 0.0, detail: str = "") -> dict:
    """Print and return one step's estimate as a JSON line (``estimate {...}``), the line gpu_run.sh reads."""
    seconds = flops / (ASSUMED_TFLOPS * 1e12) + vae_flops / (ASSUMED_VAE_TFLOPS * 1e12) + overhead_s
    row = dict(step=step, pflop=round(flops / 1e15, 3), vae_pflop=round(vae_flops / 1e15, 3),
               overhead_s=round(overhead_s, 1), seconds=round(seconds, 1), assumed_tflops=ASSUMED_TFLOPS,
               assumed_vae_tflops=ASSUMED_VAE_TFLOPS, detail=detail)
    print("estimate " + json.dumps(row), flush=True)
    return row


def chunk_forward_flops(cfg: WanConfig, stream: StreamConfig, n: int, cached_pages: int) -> float:
    """One forward of ``n`` candidates of one chunk that attend ``cached_pages`` pages plus themselves."""
    lq = stream.chunk_frames * (stream.latent_height // cfg.patch_size[1]) * (stream.latent_width // cfg.patch_size[2])
    return forward_flops(cfg, n, lq, (cached_pages + 1) * lq)


def stream_flops(cfg: WanConfig, stream: StreamConfig, chunks: int, candidates: int, survivors: int,
                 steps: int = 4) -> float:
    """A stream of ``chunks`` chunks: every step of ``candidates`` plus the context pass of ``survivors``; chunk c
    reads at most min(c, max pages per beam) pages (an upper bound: APPEND may grow the sink every chunk)."""
    total = 0.0
    for c in range(chunks):
        pages = min(c, stream.max_pages_per_beam)
        total += steps * chunk_forward_flops(cfg, stream, candidates, pages)
        total += chunk_forward_flops(cfg, stream, survivors, pages)
    return total


def video_frames(chunks: int, chunk_frames: int = 3) -> int:
    """Video frames the Wan VAE makes of ``chunks`` chunks (1 + 4 per latent frame after the first)."""
    return 1 + WAN_TEMPORAL_FACTOR * (chunks * chunk_frames - 1)


# -- rows written as they are measured -----------------------------------------------------------------------
class LiveRows(list):
    """A report's rows; each one is also printed and appended to ``<out>/<name>.rows.jsonl`` (flushed) the
    moment it is measured, so a step killed by its timeout still leaves what it measured."""

    def __init__(self, out_dir: str | None, name: str):
        super().__init__()
        self.path = None
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(out_dir) / f"{name}.rows.jsonl"
            self.path.write_text("")

    def append(self, row: dict) -> None:
        super().append(row)
        line = json.dumps(row, default=str)
        print("row " + line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())


# -- timing ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Milliseconds per call: CUDA events on a GPU, perf_counter around a synchronised call elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def wall_seconds(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - t0, result


def median_ms(fns: dict[str, Callable[[], Any]], args) -> dict[str, float]:
    """Median milliseconds of each callable, timed one after the other in this run."""
    return {name: median(time_ms(fn, args.device, args.warmup, args.repeat)) for name, fn in fns.items()}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def parse_kernel_args(p: argparse.ArgumentParser, argv, *, warmup: int, repeat: int) -> argparse.Namespace:
    """Arguments of a kernel-level benchmark: it times implementations side by side, so the model's
    ``--backend`` does not apply."""
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.backend = "auto"
    return finish_args(args, warmup=warmup, repeat=repeat)


def interpret_triton_on_cpu(args) -> None:
    """Without CUDA, Triton kernels run in its interpreter; it must be chosen before they are imported."""
    if args.device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def emit_kernel_report(args, script: str, name: str, title: str, rows: list[dict], shapes: str,
                       timed: str = "triton / torch", ratio_note: str = "x_vs_torch: reference time / this time",
                       extra_notes: tuple[str, ...] = ()) -> None:
    """Result files of a kernel-level benchmark (fused kernel against its baseline, timed in one run)."""
    env = environment(args, script)
    env["attention_backend"] = timed
    notes = [f"{shapes}; median of {args.repeat} after {args.warmup} warm-up calls", ratio_note, *extra_notes]
    Report(name, title, env, rows, notes=notes).emit(args.out)


def stats(times: list[float]) -> dict[str, float]:
    return {"median": median(times), "mean": mean(times), "min": min(times)}


# -- memory ---------------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def current_bytes(device: torch.device) -> int:
    """Allocated device memory on a GPU; resident set size of the process on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, the best we have


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 1)


# -- environment and results ----------------------------------------------------------------------------
def environment(args, script: str) -> dict[str, Any]:
    """Where and how the numbers were taken: device, versions, date, commit and the exact command line."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = args.device
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "git_commit": _git_commit(),
        "command": shlex.join(["python", f"bench/{Path(script).name}", *_argv(args)]),
        "tiny": args.tiny, "dtype": args.dtype, "attention_backend": args.backend,
    }


def _argv(args) -> list[str]:
    return list(getattr(args, "argv", None) or sys.argv[1:])


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


@dataclass
class Report:
    """What one script prints and, with ``--out``, writes as <name>.csv, <name>.json and <name>.md."""

    name: str
    title: str
    env: dict
    rows: list[dict]
    columns: list[str] | None = None
    notes: list[str] | None = None
    extra: dict | None = None

    def markdown(self) -> str:
        label = "CPU smoke run (tiny sizes; numbers only show that the script works)" if self.env.get("tiny") \
            else f"{self.env['device']}"
        parts = [f"## {self.title}\n", f"{label}; torch {self.env['torch']}, triton {self.env['triton']}, "
                 f"dtype {self.env['dtype']}, attention {self.env['attention_backend']}, "
                 f"commit {self.env['git_commit']}, {self.env['date']}\n",
                 f"`{self.env['command']}`\n", markdown_table(self.rows, self.columns)]
        parts += [f"- {note}" for note in self.notes or []]
        return "\n".join(parts) + "\n"

    def emit(self, out_dir: str | None) -> dict[str, str]:
        print(self.markdown())
        if not out_dir:
            return {}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {kind: str(out / f"{self.name}.{kind}") for kind in ("csv", "json", "md")}
        columns = sorted({k for row in self.rows for k in row}, key=lambda k: (self.columns or []).index(k)
                         if k in (self.columns or []) else len(self.columns or []))
        with open(paths["csv"], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        with open(paths["json"], "w") as f:
            json.dump({"environment": self.env, "rows": self.rows, "notes": self.notes or [],
                       **(self.extra or {})}, f, indent=2, default=str)
        Path(paths["md"]).write_text(self.markdown())
        print(f"wrote {', '.join(paths.values())}")
        return paths


# -- one chunk at steady state ------------------------------------------------------------------------------
def beams_for(n: int) -> int:
    """N candidates are B=2 children of N/2 beams (N=1: plain streaming, one beam)."""
    return max(1, n // 2)


def survivors_for(n: int) -> int:
    """Stream-T1 with B=2 keeps K=N/2 candidates; they get the context pass."""
    return max(1, n // 2)


@dataclass
class ChunkWork:
    n: int
    survivors: int
    noise: Any  # ChunkNoise
    attn: Any  # ChunkAttention of the candidates
    context_attn: Any  # ChunkAttention of the survivors, with pages to write
    kv_tokens: int  # keys each query attends to (cached pages + own chunk)
    lq: int


class ChunkSetup:
    """A random DiT, one prompt's text K/V and a KV pool filled to the steady state of a long stream:
    every beam attends to a full sink (shared) and its own full window; the chunk sits at ``chunk_index``."""

    def __init__(self, args, max_n: int, *, sink_pages: int | None = None, window_pages: int | None = None,
                 chunk_index: int = 40):
        from streamt1_engine.cache import PagedKVCache
        from streamt1_engine.sampler import make_schedule
        from streamt1_engine.text_encoders import HashedTextEncoder

        self.args, self.device = args, args.device
        self.cfg, self.stream = model_config(args.tiny), stream_config(args.tiny)
        self.sampler = SamplerConfig()
        self.schedule = make_schedule(self.sampler)
        self.model = random_dit(self.cfg, self.device, args.torch_dtype, seed=args.seed)
        with torch.inference_mode():
            states = HashedTextEncoder(self.cfg.text_dim, self.cfg.text_len, seed=args.seed).encode(
                ["a red fox running through fresh snow"]).to(self.device)
            self.text = self.model.encode_text(states)
        self.sink_pages = self.stream.max_sink_pages if sink_pages is None else sink_pages
        self.window_pages = self.stream.window_pages if window_pages is None else window_pages
        self.chunk_index = chunk_index
        cf = self.stream.chunk_frames
        self.latent_shape = (self.cfg.in_channels, cf, self.stream.latent_height, self.stream.latent_width)
        num_pages = self.sink_pages + beams_for(max_n) * self.window_pages + survivors_for(max_n)
        merge = "triton" if args.backend == "triton" else "torch"
        self.cache = PagedKVCache(self.cfg, self.stream, num_pages, self.device, args.torch_dtype, merge)
        gen = torch.Generator(device=self.device).manual_seed(args.seed)
        for pool in (self.cache.pool.k, self.cache.pool.v):
            pool.normal_(generator=gen)
        self.sink = [self._page(j * cf) for j in range(self.sink_pages)]
        self.windows = [[self._page((chunk_index - self.window_pages + j) * cf) for j in range(self.window_pages)]
                        for _ in range(beams_for(max_n))]
        self.write_pages = [self._page(chunk_index * cf) for _ in range(survivors_for(max_n))]

    def _page(self, frame: int) -> int:
        page = self.cache.alloc()
        self.cache.frame_pos[page] = frame
        self.cache.pool.page_frame_pos[page] = frame
        return page

    def work(self, n: int) -> ChunkWork:
        from streamt1_engine.cache import BeamPages
        from streamt1_engine.model.wan import ChunkAttention
        from streamt1_engine.search.noise import draw_chunk_noise

        nb, k = beams_for(n), survivors_for(n)
        beams = [BeamPages(list(self.sink), list(window)) for window in self.windows[:nb]]
        start = self.chunk_index * self.stream.chunk_frames

        def attention(parents, write=None):
            table, counts = self.cache.page_table([beams[p] for p in parents])
            frame_start = torch.full((len(parents),), start, dtype=torch.long, device=self.device)
            return ChunkAttention(self.cache.pool, table, counts, frame_start, write, backend=self.args.backend)

        write = torch.tensor(self.write_pages[:k], dtype=torch.long, device=self.device)
        noise = draw_chunk_noise(list(range(self.args.seed, self.args.seed + n)), self.chunk_index,
                                 self.latent_shape, self.schedule.num_steps, self.device)
        lq = self.cache.page_tokens
        kv_tokens = (self.sink_pages + self.window_pages) * self.cache.page_tokens + lq
        return ChunkWork(n, k, noise, attention([i * nb // n for i in range(n)]),
                         attention([j * nb // k for j in range(k)], write), kv_tokens, lq)

    def chunk_flops(self, work: ChunkWork) -> float:
        """All denoising steps of N candidates plus the context pass of the survivors."""
        steps = self.schedule.num_steps
        return (steps * forward_flops(self.cfg, work.n, work.lq, work.kv_tokens)
                + forward_flops(self.cfg, work.survivors, work.lq, work.kv_tokens))
