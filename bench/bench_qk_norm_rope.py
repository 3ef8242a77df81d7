#!/usr/bin/env python
"""Does the fused q/k path pay? The Triton q/k RMS-norm + half-layout permutation + RoPE kernel against the
PyTorch reference (two norms, a permutation, two rotations, a pre-RoPE key copy), in one run.

Shapes are one Wan2.1-1.3B self-attention layer on a chunk (Lq = 4680 tokens, dim 1536 = 12 heads x 128)
for N = 1, 2, 4, 8 candidates. The kernel is memory bound: GB/s counts the bytes it must move once
(q and k read; rotated q, pre-RoPE k and rotated k written; the cos/sin tables read).
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
    p.add_argument("--n", type=int, nargs="+", default=None, help="candidates per batch (default: 1 2 4 8)")
    p.add_argument("--tokens", type=int, default=4680, help="tokens per candidate (a 3-frame 30x52 chunk)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    args = common.parse_kernel_args(p, argv, warmup=10, repeat=50)
    if args.tiny:
        args.tokens, args.heads, args.head_dim = 24, 2, 16
    if args.n is None:
        args.n = [1, 2] if args.tiny else [1, 2, 4, 8]
    return args


def build_inputs(args, n):
    gen = torch.Generator().manual_seed(args.seed)
    dim, half = args.heads * args.head_dim, args.head_dim // 2

    def rnd(*shape, dtype=args.torch_dtype):
        return torch.randn(*shape, generator=gen).to(args.device, dtype)

    # q and k as the two first thirds of a fused qkv projection output, the way the model may produce them
    qkv = rnd(n, args.tokens, 3 * dim)
    angles = torch.rand(n, args.tokens, half, generator=gen).to(args.device) * 6.28
    return (qkv[..., :dim], qkv[..., dim:2 * dim], 1 + 0.1 * rnd(dim), 1 + 0.1 * rnd(dim), 1e-6, args.heads,
            angles.cos(), angles.sin())


def bytes_moved(args, n) -> int:
    elem = torch.finfo(args.torch_dtype).bits // 8
    tokens = n * args.tokens
    return tokens * args.heads * args.head_dim * elem * 5 + tokens * args.head_dim * 4  # 2 in, 3 out, cos+sin


def main(argv=None):
    args = parse_args(argv)
    common.interpret_triton_on_cpu(args)
    from streamt1_engine.kernels.qk_norm_rope import qk_norm_rope

    rows = []
    for n in args.n:
        inputs = build_inputs(args, n)
        fns = {backend: (lambda b=backend: qk_norm_rope(*inputs, backend=b)) for backend in ("triton", "torch")}
        reference = fns["torch"]()
        timings = common.median_ms(fns, args)
        for name, ms in timings.items():
            got = fns[name]()
            rows.append({"n": n, "backend": name, "tokens": n * args.tokens, "ms": ms,
                         "gb_per_s": bytes_moved(args, n) / ms / 1e6, "x_vs_torch": timings["torch"] / ms,
                         "rel_err_vs_torch": max(common.relative_error(g, r) for g, r in zip(got, reference))})
    common.emit_kernel_report(args, __file__, "bench_qk_norm_rope", "Fused q/k norm + RoPE", rows,
                              f"{args.tokens} tokens x {args.heads} heads x {args.head_dim} per candidate")
    return rows


if __name__ == "__main__":
    main()
