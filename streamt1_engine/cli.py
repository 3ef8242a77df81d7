"""Command line: ``streamt1 generate "prompt" -o out.mp4`` writes the video and a JSON record beside it."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import STREAM_PRESETS
from .errors import StreamT1Error
from .presets import RUN_PRESETS
from .search.config import NOISE_MODES, REWARD_FRAMES, SHORT_HISTORIES, STRATEGIES, SearchConfig

log = logging.getLogger("streamt1")


def _search_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("search (defaults: the Stream-T1 paper's)")
    d = SearchConfig()
    g.add_argument("--search", choices=STRATEGIES, default="none", help="search strategy (default: none)")
    g.add_argument("--beam-size", type=int, default=d.beam_size, help="children per beam, B")
    g.add_argument("--top-k", type=int, default=d.top_k, help="surviving beams, K")
    g.add_argument("--num-candidates", type=int, default=d.num_candidates, help="candidates per chunk for best_of_n")
    g.add_argument("--window-chunks", type=int, default=d.window_chunks, help="long-term reward window, W chunks")
    g.add_argument("--noise-sigma", type=float, default=d.noise_sigma, help="noise propagation weight")
    g.add_argument("--short-threshold", type=float, default=d.short_threshold)
    g.add_argument("--long-threshold", type=float, default=d.long_threshold)
    g.add_argument("--fusion-cap", type=float, default=d.fusion_cap, help="cap of the short-term weight")
    g.add_argument("--ema-alpha", type=float, default=d.ema_alpha, help="sink EMA alpha")
    g.add_argument("--no-noise-propagation", action="store_true", help="ablation: fresh noise per chunk")
    g.add_argument("--no-reward-pruning", action="store_true", help="ablation: random survivors")
    g.add_argument("--no-memory-sinking", action="store_true", help="ablation: fixed sink, evictions discarded")
    g.add_argument("--short-history", choices=SHORT_HISTORIES, default=d.short_history,
                   help="routing's short-score baseline: lineage (upstream: every earlier chunk) or window (last W)")
    g.add_argument("--noise-mode", choices=NOISE_MODES, default=d.noise_mode,
                   help="official: the reference code's per-candidate device generators and seed numbering (the "
                        "paper's noise); portable: hashed CPU noise, the same on every device")
    g.add_argument("--reward-frames", choices=REWARD_FRAMES, default=d.reward_frames,
                   help="cold: rewards see the chunk and the window decoded from a cold VAE state, truncated to "
                        "uint8 (the paper's); streamed: reuse the streamed frames (faster)")
    g.add_argument("--short-reward", default=None, help="short-term reward name (see docs)")
    g.add_argument("--long-reward", default=None, help="long-term reward name")
    g.add_argument("--final-reward", default=None, help="reward that picks the final beam (default: long)")


def build_parser(generate_defaults: dict | None = None) -> argparse.ArgumentParser:
    """``generate_defaults`` replace the built-in defaults of ``generate`` (from an upstream ``--config``)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="streamt1", description=__doc__)
    parser.add_argument("--version", action="version", version=f"streamt1-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a video from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.mp4", help="mp4 path; the JSON record goes beside it")
    gen.add_argument("--model", default="tiny",
                     help="tiny (embedded, default), random-tiny, an engine/diffusers directory, a checkpoint or hub id")
    gen.add_argument("--text-encoder", default=None, help="umT5 source for a bare DiT checkpoint")
    gen.add_argument("--vae", default=None, help="Wan VAE source for a bare DiT checkpoint")
    gen.add_argument("--lora", default=None, help="LoRA file merged at load (LongLive)")
    gen.add_argument("--lora-alpha", type=float, default=None,
                     help="alpha the LoRA was trained with (its config's adapter alpha); scale = alpha / rank; "
                          "default: the file's alpha, else the rank")
    gen.add_argument("--preset", choices=sorted(RUN_PRESETS), default=None,
                     help="a published setup as defaults (stream-t1-paper: the paper's model, search and rewards); "
                          "flags given here win")
    gen.add_argument("--config", default=None, metavar="UPSTREAM.yaml",
                     help="upstream inference YAML (e.g. Stream-T1's stream_scaling.yaml); flags given here win")
    gen.add_argument("--stream-preset", choices=sorted(STREAM_PRESETS), default=None,
                     help="attention layout (default: from the checkpoint format; self-forcing/causvid: global "
                          "over 21 frames, longlive: local 12 incl. sink 3, stream-t1: longlive + sink up to 15)")
    gen.add_argument("--chunks", type=int, default=7, help="number of chunks (3 latent frames each)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    gen.add_argument("--attention-backend", default="auto",
                     choices=["auto", "torch", "triton", "sdpa", "flash_attn", "xformers"])
    gen.add_argument("--height", type=int, default=None, help="frame height in pixels (model default)")
    gen.add_argument("--width", type=int, default=None, help="frame width in pixels (model default)")
    gen.add_argument("--fps", type=int, default=None, help="video frame rate (model default)")
    gen.add_argument("--cuda-graphs", action="store_true", help="replay each chunk from CUDA graphs (CUDA only)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.add_argument("-v", "--verbose", action="store_true", help="log every chunk's search decisions")
    _search_flags(gen)
    if generate_defaults:
        gen.set_defaults(**generate_defaults)
    return parser


def search_config(args) -> SearchConfig:
    return SearchConfig(strategy=args.search, beam_size=args.beam_size, top_k=args.top_k,
                        num_candidates=args.num_candidates, window_chunks=args.window_chunks,
                        noise_sigma=args.noise_sigma, short_threshold=args.short_threshold,
                        long_threshold=args.long_threshold, fusion_cap=args.fusion_cap, ema_alpha=args.ema_alpha,
                        noise_propagation=not args.no_noise_propagation,
                        reward_pruning=not args.no_reward_pruning, memory_sinking=not args.no_memory_sinking,
                        short_history=args.short_history, noise_mode=args.noise_mode,
                        reward_frames=args.reward_frames)


def upstream_defaults(path: str) -> dict:
    """The ``generate`` defaults an upstream YAML implies (explicit flags still win)."""
    from .upstream_config import load_upstream_config

    cfg = load_upstream_config(path)
    s = cfg.search
    defaults = dict(upstream=cfg, chunks=cfg.num_chunks, seed=cfg.seed, search=s.strategy, beam_size=s.beam_size,
                    top_k=s.top_k, window_chunks=s.window_chunks, noise_sigma=s.noise_sigma,
                    short_threshold=s.short_threshold, long_threshold=s.long_threshold, fusion_cap=s.fusion_cap)
    if cfg.checkpoint is not None:
        defaults["model"] = cfg.checkpoint
    if cfg.lora is not None:
        defaults.update(lora=cfg.lora, lora_alpha=cfg.lora_alpha)
    return defaults


def stream_options(args) -> dict:
    """The from_pretrained arguments for the stream layout and sampler: --stream-preset, else the upstream
    --config's layout and schedule, else the model's own."""
    options = {"stream_preset": args.stream_preset}
    upstream = getattr(args, "upstream", None)
    if upstream is not None:
        options["sampler"] = upstream.sampler
        if args.stream_preset is None:
            options["stream"] = upstream.stream
    return options


def _log_record(record) -> None:
    def fmt(xs):
        return "-" if xs is None else "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"

    log.info("chunk %d: seeds %s short %s long %s hybrid %s -> survivors %s, routes %s, sink frames %s",
             record.index, record.candidate_seeds, fmt(record.short_scores), fmt(record.long_scores),
             fmt(record.hybrid_scores), record.survivors, record.route_flags, record.sink_frames)


def generate(args) -> int:
    from tqdm import tqdm

    from .engine import StreamT1Engine
    from .video_io import write_mp4

    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        raise StreamT1Error(f"output must end in .mp4, got {output}")
    if not output.parent.exists():
        raise StreamT1Error(f"output directory {output.parent} does not exist")
    search = search_config(args)
    engine = StreamT1Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                            attention_backend=args.attention_backend, text_encoder=args.text_encoder,
                                            vae=args.vae, lora=args.lora, lora_alpha=args.lora_alpha,
                                            cuda_graphs=args.cuda_graphs, **stream_options(args))
    bar = None
    seen = 0

    def progress(done, total):
        nonlocal seen, bar
        if bar is None:  # created on the first finished chunk, so input errors print alone
            bar = tqdm(total=total, unit="chunk", disable=args.no_progress, file=sys.stderr, initial=0)
        bar.update(done - seen)
        seen = done

    try:
        result = engine.generate(args.prompt, num_chunks=args.chunks, seed=args.seed, search=search,
                                 short_reward=args.short_reward, long_reward=args.long_reward,
                                 final_reward=args.final_reward, height=args.height, width=args.width,
                                 progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if args.verbose:
        for record in result.chunks:
            _log_record(record)
    fps = args.fps or result.fps
    write_mp4(output, result.frames.numpy(), fps=fps)
    record_path = output.with_suffix(".json")
    result.info["video"] = str(output)
    result.info["command"] = ["streamt1", *sys.argv[1:]]
    result.save_json(record_path)
    print(f"wrote {output} ({result.frames.shape[0]} frames, {result.frames.shape[2]}x{result.frames.shape[1]}, "
          f"{fps} fps) and {record_path}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse once; with ``--config``, parse again with the YAML's values as defaults, so explicit flags win."""
    args = build_parser().parse_args(argv)
    defaults = {}
    if getattr(args, "preset", None):
        defaults.update(RUN_PRESETS[args.preset].cli_defaults())
    if getattr(args, "config", None):
        defaults.update(upstream_defaults(args.config))
    if defaults:
        args = build_parser(defaults).parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except StreamT1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    try:
        if args.command == "generate":
            return generate(args)
    except StreamT1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
