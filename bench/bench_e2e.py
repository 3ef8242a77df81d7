#!/usr/bin/env python
"""End-to-end Stream-T1 runs: wall time, generated-video FPS, peak memory and the time split by stage.

A 5 s video (21 latent frames = 7 chunks) and a 30 s video (40 chunks) with Stream-T1 (B=2, K=2, the
built-in weight-free rewards), and plain streaming (N=1) for comparison, eager and with CUDA graphs.
The DiT is Wan2.1-1.3B with random weights; the text encoder is the weight-free hashed encoder (its cost is
once per prompt). The VAE is ``--vae wan-random`` (default on GPU): diffusers' AutoencoderKLWan with the
Wan2.1 architecture and random weights, so decoding costs what the real VAE costs; ``--vae light`` is a
weight-free space-to-depth decoder that costs ~nothing (default with --tiny).
FPS = video frames generated / wall seconds of the timed run (after one short warm-up run that also
captures the graphs). Stage times synchronise the device at every stage boundary.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

PROMPT = "a red fox running through fresh snow, cinematic lighting"
STAGES = ("text_encode", "denoise", "vae_decode", "rewards", "context_pass", "routing", "final_pick")


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, nargs="+", default=None, help="video lengths (default: 5 30; tiny: 5)")
    p.add_argument("--searches", nargs="+", choices=["stream_t1", "none"], default=["stream_t1", "none"])
    p.add_argument("--modes", nargs="+", choices=["eager", "graphs"], default=["eager", "graphs"])
    p.add_argument("--vae", choices=["wan-random", "light"], default=None)
    args = common.finish_args(p.parse_args(argv), warmup=1, repeat=1)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.seconds is None:
        args.seconds = [5.0] if args.tiny else [5.0, 30.0]
    if args.vae is None:
        args.vae = "light" if args.tiny else "wan-random"
    return args


def search_config(name: str):
    from streamt1_engine.search.config import SearchConfig

    return SearchConfig(strategy="stream_t1", beam_size=2, top_k=2) if name == "stream_t1" else SearchConfig("none")


def estimate(args) -> dict:
    """The warm-up and timed generations of every (mode, search, length); the VAE decodes what the rewards
    score (each candidate's chunk) and the streamed video."""
    cfg, stream = common.model_config(args.tiny), common.stream_config(args.tiny)
    flops = vae_frames = 0.0
    runs = 0
    for mode in args.modes:
        for name in args.searches:
            n, k = (4, 2) if name == "stream_t1" else (1, 1)
            lengths = [2] * args.warmup + [common.chunks_for_seconds(s, stream.chunk_frames) for s in args.seconds]
            for chunks in lengths:
                flops += common.stream_flops(cfg, stream, chunks, n, k)
                vae_frames += (n if n > 1 else 0) * 12 * chunks + common.video_frames(chunks)
                runs += 1
    vae_flops = vae_frames * common.VAE_TFLOP_PER_FRAME * 1e12 if args.vae == "wan-random" else 0.0
    # one process; each further mode builds another engine (weights, pool, graphs) on the warm kernels
    overhead = common.PROCESS_START_S + common.TRITON_WARMUP_S + 5.0 * (len(args.modes) - 1)
    return common.estimate("e2e", flops, vae_flops=vae_flops, overhead_s=overhead,
                           detail=f"{runs} generations ({args.warmup} warm-up of 2 chunks each), VAE {args.vae}")


def main(argv=None):
    args = parse_args(argv)
    if args.estimate:
        return estimate(args)
    modes = [m for m in args.modes if m == "eager" or args.device.type == "cuda"]
    notes = [] if modes == args.modes else ["CUDA graphs need a CUDA device: graphs rows skipped"]
    rows = common.LiveRows(args.out, "bench_e2e")
    for mode in modes:
        engine = common.build_engine(args, vae=args.vae, cuda_graphs=mode == "graphs")
        for search_name in args.searches:
            search = search_config(search_name)
            # warm-up: Triton autotuning, RoPE tables and (graphs) capture of every shape this search uses (the
            # Triton path's graphs serve every page count, so two chunks capture them all)
            warm = None
            for _ in range(args.warmup):
                warm = engine.generate(PROMPT, num_chunks=2, seed=args.seed, search=search)
            captured = dict(warm.info.get("graph_capture_seconds", {})) if warm is not None else {}
            for seconds in args.seconds:
                chunks = common.chunks_for_seconds(seconds, engine.config.stream.chunk_frames)
                common.reset_peak(args.device)
                wall, result = common.wall_seconds(
                    lambda: engine.generate(PROMPT, num_chunks=chunks, seed=args.seed, search=search), args.device)
                frames = int(result.frames.shape[0])
                stage_s = {k: v["seconds"] for k, v in result.info["stages"].items()}
                new = {k: v for k, v in result.info.get("graph_capture_seconds", {}).items() if k not in captured}
                captured.update(new)
                capture_s = sum(new.values())
                row = dict(mode=mode, search=search_name, seconds=seconds, chunks=chunks,
                           candidates=search.first_chunk_candidates, video_frames=frames, wall_s=wall,
                           fps=frames / wall, realtime_x=frames / wall / common.VIDEO_FPS,
                           s_per_chunk=wall / chunks, peak_mib=common.mib(common.peak_bytes(args.device)),
                           rss_mib=common.mib(common.rss_bytes()),
                           kv_pool_mib=common.mib(result.info["kv_pool_bytes"]),
                           captures_in_run=len(new), capture_s_in_run=capture_s,
                           steady_fps=frames / max(wall - capture_s, 1e-9))
                row.update({f"{k}_s": stage_s.get(k) for k in STAGES})
                rows.append(row)
        engine = None  # free its pool before the next mode builds its own
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        eager = next((r for r in rows if r["mode"] == "eager" and r["search"] == row["search"]
                      and r["seconds"] == row["seconds"]), None)
        row["speedup_vs_eager"] = eager["wall_s"] / row["wall_s"] if eager else None
    notes.append(common.parts_note(args))
    notes.append("stream_t1: B=2 children per beam, K=2 survivors (4 candidates per chunk), built-in rewards; "
                 "none: plain streaming, one candidate")
    notes.append("peak_mib: torch.cuda.max_memory_allocated over the timed run (GPU only); rss_mib: process RSS")
    notes.append("captures_in_run / capture_s_in_run: CUDA graphs captured inside the timed run (after the warm-up) "
                 "and their seconds; steady_fps leaves those seconds out")
    columns = ["mode", "search", "seconds", "chunks", "candidates", "video_frames", "wall_s", "fps", "realtime_x",
               "s_per_chunk", "speedup_vs_eager", "steady_fps", "captures_in_run", "capture_s_in_run",
               "peak_mib", "rss_mib", "kv_pool_mib",
               *[f"{k}_s" for k in STAGES]]
    report = common.Report("bench_e2e", "End-to-end Stream-T1 generation", common.environment(args, __file__),
                           rows, columns, notes)
    report.emit(args.out)
    return rows


if __name__ == "__main__":
    main()
