"""Quality bench v1 (the table in bench/results/quality-2026-11-24.md): the search strategies on the
embedded tiny model, judged by the procedural metrics of ``tiny/metrics.py``. Superseded by v2
(``bench_quality.py``), which has held-out prompts, metrics apart from every reward and confidence intervals.

    python bench/bench_quality.py --v1            # full run, writes bench/results/quality-<date>.md
    python bench/bench_quality.py --v1 --quick    # seconds: CI smoke run, prints only

Every strategy generates the same prompts and seeds with the engine API. The search is steered by the
procedural rewards (short-term: ``procedural_frame``, long-term and final pick: ``procedural_video``);
their terms are marked * in the table. ``direction`` and ``flicker`` are never given to the search: they
are the held-out check that the search finds better videos, not just videos that game its reward.
``best_of_n`` draws as many candidates per chunk as Stream-T1 (beam_size x top_k), so compute is equal.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from streamt1_engine.engine import StreamT1Engine
from streamt1_engine.search.config import SearchConfig
from streamt1_engine.tiny.metrics import METRIC_NAMES, video_metrics
from streamt1_engine.tiny.rewards import HELD_OUT_TERMS, ProceduralFrameReward, ProceduralVideoReward

PROMPTS = [
    "a red circle moving left on a blue background",
    "a yellow square moving down on a black background",
    "a green triangle moving right on a white background",
    "a white circle moving up on a gray background",
    "a purple square moving right on a green background",
    "a cyan triangle moving left and a red square moving up on a black background",
]
SEEDS = [0, 1, 2, 3]
BEAM, TOP_K = 2, 2


def strategies(quick: bool) -> dict[str, SearchConfig]:
    stream_t1 = {"strategy": "stream_t1", "beam_size": BEAM, "top_k": TOP_K}
    configs = {
        "none": SearchConfig(strategy="none"),
        f"best_of_n (n={BEAM * TOP_K})": SearchConfig(strategy="best_of_n", num_candidates=BEAM * TOP_K),
        "stream_t1": SearchConfig(**stream_t1),
        "stream_t1 - noise propagation": SearchConfig(**stream_t1, noise_propagation=False),
        "stream_t1 - reward pruning (random)": SearchConfig(**stream_t1, reward_pruning=False),
        "stream_t1 - memory sinking": SearchConfig(**stream_t1, memory_sinking=False),
    }
    if quick:
        return {k: v for k, v in configs.items() if k in ("none", "stream_t1")}
    return configs


def run(engine, configs: dict, prompts: list[str], seeds: list[int], num_chunks: int) -> dict:
    """Mean metrics per strategy; ``reward_delta`` is the paired difference to the first strategy."""
    short, long = ProceduralFrameReward(), ProceduralVideoReward()
    engine.generate(prompts[0], num_chunks=1, seed=0)  # warm-up: first-call costs stay out of the timings
    rows = {}
    for name, cfg in configs.items():
        values = {m: [] for m in METRIC_NAMES}
        values["reward"] = []
        started = time.perf_counter()
        for prompt in prompts:
            for seed in seeds:
                result = engine.generate(prompt, num_chunks=num_chunks, seed=seed, search=cfg,
                                         short_reward=short, long_reward=long)
                frames = result.frames.permute(0, 3, 1, 2).float()[None] / 255.0  # [1, T, 3, H, W]
                for metric, value in video_metrics(frames, prompt).items():
                    values[metric].append(value.item())
                values["reward"].append(long(frames, prompt).item())
        seconds = (time.perf_counter() - started) / (len(prompts) * len(seeds))
        baseline = next(iter(rows.values()))["rewards"] if rows else values["reward"]
        delta = [a - b for a, b in zip(values["reward"], baseline)]
        rows[name] = {"seconds": seconds, "candidates": cfg.first_chunk_candidates,
                      **{k: _mean(v) for k, v in values.items()}, "rewards": values["reward"],
                      "reward_delta": _mean(delta), "reward_delta_sem": _sem(delta)}
        print(f"  {name}: reward {rows[name]['reward']:.3f}, {seconds:.2f} s/video", flush=True)
    return rows


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]  # metrics a prompt does not define are NaN
    return sum(values) / len(values) if values else float("nan")


def _sem(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def table(rows: dict) -> str:
    reward_terms = set(ProceduralVideoReward().terms)
    metric_cols = [m for m in METRIC_NAMES]
    heads = ["strategy", "cand./chunk", "s/video", "reward*", "Δ reward* vs none"] + [
        m + ("*" if m in reward_terms else "") + (" (lower=better)" if m == "flicker" else "") for m in metric_cols]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, r in rows.items():
        cells = [name, str(r["candidates"]), f"{r['seconds']:.2f}", f"{r['reward']:.3f}",
                 f"{r['reward_delta']:+.3f} ± {r['reward_delta_sem']:.3f}"]
        cells += [f"{r[m]:.3f}" for m in metric_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows: dict, args, prompts, seeds, num_chunks: int) -> str:
    version = importlib.metadata.version("streamt1-engine")
    cpu = platform.processor() or platform.machine()
    setup = (f"streamt1-engine {version}, torch {torch.__version__}, Python {platform.python_version()}, "
             f"CPU ({cpu}, {torch.get_num_threads()} threads), float32.  \n"
             f"{len(prompts)} prompts x {len(seeds)} seeds, {num_chunks} chunks ({num_chunks * 3} frames, 32x32) "
             f"per video; Stream-T1 with beam_size {BEAM}, top_k {TOP_K}, other knobs at the paper's defaults.")
    rewards = ("Rewards given to the search: short-term `procedural_frame` (background, colour, shape, crispness "
               "per frame), long-term and final pick `procedural_video` (those plus persistence and smoothness "
               "over the window). Columns marked * are those reward terms (reward* is the `procedural_video` "
               "score of the output; Δ is the paired difference to `none` over the same prompts and seeds, "
               f"± standard error); held-out metrics, never seen by the search: {', '.join(HELD_OUT_TERMS)}. "
               "All metrics are in [0, 1], higher is better, except flicker.")
    command = f"python bench/bench_quality.py --v1{' --quick' if args.quick else ''}"
    return "\n".join([f"# Search quality on the embedded tiny model ({datetime.date.today().isoformat()})", "",
                      f"Command: `{command}`  ", setup, "", rewards, "", table(rows), ""])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", "--tiny", action="store_true", help="seconds-long smoke run (CI)")
    parser.add_argument("--model", default="tiny", help="model source (default: the embedded tiny model)")
    parser.add_argument("--chunks", type=int, default=None, help="chunks per video (default 8, quick 2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default: bench/results/quality-<date>.md; none in quick mode)")
    args = parser.parse_args(argv)
    prompts, seeds = (PROMPTS[:1], SEEDS[:1]) if args.quick else (PROMPTS, SEEDS)
    num_chunks = args.chunks or (2 if args.quick else 8)
    engine = StreamT1Engine.from_pretrained(args.model, device="cpu")
    print(f"model {engine.name}: {len(prompts)} prompts x {len(seeds)} seeds, {num_chunks} chunks", flush=True)
    rows = run(engine, strategies(args.quick), prompts, seeds, num_chunks)
    text = report(rows, args, prompts, seeds, num_chunks)
    print(text)
    out = args.out
    if out is None and not args.quick:
        out = Path(__file__).parent / "results" / f"quality-{datetime.date.today().isoformat()}.md"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
