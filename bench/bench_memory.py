#!/usr/bin/env python
"""Memory: peak vs the number of candidates N, and per chunk over a long Stream-T1 stream (it must stay flat).

Part 1 runs one steady-state chunk (all denoising steps of N candidates + the survivors' context pass, as in
bench_chunk.py) and reports the peak allocated GPU memory, the KV pool's share and the rest (activations,
graph pools). Part 2 streams ``--chunks`` chunks with Stream-T1 (B=2, K=2) and records after every chunk the
KV pages in use and the allocated memory: pages are recycled, so both stop growing once the window and the
sink are full. On a CPU, memory is the process RSS (allocator caching makes it noisier than GPU numbers).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8], help="candidates per chunk (part 1)")
    p.add_argument("--modes", nargs="+", choices=["eager", "graphs"], default=["eager", "graphs"])
    p.add_argument("--chunks", type=int, default=40, help="stream length in chunks (part 2)")
    p.add_argument("--vae", choices=["wan-random", "light"], default=None)
    p.add_argument("--parts", nargs="+", choices=["n", "stream"], default=["n", "stream"])
    args = common.finish_args(p.parse_args(argv))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.vae is None:
        args.vae = "light" if args.tiny else "wan-random"
    return args


def memory_vs_n(args, modes) -> list[dict]:
    from streamt1_engine.search.beam_search import EagerDenoiser

    setup = common.ChunkSetup(args, max(args.n))
    weights = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    pool = setup.cache.pool.nbytes()
    rows = []
    for mode in modes:
        if mode == "graphs":
            from streamt1_engine.cuda_graphs import GraphedDenoiser

            den = GraphedDenoiser(setup.model, setup.schedule, setup.text, setup.cache.pool)
        else:
            den = EagerDenoiser(setup.model, setup.schedule, setup.text)
        for n in args.n:
            work = setup.work(n)
            common.synchronize(args.device)
            before = common.current_bytes(args.device)
            common.reset_peak(args.device)
            with torch.inference_mode():
                x0 = den.denoise(work.noise, work.attn)
                den.context(x0[: work.survivors].contiguous(), work.context_attn)
            common.synchronize(args.device)
            peak = common.peak_bytes(args.device)
            rows.append(dict(mode=mode, n=n, survivors=work.survivors, kv_pool_pages=setup.cache.pool.num_pages,
                             kv_pool_mib=common.mib(pool), weights_mib=common.mib(weights),
                             peak_mib=common.mib(peak), chunk_extra_mib=common.mib(peak - before) if peak else None,
                             rss_mib=common.mib(common.rss_bytes())))
            del work, x0
        del den
    return rows


def memory_over_stream(args, mode: str) -> tuple[list[dict], dict]:
    from streamt1_engine.search.config import SearchConfig

    engine = common.build_engine(args, vae=args.vae, cuda_graphs=mode == "graphs")
    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2)
    rows = []

    def record(done, total):
        pages = engine.stats()  # the shared pool; this run is its only stream
        common.synchronize(args.device)
        rows.append(dict(mode=mode, chunk=done, pages_in_use=pages["pages_in_use"],
                         pool_pages=pages["pages_total"], allocated_mib=common.mib(common.current_bytes(args.device)),
                         peak_mib=common.mib(common.peak_bytes(args.device))))

    common.reset_peak(args.device)
    result = engine.generate("a red fox running through fresh snow", num_chunks=args.chunks, seed=args.seed,
                             search=search, progress=record)
    stream = engine.config.stream
    steady_from = stream.max_sink_pages + stream.window_pages + 1  # chunks until sink and window can be full
    steady = [r for r in rows if r["chunk"] > steady_from] or rows[-1:]
    summary = dict(mode=mode, chunks=args.chunks, max_pages_in_use=max(r["pages_in_use"] for r in rows),
                   pool_pages=rows[-1]["pool_pages"], steady_from_chunk=steady_from + 1,
                   steady_pages_range=[min(r["pages_in_use"] for r in steady), max(r["pages_in_use"] for r in steady)],
                   steady_allocated_mib_range=[min(r["allocated_mib"] for r in steady),
                                               max(r["allocated_mib"] for r in steady)],
                   video_frames=int(result.frames.shape[0]))
    return rows, summary


def main(argv=None):
    args = parse_args(argv)
    modes = [m for m in args.modes if m == "eager" or args.device.type == "cuda"]
    notes = [] if modes == args.modes else ["CUDA graphs need a CUDA device: graphs rows skipped"]
    env = common.environment(args, __file__)
    reports = []
    if "n" in args.parts:
        rows = memory_vs_n(args, modes)
        reports.append(common.Report(
            "bench_memory_n", "Peak memory of one steady-state chunk vs N", env, rows,
            notes=notes + ["peak_mib: torch.cuda.max_memory_allocated during the chunk (GPU only); chunk_extra_mib: "
                           "peak minus what was allocated before it (activations, graph pools); CPU: rss_mib only"]))
    if "stream" in args.parts:
        rows, summaries = [], []
        for mode in modes:
            mode_rows, summary = memory_over_stream(args, mode)
            rows += mode_rows
            summaries.append(summary)
        flat = [f"{s['mode']}: pages in use {s['steady_pages_range']} (pool {s['pool_pages']}), allocated MiB "
                f"{s['steady_allocated_mib_range']} from chunk {s['steady_from_chunk']} to {s['chunks']}"
                for s in summaries]
        reports.append(common.Report(
            "bench_memory_stream", f"Memory per chunk over a {args.chunks}-chunk Stream-T1 stream", env, rows,
            notes=notes + flat + [common.parts_note(args),
                                  "allocated_mib: torch.cuda.memory_allocated after each chunk (GPU) or RSS (CPU)"],
            extra={"summary": summaries}))
    for report in reports:
        report.emit(args.out)
    return reports


if __name__ == "__main__":
    main()
