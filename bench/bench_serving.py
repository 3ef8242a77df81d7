#!/usr/bin/env python
"""Serving: aggregate throughput and per-stream chunk latency of concurrent streams, batched vs one at a time.

For 1, 2, 4 and 8 concurrent streams (each its own prompt and seed), with Stream-T1 (B=2, K=2, the built-in
weight-free rewards) and with plain streaming (none), the same requests run twice in one process: all submitted
at once to one engine (their candidates denoise in one forward per chunk step) and one after another. Reported:
aggregate generated video frames per second, the ratio batched / sequential, and per-stream chunk latency
(p50 / p99 of the time between a stream's consecutive chunks, the first counted from its submit). The outputs
of both runs are compared bit for bit (``identical``; expected in float32 on CPU).
Sizes: ``--size mid`` (CPU default: dim 256, 4 layers, 16x16 latent), ``--size 1.3b`` (GPU default: Wan2.1-1.3B
at 480x832), ``--tiny`` (smoke test). Weights are random: speed does not depend on their values. The VAE is the
weight-free space-to-depth stand-in unless ``--vae wan-random``.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

PROMPTS = ("a red fox running through fresh snow", "a paper boat drifting down a rain gutter",
           "city lights seen from a moving train", "a hummingbird hovering over a flower",
           "waves breaking on black volcanic sand", "a chef tossing noodles in a wok",
           "a time-lapse of clouds over mountains", "a cat watching goldfish in a bowl")


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "mid", "1.3b"], default=None,
                   help="model and latent size (default: 1.3b on CUDA, mid on CPU; --tiny means tiny)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent streams")
    p.add_argument("--searches", nargs="+", choices=["stream_t1", "none"], default=["stream_t1", "none"])
    p.add_argument("--chunks", type=int, default=None, help="chunks per stream (default: 7; 3 on CPU)")
    p.add_argument("--vae", choices=["wan-random", "light"], default="light")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the chunk work from CUDA graphs")
    p.add_argument("--memory-limit", default="auto",
                   help="GiB the streams may take on top of the weights; auto (default): what the device has free; "
                        "a stream count whose estimate exceeds it is skipped with a row that says so")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.size is None:
        args.size = "tiny" if args.tiny else None
    wants_cpu = args.size in ("tiny", "mid")
    args = common.finish_args(args, warmup=1, repeat=1) if not wants_cpu else _cpu_args(args)
    args.argv = argv
    on_gpu = args.device.type == "cuda" or args.estimate  # an estimate is of the GPU run
    if args.size is None:
        args.size = "1.3b" if on_gpu else "mid"
    args.tiny = args.size == "tiny"
    if args.chunks is None:
        args.chunks = 7 if on_gpu and not args.tiny else (2 if args.tiny else 3)
    if args.memory_limit != "auto":
        try:
            args.memory_limit = int(float(args.memory_limit) * 2**30)
        except ValueError:
            p.error(f"--memory-limit must be auto or a number of GiB, got {args.memory_limit!r}")
        if args.memory_limit <= 0:
            p.error("--memory-limit must be positive")
    return args


def _cpu_args(args):
    """finish_args without forcing --tiny: the mid size is a real CPU measurement."""
    if args.estimate:
        return common.finish_args(args, warmup=1, repeat=1)
    tiny = args.tiny
    args.tiny = True
    args = common.finish_args(args, warmup=1, repeat=1)
    args.tiny = tiny
    return args


def sizes(size: str):
    from streamt1_engine.config import StreamConfig, WanConfig

    if size == "1.3b":
        return WanConfig.wan_1_3b(), StreamConfig()
    if size == "mid":
        return (WanConfig.tiny(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, in_channels=16, out_channels=16),
                StreamConfig(latent_height=16, latent_width=16))
    return (WanConfig.tiny(in_channels=16, out_channels=16), StreamConfig(latent_height=8, latent_width=8))


def build_engine(args, max_streams: int):
    from streamt1_engine.config import EngineConfig, SamplerConfig
    from streamt1_engine.engine import StreamT1Engine
    from streamt1_engine.text_encoders import HashedTextEncoder

    cfg, stream = sizes(args.size)
    model = common.random_dit(cfg, args.device, args.torch_dtype, seed=args.seed)
    text = HashedTextEncoder(cfg.text_dim, cfg.text_len, seed=args.seed)
    return StreamT1Engine(model, text, common.build_vae(args.vae, cfg, args.device, args.seed),
                          EngineConfig(cfg, stream, SamplerConfig()), device=args.device, dtype=args.torch_dtype,
                          attention_backend=args.backend, fps=common.VIDEO_FPS, name=f"random-{args.size}",
                          cuda_graphs=args.cuda_graphs, use_nvtx=False, max_streams=max_streams,
                          max_queue=max(64, max_streams), memory_limit=args.memory_limit)


def search_config(name: str):
    from streamt1_engine.search.config import SearchConfig

    return SearchConfig(strategy="stream_t1", beam_size=2, top_k=2) if name == "stream_t1" else SearchConfig("none")


def run(engine, requests: list[dict], together: bool):
    """Returns (wall seconds, results, per-chunk latencies in seconds)."""
    latencies: list[float] = []

    def submit(req):
        last = [time.perf_counter()]

        def on_chunk(handle, index, record):
            now = time.perf_counter()
            latencies.append(now - last[0])
            last[0] = now

        return engine.submit(**req, callback_on_chunk_end=on_chunk, max_buffered_chunks=req["num_chunks"] + 1)

    common.synchronize(engine.device)
    start = time.perf_counter()
    if together:
        handles = [submit(r) for r in requests]
        results = [h.result() for h in handles]
    else:
        results = [submit(r).result() for r in requests]
    common.synchronize(engine.device)
    return time.perf_counter() - start, results, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def same(a, b) -> bool:
    return torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents) and \
        [r.to_dict() for r in a.chunks] == [r.to_dict() for r in b.chunks]


def estimate(args) -> dict:
    """Warm-up streams, then every stream count's requests twice per repeat (one after another, batched)."""
    cfg, stream = sizes(args.size)
    flops, streams = 0.0, 0
    for name in args.searches:
        n_cand, k = (4, 2) if name == "stream_t1" else (1, 1)
        flops += args.warmup * common.stream_flops(cfg, stream, 2, n_cand, k)
        runs = sum(2 * args.repeat * n for n in args.streams)
        flops += runs * common.stream_flops(cfg, stream, args.chunks, n_cand, k)
        streams += runs + args.warmup
    overhead = common.PROCESS_START_S + common.TRITON_WARMUP_S
    return common.estimate("serving", flops, overhead_s=overhead,
                           detail=f"{streams} streams of {args.chunks} chunks at {args.size}, VAE {args.vae}")


def fits(engine, n: int, num_chunks: int, search) -> str | None:
    """None when ``n`` concurrent streams fit the engine's memory limit; else why not (the row says so)."""
    from streamt1_engine.memory import size_text

    limit, where = engine._memory_limit()  # the engine's own rule: "auto" = free now + the pool it holds
    if limit is None:
        return None
    need = n * engine.estimate_memory(num_chunks=num_chunks, search=search).run
    return None if need <= limit else f"skipped: {n} streams need {size_text(need)}, {size_text(limit)} {where}"


def main(argv=None):
    args = parse_args(argv)
    if args.estimate:
        return estimate(args)
    engine = build_engine(args, max(args.streams))
    rows = common.LiveRows(args.out, "bench_serving")
    for search_name in args.searches:
        search = search_config(search_name)
        for _ in range(args.warmup):  # warm-up: lazy tables, allocator, (GPU) autotuning and graph capture
            engine.generate(PROMPTS[0], num_chunks=2, seed=args.seed, search=search)
        for n in args.streams:
            skip = fits(engine, n, args.chunks, search)
            if skip is not None:
                print(skip, flush=True)
                rows.append(dict(search=search_name, streams=n, chunks_per_stream=args.chunks, note=skip))
                continue
            requests = [dict(prompt=PROMPTS[i % len(PROMPTS)], num_chunks=args.chunks, seed=args.seed + i,
                             search=search) for i in range(n)]
            seq, bat = [], []
            for _ in range(args.repeat):  # alternating; the fastest repeat of each counts
                seq.append(run(engine, requests, together=False))
                bat.append(run(engine, requests, together=True))
            seq_wall, seq_results, seq_lat = min(seq, key=lambda r: r[0])
            bat_wall, bat_results, bat_lat = min(bat, key=lambda r: r[0])
            frames = sum(int(r.frames.shape[0]) for r in bat_results)
            rows.append(dict(
                search=search_name, streams=n, candidates_per_stream=search.first_chunk_candidates,
                chunks_per_stream=args.chunks, video_frames=frames,
                batched_fps=frames / bat_wall, sequential_fps=frames / seq_wall, ratio=seq_wall / bat_wall,
                batched_wall_s=bat_wall, sequential_wall_s=seq_wall,
                batched_chunk_p50_s=percentile(bat_lat, 0.5), batched_chunk_p99_s=percentile(bat_lat, 0.99),
                sequential_chunk_p50_s=percentile(seq_lat, 0.5), sequential_chunk_p99_s=percentile(seq_lat, 0.99),
                identical=all(same(a, b) for a, b in zip(seq_results, bat_results))))
    engine.close()
    cfg, stream = sizes(args.size)
    notes = [f"size {args.size}: dim {cfg.dim}, {cfg.num_layers} layers, latent {stream.latent_height}x"
             f"{stream.latent_width}, {stream.chunk_frames}-frame chunks; random weights; text encoder: weight-free "
             "hashed encoder; VAE: " + ("space-to-depth stand-in (decode cost ~0)" if args.vae == "light"
                                       else "AutoencoderKLWan with random weights"),
             "stream_t1: B=2 children per beam, K=2 survivors (4 candidates per chunk), built-in rewards; none: "
             "plain streaming, one candidate",
             "ratio = sequential wall / batched wall for the same requests in the same process (aggregate "
             f"throughput gain), the fastest of {args.repeat} alternating repeats of each; chunk latency: time "
             "between a stream's consecutive chunks (first from submit)",
             f"cuda_graphs: {args.cuda_graphs}; memory limit: "
             + (args.memory_limit if isinstance(args.memory_limit, str) else f"{args.memory_limit / 2**30:g} GiB")
             + " (a stream count whose estimate does not fit is skipped)"]
    columns = ["search", "streams", "candidates_per_stream", "chunks_per_stream", "video_frames", "batched_fps",
               "sequential_fps", "ratio", "batched_chunk_p50_s", "batched_chunk_p99_s", "sequential_chunk_p50_s",
               "sequential_chunk_p99_s", "batched_wall_s", "sequential_wall_s", "identical", "note"]
    env = common.environment(args, __file__)
    env["size"] = args.size
    report = common.Report("bench_serving", "Concurrent streams: batched engine vs one at a time", env, rows,
                           columns, notes)
    report.emit(args.out)
    return rows


if __name__ == "__main__":
    main()
