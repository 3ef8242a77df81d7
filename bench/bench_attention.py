#!/usr/bin/env python
"""Time the fused paged-attention kernel against gather + stock attention kernels, in one run.

Backends: ``triton`` (the engine's kernel over the post-RoPE pool), ``triton_rope`` (the previous kernel,
which reads pre-RoPE keys and rotates them in its page loop; the same cache rotated gives the same output),
``sdpa`` (gather + torch SDPA, torch's choice of kernel), ``sdpa_flash`` / ``sdpa_cudnn`` (the same with
SDPA's flash or cuDNN kernel forced; CUDA only), ``sdpa_attn_only`` (SDPA on keys already gathered),
``flash_attn`` and ``xformers`` (gather + those packages, when installed).

Default shapes are Wan2.1-1.3B's self-attention during streaming generation: a 3-frame chunk of
30x52 latent tokens per frame (Lq = 4680), 12 heads of 128, and a KV cache of a 15-frame sink plus a
9-frame window (8 pages of one chunk each) plus the chunk's own keys. Candidates share the sink pages and
own their window pages, as beams do. FLOPs count both matmuls: 4 * N * Lq * S_kv * H * D. Every backend's
output is compared with the gathered-SDPA output (relative error, ||out - ref|| / ||ref||).

``--tiny`` (automatic without CUDA) shrinks everything so that the script runs on a CPU in seconds (Triton in
interpreter mode); its timings only show that the script works.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

KERNELS = ("triton", "triton_rope", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_attn_only", "flash_attn", "xformers")


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=None, help="candidates per batch (default: 1 2 4 8)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--grid", type=int, nargs=2, default=[30, 52], metavar=("H", "W"), help="latent tokens per frame")
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--sink-frames", type=int, default=15)
    p.add_argument("--window-frames", type=int, default=9)
    p.add_argument("--backends", nargs="+", choices=KERNELS, default=list(KERNELS),
                   help="what to time (sdpa_attn_only: SDPA on keys already gathered and rotated, i.e. the "
                        "gather left out); flash_attn/xformers are skipped when not installed")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16/fp16 peak for the share-of-peak column (default: from the GPU name)")
    args = common.parse_kernel_args(p, argv, warmup=5, repeat=20)
    if args.tiny:
        args.heads, args.head_dim, args.grid = 2, 32, [2, 3]
        args.chunk_frames, args.sink_frames, args.window_frames = 2, 4, 2
    if args.n is None:
        args.n = [1, 2] if args.tiny else [1, 2, 4, 8]
    for name, frames in (("sink", args.sink_frames), ("window", args.window_frames)):
        if frames % args.chunk_frames:
            p.error(f"--{name}-frames must be a multiple of --chunk-frames (pages hold one chunk)")
    return args


def build_inputs(args, n, device, dtype):
    """Pool of shared sink pages + per-candidate window pages, each candidate's table in cache order.

    Returns the post-RoPE inputs (what the engine's backends read) and the pre-RoPE inputs of the previous
    kernel: the same cache, its keys rotated at the pages' positions or not."""
    from streamt1_engine.kernels.paged_attention.naive_rope import rotated_page_keys
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
    rope_inputs = (q, kc, vc, k_pool, v_pool, page_table, num_pages, page_frame_pos, rope.frame_cos,
                   rope.frame_sin, sc, ss, frame_tokens)
    every_page = torch.arange(pool, device=device)[None]
    k_rotated = rotated_page_keys(k_pool, every_page, page_frame_pos, rope.frame_cos, rope.frame_sin, sc, ss,
                                  frame_tokens)[0].to(dtype)
    inputs = (q, kc, vc, k_rotated, v_pool, page_table, num_pages)
    return inputs, rope_inputs, lq, kv_len


def _sdpa_forced(inputs, kernel: str):
    """Gathered SDPA with one of torch's kernels forced (flash or cuDNN), or None where it cannot run."""
    from streamt1_engine.kernels.paged_attention import gathered

    if inputs[0].device.type != "cuda":
        print(f"sdpa_{kernel}: needs CUDA: skipped", file=sys.stderr)
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}[kernel]
    if backend is None:
        print(f"sdpa_{kernel}: this torch has no such SDPA kernel: skipped", file=sys.stderr)
        return None

    def run():
        with sdpa_kernel([backend]):
            return gathered.paged_attention_sdpa(*inputs)

    try:
        run()
    except RuntimeError as exc:
        print(f"sdpa_{kernel}: not available here ({str(exc).splitlines()[0][:100]}): skipped", file=sys.stderr)
        return None
    return run


def make_backends(args, inputs, rope_inputs):
    from streamt1_engine.kernels.paged_attention import gathered
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton
    from streamt1_engine.kernels.paged_attention.fused_rope import paged_attention_triton_rope

    fns = {}
    for name in args.backends:
        if name == "triton":
            out = torch.empty_like(inputs[0])
            fns[name] = lambda out=out: paged_attention_triton(*inputs, out=out)
        elif name == "triton_rope":
            out = torch.empty_like(inputs[0])
            fns[name] = lambda out=out: paged_attention_triton_rope(*rope_inputs, out=out)
        elif name == "sdpa":
            fns[name] = lambda: gathered.paged_attention_sdpa(*inputs)
        elif name in ("sdpa_flash", "sdpa_cudnn"):
            fn = _sdpa_forced(inputs, name.removeprefix("sdpa_"))
            if fn is not None:
                fns[name] = fn
        elif name == "sdpa_attn_only":
            # Keys already contiguous: what SDPA costs without the gather.
            keys, values, valid = gathered.gather_kv(*inputs)
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
    return fns


def estimate(args) -> dict:
    """Every call of every backend (warm-up, timed, the error check) and the reference, per N."""
    lq = args.chunk_frames * args.grid[0] * args.grid[1]
    kv_len = (args.sink_frames + args.window_frames) * args.grid[0] * args.grid[1] + lq
    calls = len(args.backends) * (args.warmup + args.repeat + 1) + 1
    flops = sum(calls * 4.0 * n * lq * kv_len * args.heads * args.head_dim for n in args.n)
    # no model weights to build; two kernels to compile and autotune
    return common.estimate("attention", flops, overhead_s=common.PROCESS_START_S + 10.0,
                           detail=f"N={args.n}, {len(args.backends)} backends x ({args.warmup} + {args.repeat}) calls")


def main(argv=None):
    args = parse_args(argv)
    if args.estimate:
        return estimate(args)
    common.interpret_triton_on_cpu(args)
    from streamt1_engine.kernels.paged_attention.fused import attention_flops

    device, dtype = str(args.device), args.torch_dtype
    peak = common.peak_tflops(args.device, dtype, args.peak_tflops)
    rows = common.LiveRows(args.out, "bench_attention")
    for n in args.n:
        inputs, rope_inputs, lq, kv_len = build_inputs(args, n, device, dtype)
        fns = make_backends(args, inputs, rope_inputs)
        reference = fns["sdpa"]() if "sdpa" in fns else None
        flops = attention_flops(n, lq, kv_len, args.heads, args.head_dim)
        timings = common.median_ms(fns, args)
        for name, ms in timings.items():
            rows.append({
                "n": n, "backend": name, "lq": lq, "kv_len": kv_len, "ms": ms, "tflops": flops / ms / 1e9,
                "share_of_peak": flops / ms / 1e9 / peak if peak else None,
                "x_vs_sdpa": timings["sdpa"] / ms if "sdpa" in timings else None,
                "rel_err_vs_sdpa": common.relative_error(fns[name](), reference) if reference is not None else None,
            })
        del inputs, rope_inputs, fns, reference
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    shapes = (f"H={args.heads}, D={args.head_dim}, {args.grid[0]}x{args.grid[1]} tokens per frame, "
              f"{args.chunk_frames}-frame pages, {args.sink_frames}-frame sink + {args.window_frames}-frame window")
    peak_note = (f"share_of_peak: TFLOP/s over {peak} TFLOP/s (spec-sheet dense peak)" if peak else
                 "share_of_peak: no peak known for this device/dtype (pass --peak-tflops)")
    common.emit_kernel_report(
        args, __file__, "bench_attention", "Paged attention kernel", rows, shapes, timed=" / ".join(args.backends),
        ratio_note="x_vs_sdpa: gathered-SDPA time / this time (gather + SDPA is what the fused kernel replaces; "
                   "triton_rope is the previous kernel, which also rotates every cached key)", extra_notes=(peak_note,))
    return rows


if __name__ == "__main__":
    main()
