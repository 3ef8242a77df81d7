#!/usr/bin/env python
"""Per-chunk latency: all denoising steps of N candidates plus the survivors' context pass, eager vs CUDA graphs.

Wan2.1-1.3B shapes with random weights: a 60x104 latent (1560 tokens per frame), 3-frame chunks (4680
tokens), and a KV cache at the steady state of a long stream (full 15-frame sink + 9-frame window, so every
query sees 27 frames of keys). N candidates are B=2 children of N/2 beams and N/2 survive (N=1 is plain
streaming). MFU counts 2 * params * tokens for the token-wise linear layers plus 4 * Lq * S * dim per layer
for self- and cross-attention, against the spec-sheet dense bf16 peak of the GPU (or --peak-tflops).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8], help="candidates per chunk")
    p.add_argument("--modes", nargs="+", choices=["eager", "graphs"], default=["eager", "graphs"])
    p.add_argument("--chunk-index", type=int, default=40, help="position of the chunk in the stream")
    p.add_argument("--compile-blocks", action="store_true", help="experimental: torch.compile every DiT block")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: from the GPU name)")
    args = common.finish_args(p.parse_args(argv), warmup=3, repeat=10)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def estimate(args) -> dict:
    """Every timed and untimed call of the run, at the steady-state cache ChunkSetup builds."""
    cfg, stream = common.model_config(args.tiny), common.stream_config(args.tiny)
    steps, pages = len(common.SamplerConfig().denoising_steps), stream.max_pages_per_beam
    flops, graphs = 0.0, 0
    for n in args.n:
        chunk = (steps * common.chunk_forward_flops(cfg, stream, n, pages)
                 + common.chunk_forward_flops(cfg, stream, common.survivors_for(n), pages))
        for mode in args.modes:
            first = 1 + (2 if mode == "graphs" else 0)  # graphs: two warm-up runs before the capture
            flops += (first + args.warmup + args.repeat) * chunk
            graphs += 2 if mode == "graphs" else 0
    overhead = common.PROCESS_START_S + common.TRITON_WARMUP_S + graphs * common.CAPTURE_HOST_S
    return common.estimate("chunk", flops, overhead_s=overhead,
                           detail=f"N={args.n} {args.modes}, {args.warmup} warm-up + {args.repeat} timed")


def main(argv=None):
    args = parse_args(argv)
    if args.estimate:
        return estimate(args)
    from streamt1_engine.search.beam_search import EagerDenoiser

    modes = list(args.modes)
    notes = []
    if "graphs" in modes and args.device.type != "cuda":
        modes.remove("graphs")
        notes.append("CUDA graphs need a CUDA device: graphs rows skipped")
    setup = common.ChunkSetup(args, max(args.n), chunk_index=args.chunk_index)
    if args.compile_blocks:
        from streamt1_engine.cuda_graphs import compile_blocks

        compile_blocks(setup.model)
        notes.append("DiT blocks compiled with torch.compile (first_call_ms includes compilation)")
    peak = common.peak_tflops(args.device, args.torch_dtype, args.peak_tflops)
    denoisers = {"eager": EagerDenoiser(setup.model, setup.schedule, setup.text, setup.sampler.context_timestep)}
    if "graphs" in modes:
        from streamt1_engine.cuda_graphs import GraphedDenoiser

        denoisers["graphs"] = GraphedDenoiser(setup.model, setup.schedule, setup.text, setup.cache.pool,
                                              setup.sampler.context_timestep)
    rows = common.LiveRows(args.out, "bench_chunk")
    with torch.inference_mode():
        for n in args.n:
            work = setup.work(n)
            flops = setup.chunk_flops(work)
            reference_x0 = None
            eager_ms = None
            for mode in modes:
                den = denoisers[mode]
                captured_s = sum(getattr(den, "capture_seconds", {}).values())
                first_s, x0 = common.wall_seconds(lambda: den.denoise(work.noise, work.attn), args.device)
                survivors = x0[: work.survivors].contiguous()
                first_ctx_s, _ = common.wall_seconds(lambda: den.context(survivors, work.context_attn), args.device)
                denoise = common.stats(common.time_ms(lambda: den.denoise(work.noise, work.attn), args.device,
                                                      args.warmup, args.repeat))
                context = common.stats(common.time_ms(lambda: den.context(survivors, work.context_attn),
                                                      args.device, args.warmup, args.repeat))
                capture_ms = (sum(getattr(den, "capture_seconds", {}).values()) - captured_s) * 1e3
                chunk_ms = denoise["median"] + context["median"]
                if reference_x0 is None:
                    reference_x0 = x0.float()
                diff = float((x0.float() - reference_x0).abs().max())
                if mode == "eager":
                    eager_ms = chunk_ms
                tflops = flops / (chunk_ms * 1e-3) / 1e12
                rows.append(dict(
                    n=n, mode=mode, survivors=work.survivors, lq=work.lq, kv_tokens=work.kv_tokens,
                    denoise_ms=denoise["median"], context_ms=context["median"], chunk_ms=chunk_ms,
                    chunk_min_ms=denoise["min"] + context["min"], first_call_ms=(first_s + first_ctx_s) * 1e3,
                    capture_ms=capture_ms if mode == "graphs" else None,
                    tflop_per_chunk=flops / 1e12, tflops=tflops, mfu=tflops / peak if peak else None,
                    speedup_vs_eager=(eager_ms / chunk_ms) if eager_ms else None,
                    max_abs_diff_vs_first_mode=diff))
    if "graphs" in denoisers:
        g = denoisers["graphs"]
        notes.append(f"graphs captured: {g.captures}, replays: {g.replays}")
    notes.append(f"FLOPs per forward = 2 * {common.token_linear_params(setup.cfg):,} token-wise linear "
                 f"params * N * Lq + 4 * N * Lq * (S_kv + {setup.cfg.text_len} text) * {setup.cfg.dim} * "
                 f"{setup.cfg.num_layers} layers; a chunk is {setup.schedule.num_steps} steps of N plus one "
                 f"context pass of the survivors")
    notes.append(f"MFU peak: {peak} TFLOP/s" if peak else "MFU: no peak known for this device/dtype "
                                                          "(pass --peak-tflops)")
    notes.append(f"cache: {setup.sink_pages} sink + {setup.window_pages} window pages of {setup.cache.page_tokens} "
                 f"tokens per candidate; timings: median of {args.repeat} after {args.warmup} warm-up; "
                 f"first_call_ms includes graph capture for the graphs rows; capture_ms: that capture alone (warm-up "
                 f"runs + recording); chunk_ms is steady-state replays only")
    columns = ["n", "mode", "survivors", "lq", "kv_tokens", "denoise_ms", "context_ms", "chunk_ms", "chunk_min_ms",
               "first_call_ms", "capture_ms", "tflop_per_chunk", "tflops", "mfu", "speedup_vs_eager",
               "max_abs_diff_vs_first_mode"]
    report = common.Report("bench_chunk", "Per-chunk latency (denoise all steps + context pass)",
                           common.environment(args, __file__), rows, columns, notes)
    report.emit(args.out)
    return rows


if __name__ == "__main__":
    main()
