#!/usr/bin/env python
"""Time the fused paged-attention kernel against gather + stock attention kernels.

Default shapes are Wan2.1-1.3B's self-attention during streaming generation: a 3-frame chunk of
30x52 latent tokens per frame (Lq = 4680), 12 heads of 128, and a KV cache of a 15-frame sink plus a
9-frame window (8 pages of one chunk each) plus the chunk's own keys. Candidates share the sink pages and
own their window pages, as beams do. FLOPs count both matmuls: 4 * N * Lq * S_kv * H * D.

``--tiny`` shrinks everything so that the script runs on a CPU in seconds (Triton in interpreter mode);
its timings only show that the script works.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8], help="candidates per batch")
    p.add_argument("--tiny", action="store_true", help="small shapes for a quick CPU smoke run")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--grid", type=int, nargs=2, default=[30, 52], metavar=("H", "W"), help="latent tokens per frame")
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--sink-frames", type=int, default=15)
    p.add_argument("--window-frames", type=int, default=9)
    p.add_argument("--backends", nargs="+", default=["triton", "sdpa", "sdpa_attn_only", "flash_attn", "xformers"],
                   help="flash_attn/xformers are skipped when not installed")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="write results to this .json or .csv path")
    args = p.parse_args(argv)
    if args.tiny:
        args.heads, args.head_dim, args.grid = 2, 32, [2, 3]
        args.chunk_frames, args.sink_frames, args.window_frames = 2, 4, 2
        args.warmup, args.iters = 1, 2
        if args.n == [1, 2, 4, 8]:
            args.n = [1, 2]
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    for name, frames in (("sink", args.sink_frames), ("window", args.window_frames)):
        if frames % args.chunk_frames:
            p.error(f"--{name}-frames must be a multiple of --chunk-frames (pages hold one chunk)")
    return args


def build_inputs(args, n, device, dtype):
    """Pool of shared sink pages + per-candidate window pages, each candidate's table in cache order."""
    from streamt1_engine.model.rope import Rope3D

    gh, gw = args.grid
    frame_tokens = gh * gw
    cf = args.chunk_frames
    t = cf * frame_tokens
    sink_pages, window_pages = args.sink_frames // cf, args.window_frames // cf
    pages = sink_pages + window_pages
    pool = sink_pages + n * window_pages
    h, d = args.heads, args.head_dim
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    rope = Rope3D(d, max_frames=args.sink_frames + args.window_frames + 4 * cf, device=device)
    sc, ss = rope.spatial_tables(gh, gw)
    k_pool, v_pool = rnd(pool, t, h, d), rnd(pool, t, h, d)
    table = [[*range(sink_pages), *(sink_pages + i * window_pages + j for j in range(window_pages))]
             for i in range(n)]
    page_table = torch.tensor(table, dtype=torch.int32, device=device).reshape(n, pages)
    num_pages = torch.full((n,), pages, dtype=torch.int32, device=device)
    frame_pos = [cf * p for p in range(sink_pages)]
    frame_pos += [args.sink_frames + cf * j for _ in range(n) for j in range(window_pages)]
    page_frame_pos = torch.tensor(frame_pos, dtype=torch.int32, device=device)
    lq = t
    q, kc, vc = rnd(n, lq, h, d), rnd(n, lq, h, d), rnd(n, lq, h, d)
    kv_len = pages * t + lq
    inputs = (q, kc, vc, k_pool, v_pool, page_table, num_pages, page_frame_pos, rope.frame_cos, rope.frame_sin,
              sc, ss, frame_tokens)
    return inputs, lq, kv_len


def timer(device):
    if device.startswith("cuda"):
        def run(fn, warmup, iters):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
    else:
        def run(fn, warmup, iters):
            for _ in range(warmup):
                fn()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) * 1e3 / iters
    return run


def make_backends(args, inputs):
    from streamt1_engine.kernels.paged_attention import gathered
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    fns = {}
    for name in args.backends:
        if name == "triton":
            out = torch.empty_like(inputs[0])
            fns[name] = lambda out=out: paged_attention_triton(*inputs, out=out)
        elif name == "sdpa":
            fns[name] = lambda: gathered.paged_attention_sdpa(*inputs)
        elif name == "sdpa_attn_only":
            # Keys already contiguous and rotated: what SDPA costs without the gather.
            keys, values, valid = gathered.gather_rotated_kv(*inputs)
            scale = inputs[0].shape[-1] ** -0.5
            fns[name] = lambda k=keys, v=values, m=valid: gathered.attention_sdpa(inputs[0], k, v, m, scale, True)
        elif name == "flash_attn":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                print("flash_attn not installed: skipped", file=sys.stderr)
                continue
            fns[name] = lambda: gathered.paged_attention_flash_attn(*inputs)
        elif name == "xformers":
            try:
                import xformers.ops  # noqa: F401
            except ImportError:
                print("xformers not installed: skipped", file=sys.stderr)
                continue
            fns[name] = lambda: gathered.paged_attention_xformers(*inputs)
        else:
            raise SystemExit(f"unknown backend {name!r}")
    return fns


def main(argv=None):
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        # Triton reads this when kernels are defined, i.e. before the fused module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = DTYPES[args.dtype]
    run = timer(args.device)
    from streamt1_engine.kernels.paged_attention.fused import attention_flops

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    rows = []
    print(f"device={device_name} dtype={args.dtype} H={args.heads} D={args.head_dim} "
          f"tokens/frame={args.grid[0] * args.grid[1]}")
    print(f"{'N':>3} {'backend':>15} {'Lq':>6} {'S_kv':>7} {'ms':>9} {'TFLOP/s':>8} {'x_vs_sdpa':>9} {'max_err':>8}")
    for n in args.n:
        inputs, lq, kv_len = build_inputs(args, n, args.device, dtype)
        fns = make_backends(args, inputs)
        reference = fns["sdpa"]().float() if "sdpa" in fns else None
        timings = {name: run(fn, args.warmup, args.iters) for name, fn in fns.items()}
        flops = attention_flops(n, lq, kv_len, args.heads, args.head_dim)
        for name, ms in timings.items():
            err = None
            if reference is not None:
                err = float((fns[name]().float() - reference).abs().max())
            ratio = timings["sdpa"] / ms if "sdpa" in timings else None
            row = dict(n=n, backend=name, lq=lq, kv_len=kv_len, heads=args.heads, head_dim=args.head_dim,
                       dtype=args.dtype, ms=ms, tflops=flops / ms / 1e9, speedup_vs_sdpa=ratio, max_abs_err=err,
                       device=device_name, torch=torch.__version__, triton=triton_version, tiny=args.tiny)
            rows.append(row)
            ratio_s = f"{ratio:9.2f}" if ratio is not None else f"{'-':>9}"
            err_s = f"{err:8.1e}" if err is not None else f"{'-':>8}"
            print(f"{n:>3} {name:>15} {lq:>6} {kv_len:>7} {ms:9.3f} {row['tflops']:8.2f} {ratio_s} {err_s}")
        del inputs, fns, reference
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.out.endswith(".csv"):
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        else:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "results": rows}, f, indent=2)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
