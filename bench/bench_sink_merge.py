#!/usr/bin/env python
"""How fast is the memory-sink merge? The one-launch Triton kernel against the PyTorch reference (one blend
per op, layer pool at a time, ops read on the host), in one run.

Shapes are Wan2.1-1.3B's KV pool (30 layers, 4680-token pages of 12 heads x 128). Each EMA op blends one
evicted page into a sink page for every layer, K and V; a chunk evicts one page per beam, so M = 1, 2, 4 ops
per launch (chained on one sink, as beams sharing a sink do). The kernel is memory bound: GB/s counts two
page reads and one page write per op, layer and K/V.
``--tiny`` (automatic without CUDA) runs toy sizes in Triton's interpreter; its timings mean nothing.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, nargs="+", default=[1, 2, 4], help="EMA merges per launch")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--page-tokens", type=int, default=4680)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--alpha", type=float, default=0.9)
    args = common.parse_kernel_args(p, argv, warmup=5, repeat=20)
    if args.tiny:
        args.layers, args.page_tokens, args.heads, args.head_dim = 2, 12, 2, 16
    return args


def build_inputs(args, num_ops):
    from streamt1_engine.kernels.sink_merge import EMA

    gen = torch.Generator().manual_seed(args.seed)
    pages = 2 * num_ops + 2
    shape = (args.layers, pages, args.page_tokens, args.heads, args.head_dim)
    k_pool = torch.randn(*shape, generator=gen).to(args.device, args.torch_dtype)
    v_pool = torch.randn(*shape, generator=gen).to(args.device, args.torch_dtype)
    frame_pos = torch.arange(pages, dtype=torch.int32, device=args.device) * 3
    # op i blends evicted page 2 + i into the sink: the first op copies sink page 0 to page 1 + ..., the
    # rest blend in place into that copy (copy-on-write target, then chained merges).
    # Column 4: sink frame - evicted frame (the keys' rotation onto the sink's frames).
    ops = [(EMA, 2 + i, 0 if i == 0 else 1, 1, -3 * (2 + i)) for i in range(num_ops)]
    from streamt1_engine.model.rope import Rope3D

    rope = Rope3D(args.head_dim, max_frames=4096, device=args.device)
    return (k_pool, v_pool, frame_pos, torch.tensor(ops, dtype=torch.int32, device=args.device), rope.frame_cos,
            rope.frame_sin)


def main(argv=None):
    args = parse_args(argv)
    common.interpret_triton_on_cpu(args)
    from streamt1_engine.kernels.sink_merge import sink_merge_

    elem = torch.finfo(args.torch_dtype).bits // 8
    page_bytes = args.page_tokens * args.heads * args.head_dim * elem
    rows = []
    for num_ops in args.ops:
        pristine = build_inputs(args, num_ops)
        results = {}
        fns = {}
        for backend in ("triton", "torch"):
            state = [t.clone() for t in pristine]

            def run(state=state, backend=backend):
                # Same pages every call: the merge is idempotent on data it does not overwrite (the sink
                # copy in page 1 is rewritten from page 0 first), so repeated calls time the same work.
                sink_merge_(*state[:3], state[3], args.alpha, *state[4:], backend=backend)
            run()
            results[backend] = state
            fns[backend] = run
        timings = common.median_ms(fns, args)
        moved = 3 * page_bytes * num_ops * args.layers * 2
        for name, ms in timings.items():
            err = max(common.relative_error(a, b) for a, b in zip(results[name][:2], results["torch"][:2]))
            rows.append({"ops": num_ops, "backend": name, "ms": ms, "gb_per_s": moved / ms / 1e6,
                         "x_vs_torch": timings["torch"] / ms, "rel_err_vs_torch": err})
    common.emit_kernel_report(args, __file__, "bench_sink_merge", "Memory-sink merge", rows,
                              f"{args.layers} layers, pages of {args.page_tokens} tokens x {args.heads} heads x "
                              f"{args.head_dim}")
    return rows


if __name__ == "__main__":
    main()
