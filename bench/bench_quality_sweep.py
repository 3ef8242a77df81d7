"""Sweep Stream-T1's memory-routing thresholds and EMA alpha on long streams of the embedded tiny model.

    python bench/bench_quality_sweep.py --workers 2           # 4 prompts x 2 seeds x 60 chunks, a 3x3x3 grid
    python bench/bench_quality_sweep.py --tiny                # seconds: 1 prompt, 1 seed, a 2-point grid
    python bench/bench_quality_sweep.py --short 0 -0.01 --long 0.2 0.02 --alpha 0.999 0.9 --chunks 60

For every grid point (short_threshold, long_threshold, ema_alpha) it runs the full search on the same
held-out prompts and seeds as the quality bench, counts how often the router chose APPEND and EMA (out of
all survivor routings after the first chunk), and reports how far the bench's held-out metrics move
against the same search with memory sinking switched off (paired, prompt-clustered bootstrap interval).
The paper's values (0.0, 0.2, 0.999) are the first point of the default grid. Thresholds at which the
units fire and move a metric outside its interval are candidates for the embedded model's preset.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
import bench_quality_metrics as qm  # noqa: E402

from streamt1_engine.search.config import SearchConfig  # noqa: E402

DEFAULT_GRID = {"short": [0.0, -0.005, -0.02], "long": [0.2, 0.02, 0.0], "alpha": [0.999, 0.99, 0.9]}
TINY_GRID = {"short": [0.0], "long": [0.2, -1.0], "alpha": [0.9]}
REPORTED = ("composite", "seam_ratio", "spurious_blobs", "square_fill")


def streams(model: str, configs: list[SearchConfig], prompts, seeds, num_chunks: int, workers: int = 1,
            threads: int = 1, long_reward: str = "video") -> list[list[dict]]:
    """Per config: one record per (prompt, seed) with held-out metrics and route counts (after chunk 0)."""
    jobs = [(cfg, long_reward, prompt, seed, num_chunks, False)
            for cfg in configs for prompt in prompts for seed in seeds]
    scored = iter(bq.score_videos(model, jobs, workers, threads))
    out = []
    for _ in configs:
        records = [next(scored)["record"] for _ in range(len(prompts) * len(seeds))]
        for record in records:
            record["composite"] = bq.composite(record)
        out.append(records)
    return out


def route_shares(records: list[dict]) -> tuple[float, float]:
    routes = sum(r["routes"] for r in records)
    if not routes:
        return 0.0, 0.0
    return sum(r["append"] for r in records) / routes, sum(r["ema"] for r in records) / routes


def paired(records: list[dict], baseline: list[dict], metric: str, resamples: int):
    by_prompt: dict[str, list[float]] = {}
    for a, b in zip(records, baseline):
        assert (a["prompt"], a["seed"]) == (b["prompt"], b["seed"])
        by_prompt.setdefault(a["prompt"], []).append(a[metric] - b[metric])
    return qm.paired_bootstrap(by_prompt, resamples=resamples, seed=0)


def sweep(model: str, grid: dict, prompts, seeds, num_chunks: int, resamples: int = 1000, workers: int = 1,
          threads: int = 1, long_reward: str = "video") -> list[dict]:
    base = {"strategy": "stream_t1", "beam_size": bq.BEAM, "top_k": bq.TOP_K}
    points = list(itertools.product(grid["short"], grid["long"], grid["alpha"]))
    configs = [SearchConfig(**base, memory_sinking=False)]
    configs += [SearchConfig(**base, short_threshold=short, long_threshold=long, ema_alpha=alpha)
                for short, long, alpha in points]
    started = time.perf_counter()
    baseline, *per_point = streams(model, configs, prompts, seeds, num_chunks, workers, threads, long_reward)
    print(f"  {len(configs)} configurations in {time.perf_counter() - started:.1f} s", flush=True)
    rows = []
    for (short, long, alpha), records in zip(points, per_point):
        append, ema = route_shares(records)
        row = {"short_threshold": short, "long_threshold": long, "ema_alpha": alpha, "append_share": append,
               "ema_share": ema, "deltas": {m: paired(records, baseline, m, resamples) for m in REPORTED},
               "records": records}
        rows.append(row)
        print(f"  short {short:+g} long {long:+g} alpha {alpha:g}: APPEND {append:.0%} EMA {ema:.0%}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    heads = ["short_threshold", "long_threshold", "ema_alpha", "APPEND", "EMA"] + [f"Δ {m}" for m in REPORTED]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [f"{r['short_threshold']:g}", f"{r['long_threshold']:g}", f"{r['ema_alpha']:g}",
                 f"{r['append_share']:.0%}", f"{r['ema_share']:.0%}"]
        for m in REPORTED:
            mean, low, high = r["deltas"][m]
            mark = "**" if low > 0 or high < 0 else ""
            cells.append(f"{mark}{mean:+.3f} [{low:+.3f}, {high:+.3f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=None, help="first N held-out prompts (default 4, tiny 1)")
    parser.add_argument("--first-prompt", type=int, default=0,
                        help="skip this many held-out prompts (to confirm a choice on prompts it was not made on)")
    parser.add_argument("--seeds", type=int, default=None, help="first N bench seeds (default 2, tiny 1)")
    parser.add_argument("--chunks", type=int, default=None, help="chunks per stream (default 60, tiny 6)")
    parser.add_argument("--short", type=float, nargs="+", default=None, help="short_threshold values")
    parser.add_argument("--long", type=float, nargs="+", default=None, help="long_threshold values")
    parser.add_argument("--alpha", type=float, nargs="+", default=None, help="ema_alpha values")
    parser.add_argument("--long-reward", choices=("video", "video_motion"), default="video",
                        help="long-term reward: procedural_video, or with the motion verifier (the v2 model's own)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription)")
    parser.add_argument("--workers", type=int, default=1, help="processes generating streams at once (one per core)")
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and records (.json) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = dict(TINY_GRID if args.tiny else DEFAULT_GRID)
    grid.update({k: v for k, v in (("short", args.short), ("long", args.long), ("alpha", args.alpha)) if v})
    if not 0 <= args.first_prompt < len(bq.PROMPTS):
        parser.error(f"--first-prompt must be in 0..{len(bq.PROMPTS) - 1}, got {args.first_prompt}")
    prompts = bq.PROMPTS[args.first_prompt:][:args.prompts or (1 if args.tiny else 4)]
    seeds = bq.SEEDS[:args.seeds or (1 if args.tiny else 2)]
    num_chunks = args.chunks or (6 if args.tiny else 60)
    bq.check_disjoint(prompts, seeds)
    print(f"model {args.model}: {len(prompts)} prompts x {len(seeds)} seeds, {num_chunks} chunks, "
          f"{args.workers} worker(s)", flush=True)
    rows = sweep(args.model, grid, prompts, seeds, num_chunks, args.resamples, args.workers, args.threads,
                 args.long_reward)
    text = "\n".join([f"# Memory-routing sweep ({datetime.date.today().isoformat()})", "",
                      f"Command: `python bench/bench_quality_sweep.py {' '.join(argv)}`  ",
                      f"Model `{args.model}`, {len(prompts)} prompts (held-out {args.first_prompt}.."
                      f"{args.first_prompt + len(prompts) - 1}) x {len(seeds)} seeds, {num_chunks} chunks, "
                      f"long-term reward procedural_{args.long_reward}, "
                      f"torch {torch.__version__}, {args.workers} process(es) x {args.threads} thread(s). "
                      "Δ: against the same search without memory sinking, mean [95 % interval, prompts resampled].",
                      "", table(rows), ""])
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"command": argv, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
