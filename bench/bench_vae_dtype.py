#!/usr/bin/env python
"""How close is the Wan VAE's bf16 decode (the upstream pipelines' dtype) to float32, and what does each cost?

Decodes the same random latents as a stream of 3-frame chunks (the causal state carried between chunks,
N streams in one batch) with the decoder's convolutions in float32 and in bf16, and compares the frames in
[0, 1]: PSNR = 10 log10(1 / MSE) against float32, plus the largest pixel difference in 8-bit steps.
``--arch tiny`` (the default without CUDA) is the small Wan VAE of the tests; ``--arch wan2.1`` is the
Wan2.1 VAE architecture. Weights are random (seeded): the numbers bound the rounding of the decoder's
arithmetic, not of trained weights. Needs diffusers.

    python bench/bench_vae_dtype.py --tiny
    python bench/bench_vae_dtype.py --arch wan2.1 --latent 60 104 --chunks 2 --out DIR   # GPU
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["tiny", "wan2.1"], default=None, help="default: wan2.1 on CUDA, else tiny")
    p.add_argument("--n", type=int, default=2, help="streams decoded as one batch")
    p.add_argument("--chunks", type=int, default=3, help="3-frame latent chunks per stream")
    p.add_argument("--latent", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="latent size (default: 60 104 for wan2.1 on CUDA, 6 8 otherwise)")
    args = common.finish_args(p.parse_args(argv), warmup=1, repeat=3)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.arch is None:
        args.arch = "wan2.1" if args.device.type == "cuda" and not args.tiny else "tiny"
    if args.latent is None:
        args.latent = [60, 104] if args.arch == "wan2.1" and args.device.type == "cuda" else [6, 8]
    return args


def build_model(arch: str, seed: int):
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as exc:
        raise SystemExit(f"bench_vae_dtype needs diffusers ({exc}): no VAE numbers without it") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "tiny":
            return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                    temperal_downsample=[False, True], latents_mean=[0.3, -0.2, 0.1, 0.5],
                                    latents_std=[1.5, 0.7, 2.0, 1.1])
        return AutoencoderKLWan(z_dim=16)


def decode_stream(vae, latents: torch.Tensor) -> torch.Tensor:
    frames, state = [], None
    for start in range(0, latents.shape[2], 3):
        out, state = vae.decode_chunk(latents[:, :, start:start + 3], state)
        frames.append(out)
    return torch.cat(frames, dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def estimate(args) -> dict:
    """(warm-up + timed + one checked) decodes per dtype; float32 counted at half the bf16 rate."""
    frames = args.n * common.video_frames(args.chunks) * (args.latent[0] * args.latent[1]) / (60 * 104)
    decodes = (args.warmup + args.repeat + 1) * (1 + 2)  # bf16 once, float32 twice as slow
    vae_flops = decodes * frames * common.VAE_TFLOP_PER_FRAME * 1e12 if args.arch == "wan2.1" else 0.0
    detail = f"{args.arch}: {args.n} streams x {args.chunks} chunks, {args.warmup} + {args.repeat}"
    return common.estimate("vae", 0.0, vae_flops=vae_flops, overhead_s=common.PROCESS_START_S, detail=detail)


def main(argv=None):
    args = parse_args(argv)
    if args.estimate:
        return estimate(args)
    from streamt1_engine.vae import WanVAE

    model = build_model(args.arch, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    z = int(model.config.z_dim)
    latents = torch.randn(args.n, z, 3 * args.chunks, *args.latent, generator=gen).to(args.device)
    rows, reference = common.LiveRows(args.out, "bench_vae_dtype"), None
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            vae = WanVAE(model, device=args.device, dtype=dtype)
            times = common.time_ms(lambda: decode_stream(vae, latents), args.device, args.warmup, args.repeat)
            video = decode_stream(vae, latents)
            if reference is None:
                reference = video
            rows.append({"vae_dtype": str(dtype).replace("torch.", ""), "ms_per_stream_decode": min(times),
                         "psnr_vs_fp32_db": psnr(video, reference),
                         "max_diff_8bit": float((video - reference).abs().max()) * 255,
                         "frames_std": float(video.float().std())})
            model = vae.model  # the same weights, cast once more for the next dtype
    env = common.environment(args, __file__)
    env["attention_backend"] = "-"
    notes = [f"{args.arch} Wan VAE, random weights (seed {args.seed}); {args.n} streams x {args.chunks} chunks of "
             f"3 latent frames at {args.latent[0]}x{args.latent[1]}; frames in [0, 1]",
             "frames_std: spread of the decoded pixels (a PSNR on a flat image would mean little)"]
    common.Report("bench_vae_dtype", "Wan VAE decode: bf16 against float32", env, rows, notes=notes).emit(args.out)
    return rows


if __name__ == "__main__":
    main()
