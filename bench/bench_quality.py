"""Quality bench v2: what each search strategy and each Stream-T1 unit does to the embedded tiny model's videos.

    python bench/bench_quality.py --workers 2     # 12 prompts x 4 seeds x 12 chunks, one process per core
    python bench/bench_quality.py --tiny          # seconds: CI smoke run (2 prompts, 2 seeds, 3 chunks)
    python bench/bench_quality.py --v1 [--quick]  # the first bench (bench/results/quality-2026-11-24.md)

Prompts are the held-out scenes of ``tiny.procedural.HELD_OUT_SCENES`` (kept out of the v2 training data;
the v1 weights saw every scene) and none of the v1 bench's; seeds are none of v1's either (both asserted).
Videos are judged by ``bench_quality_metrics`` (signed speed along the prompt, chunk seams, square fill,
spurious blobs), which no reward computes. The search gets the procedural rewards (short-term
``procedural_frame``, long-term ``procedural_video``); one extra row adds the motion verifier to the
long-term reward (``procedural_video_motion``, the v2 weights' own), and there signed speed is no longer
held out.
``best_of_n`` draws beam_size x top_k candidates per chunk, as Stream-T1 does: equal compute. Each
difference is paired (same prompt and seed) with a 95 % bootstrap interval that resamples prompts.
APPEND and EMA are shares of the survivor routings after chunk 0 (chunk 0 has nothing to route).
Results (markdown, per-video JSON, one frame strip per prompt for the first two) go to bench/results/.

``--prompt-set training`` scores scenes of the training distribution instead (single objects, none held
out, seeds from 5000): a validation set for choices made while training, kept apart from the held-out
prompts that judge the result. ``--sampler-shift`` runs the model with another timestep shift.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import multiprocessing
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality_metrics as qm  # noqa: E402

from streamt1_engine.engine import StreamT1Engine  # noqa: E402
from streamt1_engine.search.config import SearchConfig  # noqa: E402
from streamt1_engine.tiny.procedural import (  # noqa: E402
    DIRECTIONS,
    HELD_OUT_PROMPTS,
    PALETTE,
    SHAPES,
    ObjectSpec,
    SceneSpec,
    is_held_out,
    parse_prompt,
)
from streamt1_engine.tiny.rewards import ProceduralFrameReward, ProceduralVideoReward, video_motion_reward  # noqa: E402

PROMPTS = list(HELD_OUT_PROMPTS)
SEEDS = [1000, 1001, 1002, 1003]
V1_PROMPTS = [  # bench_quality_v1.PROMPTS, repeated here so that v2 does not import v1
    "a red circle moving left on a blue background",
    "a yellow square moving down on a black background",
    "a green triangle moving right on a white background",
    "a white circle moving up on a gray background",
    "a purple square moving right on a green background",
    "a cyan triangle moving left and a red square moving up on a black background",
]
V1_SEEDS = [0, 1, 2, 3]
TRAINING_SEEDS = [5000, 5001, 5002, 5003]


def training_prompts(count: int, seed: int = 7) -> list[str]:
    """``count`` single-object prompts of the training distribution (none held out, none of v1's), the
    shapes in turn; the same list for the same arguments."""
    rng = random.Random(seed)
    colours, prompts = list(PALETTE), []
    while len(prompts) < count:
        colour, background, direction = rng.choice(colours), rng.choice(colours), rng.choice(list(DIRECTIONS))
        shape = SHAPES[len(prompts) % len(SHAPES)]
        prompt = f"a {colour} {shape} moving {direction} on a {background} background"
        if colour != background and not is_held_out_prompt(prompt) and prompt not in V1_PROMPTS + prompts:
            prompts.append(prompt)
    return prompts


BEAM, TOP_K = 2, 2
FULL = "stream_t1"
STRIP_PROMPTS = 2  # prompts whose frames the bench saves as a picture
UNITS = {"noise propagation": "noise_propagation", "reward pruning": "reward_pruning",
         "memory sinking": "memory_sinking"}


def check_disjoint(prompts, seeds) -> None:
    """The bench's prompts are held out of v2 training and are not v1's; its seeds are not v1's."""
    assert not set(prompts) & set(V1_PROMPTS), "v2 prompts overlap the v1 bench"
    assert not set(seeds) & set(V1_SEEDS), "v2 seeds overlap the v1 bench"
    for prompt in prompts:
        assert is_held_out_prompt(prompt), f"{prompt!r} is not held out of training"


def is_held_out_prompt(prompt: str) -> bool:
    """Some object the prompt names is one of the scenes kept out of v2 training."""
    spec = parse_prompt(prompt)
    # only what the prompt names matters to is_held_out; size, place and speed are placeholders
    return is_held_out(SceneSpec(spec.background, [ObjectSpec(c, s, d, 5.0, (16.0, 16.0), 1.5, 10 ** 6)
                                                   for c, s, d in spec.objects]))


def methods(search_overrides: dict, names=None) -> dict[str, tuple[SearchConfig, str]]:
    """name -> (search config, long-term reward); ablations switch off one Stream-T1 unit each."""
    full = {"strategy": "stream_t1", "beam_size": BEAM, "top_k": TOP_K, **search_overrides}
    rows = {
        "none": (SearchConfig(strategy="none"), "video"),
        f"best_of_n (n={BEAM * TOP_K})": (SearchConfig(strategy="best_of_n", num_candidates=BEAM * TOP_K), "video"),
        FULL: (SearchConfig(**full), "video"),
        **{f"{FULL} - {unit}": (SearchConfig(**{**full, field: False}), "video") for unit, field in UNITS.items()},
        f"{FULL} + motion reward": (SearchConfig(**full), "video_motion"),
    }
    if names:
        unknown = set(names) - set(rows)
        assert not unknown, f"unknown methods {sorted(unknown)}; known: {list(rows)}"
        rows = {k: v for k, v in rows.items() if k in names}
    return rows


def comparisons(names) -> list[tuple[str, str]]:
    """(a, b) pairs whose paired difference a - b is reported: each method against plain generation,
    Stream-T1 against best-of-N, and the full search against each of its ablations (what the unit adds)."""
    best = next((n for n in names if n.startswith("best_of_n")), None)
    pairs = [(n, "none") for n in names if n != "none" and "none" in names]
    if best and FULL in names:
        pairs.append((FULL, best))
    pairs += [(FULL, n) for n in names if n.startswith(f"{FULL} - ") and FULL in names]
    return pairs


_WORKER: dict = {}  # this process's engine and rewards (one per worker process)


def load_engine(model: str, sampler_shift: float | None = None) -> StreamT1Engine:
    """The model on the CPU, its sampler's timestep shift replaced by ``sampler_shift`` if given."""
    engine = StreamT1Engine.from_pretrained(model, device="cpu")
    if sampler_shift is None:
        return engine
    sampler = dataclasses.replace(engine.config.sampler, shift=sampler_shift)
    return StreamT1Engine.from_pretrained(model, device="cpu", sampler=sampler)


def _setup(model: str, threads: int, sampler_shift: float | None = None) -> None:
    torch.set_num_threads(threads)
    engine = load_engine(model, sampler_shift)
    engine.generate(PROMPTS[0], num_chunks=1, seed=0)  # warm-up: first-call costs stay out of the timings
    _WORKER.update(engine=engine, short=ProceduralFrameReward(),
                   long={"video": ProceduralVideoReward(), "video_motion": video_motion_reward()})


def _score(job: tuple) -> dict:
    cfg, long_name, prompt, seed, num_chunks, keep_frames = job
    engine = _WORKER["engine"]
    started = time.perf_counter()
    result = engine.generate(prompt, num_chunks=num_chunks, seed=seed, search=cfg, short_reward=_WORKER["short"],
                             long_reward=_WORKER["long"][long_name])
    seconds = time.perf_counter() - started
    video = result.frames.permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
    flags = [f for c in result.chunks[1:] for f in c.route_flags]  # chunk 0 has nothing to route
    record = {"prompt": prompt, "seed": seed, **qm.video_scores(video, prompt, engine.config.stream.chunk_frames),
              "append": flags.count("APPEND"), "ema": flags.count("EMA"), "routes": len(flags)}
    return {"record": record, "seconds": seconds, "frames": result.frames if keep_frames else None}


def score_videos(model: str, jobs: list[tuple], workers: int = 1, threads: int = 1,
                 sampler_shift: float | None = None) -> list[dict]:
    """Generate and score each job ``(search, long reward name, prompt, seed, chunks, keep frames)``, in order.
    With ``workers`` > 1 the jobs spread over that many processes, one engine each: a video's frames depend
    only on its own job, so the records are those of one process."""
    if workers <= 1 or len(jobs) <= 1:
        _setup(model, threads, sampler_shift)
        return [_score(job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # no fork of a process whose torch has started threads
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context, initializer=_setup,
                             initargs=(model, threads, sampler_shift)) as pool:
        return list(pool.map(_score, jobs))


def run(model: str, table: dict, prompts, seeds, num_chunks: int, strip_dir: Path | None = None,
        workers: int = 1, threads: int = 1, sampler_shift: float | None = None) -> dict:
    """Per method: one record per (prompt, seed) with the metrics, route counts (after chunk 0) and seconds."""
    keys = [(name, prompt, seed) for name in table for prompt in prompts for seed in seeds]
    jobs = [(*table[name], prompt, seed, num_chunks, seed == seeds[0] and prompt in prompts[:STRIP_PROMPTS])
            for name, prompt, seed in keys]
    scored = score_videos(model, jobs, workers, threads, sampler_shift)
    by_method: dict[str, list[dict]] = {name: [] for name in table}
    strips: dict[str, list] = {}
    for (name, prompt, _), s in zip(keys, scored):
        by_method[name].append(s)
        if s["frames"] is not None:
            strips.setdefault(prompt, []).append(s["frames"])
    out = {}
    for name, mine in by_method.items():
        seconds = sum(s["seconds"] for s in mine) / len(mine)
        out[name] = {"seconds": seconds, "candidates": table[name][0].first_chunk_candidates,
                     "records": [s["record"] for s in mine]}
        print(f"  {name}: {seconds:.2f} s/video", flush=True)
    if strip_dir is not None:
        save_strips(strip_dir, strips)
    return out


def save_strips(strip_dir: Path, strips: dict) -> None:
    """One PNG per prompt: every frame of the first seed's video, one row per method (in table order)."""
    from PIL import Image

    strip_dir.mkdir(parents=True, exist_ok=True)
    for i, videos in enumerate(strips.values()):
        rows = [torch.cat(list(frames), dim=1) for frames in videos]  # [H, T*W, 3] per method
        Image.fromarray(torch.cat(rows, dim=0).numpy()).save(strip_dir / f"prompt-{i}.png")


def composite(record: dict) -> float:
    """One number per video in [0, 1] (mean of the defined terms): speed along the prompt against the
    ground truth's 1.5 px/frame, closeness of the seam ratio to 1, square fill, no spurious blobs."""
    terms = [min(max(record["signed_speed"] / 1.5, 0.0), 1.0) if not math.isnan(record["signed_speed"]) else None,
             max(0.0, 1.0 - abs(record["seam_ratio"] - 1.0)) if not math.isnan(record["seam_ratio"]) else None,
             record["square_fill"] if not math.isnan(record["square_fill"]) else None,
             math.exp(-record["spurious_blobs"])]
    terms = [t for t in terms if t is not None]
    return sum(terms) / len(terms)


def summarise(results: dict, resamples: int = 2000) -> dict:
    """Means per method and metric, and paired bootstrap intervals of the comparisons."""
    metrics = qm.METRICS + ("composite",)
    for rows in results.values():
        for r in rows["records"]:
            r["composite"] = composite(r)
    means = {}
    for name, rows in results.items():
        recs = rows["records"]
        means[name] = {m: _nanmean([r[m] for r in recs]) for m in metrics}
        routes = sum(r["routes"] for r in recs)
        means[name]["append_share"] = sum(r["append"] for r in recs) / routes if routes else 0.0
        means[name]["ema_share"] = sum(r["ema"] for r in recs) / routes if routes else 0.0
    deltas = {}
    for a, b in comparisons(list(results)):
        per_metric = {}
        for m in metrics:
            by_prompt: dict[str, list[float]] = {}
            for ra, rb in zip(results[a]["records"], results[b]["records"]):
                assert (ra["prompt"], ra["seed"]) == (rb["prompt"], rb["seed"])
                by_prompt.setdefault(ra["prompt"], []).append(ra[m] - rb[m])
            per_metric[m] = qm.paired_bootstrap(by_prompt, resamples=resamples, seed=0)
        deltas[f"{a} vs {b}"] = per_metric
    return {"means": means, "deltas": deltas}


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def tables(results: dict, summary: dict) -> str:
    metrics = qm.METRICS + ("composite",)
    arrow = {m: "↑" if qm.HIGHER_IS_BETTER.get(m, True) else "↓" for m in metrics}
    arrow["seam_ratio"] = "→1"
    heads = ["method", "cand./chunk", "s/video"] + [f"{m} {arrow[m]}" for m in metrics] + ["APPEND", "EMA"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, mean in summary["means"].items():
        cells = [name, str(results[name]["candidates"]), f"{results[name]['seconds']:.2f}"]
        cells += [f"{mean[m]:.3f}" for m in metrics]
        cells += [f"{mean['append_share']:.0%}", f"{mean['ema_share']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (a - b, same prompts and seeds), mean [95 % interval, prompts resampled]; "
              "** where the interval excludes 0:", ""]
    heads = ["a vs b"] + list(metrics)
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for pair, per_metric in summary["deltas"].items():
        cells = [pair]
        for m in metrics:
            mean, low, high = per_metric[m]
            mark = "**" if low > 0 or high < 0 else ""
            cells.append(f"{mark}{mean:+.3f} [{low:+.3f}, {high:+.3f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results, summary, args, prompts, seeds, num_chunks) -> str:
    version = importlib.metadata.version("streamt1-engine")
    cpu = platform.processor() or platform.machine()
    training = training_record(args.model)
    setup = (f"Date {datetime.date.today().isoformat()}; streamt1-engine {version}, torch {torch.__version__}, "
             f"Python {platform.python_version()}, CPU ({cpu}, {args.workers} process(es) x {args.threads} thread(s)), "
             "float32.  \n"
             f"Model `{args.model}`{sampler_note(args.sampler_shift)}; {args.prompt_set} prompt set, "
             f"{len(prompts)} prompts x {len(seeds)} seeds (seeds {seeds[0]}..{seeds[-1]}), "
             f"{num_chunks} chunks per video; Stream-T1 beam_size {BEAM}, top_k {TOP_K}, "
             f"search overrides {overrides(args) or 'none (paper defaults)'}.")
    command = "python bench/bench_quality.py " + " ".join(args.argv)
    parts = [f"# Quality bench v2 ({datetime.date.today().isoformat()})", "", f"Command: `{command.strip()}`  ", setup]
    if training:
        parts += ["", f"Training record of the weights: `{json.dumps(training)}`"]
    return "\n".join(parts + ["", tables(results, summary), ""])


def training_record(source: str) -> dict | None:
    """The ``training`` entry of the model dir's streamt1.json (the embedded weights for "tiny")."""
    from streamt1_engine.tiny.model import ASSET_DIR

    path = ASSET_DIR if source == "tiny" else Path(source)
    config = path / "streamt1.json"
    return json.loads(config.read_text()).get("training") if config.is_file() else None


def sampler_note(shift: float | None) -> str:
    return "" if shift is None else f" run with sampler shift {shift:g}"


def overrides(args) -> dict:
    return {k: v for k, v in (("short_threshold", args.short_threshold), ("long_threshold", args.long_threshold),
                              ("ema_alpha", args.ema_alpha)) if v is not None}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--v1" in argv:
        import bench_quality_v1

        return bench_quality_v1.main([a for a in argv if a != "--v1"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", "--quick", action="store_true", help="seconds-long smoke run (CI)")
    parser.add_argument("--model", default="tiny", help="model source (default: the embedded tiny model)")
    parser.add_argument("--prompt-set", choices=("held-out", "training"), default="held-out",
                        help="the held-out scenes (default) or scenes of the training distribution (validation)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="first N prompts (default 12, tiny 2; training set: 48)")
    parser.add_argument("--seeds", type=int, default=None, help="first N seeds (default 4, tiny 2; training set: 1)")
    parser.add_argument("--sampler-shift", type=float, default=None,
                        help="run the model with this timestep shift (default: its own)")
    parser.add_argument("--chunks", type=int, default=None, help="chunks per video (default 12, tiny 3)")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the method names")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a tiny model gains nothing from more, and a busy CPU loses)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes generating videos at once (e.g. one per core); the records do not change")
    parser.add_argument("--short-threshold", type=float, default=None)
    parser.add_argument("--long-threshold", type=float, default=None)
    parser.add_argument("--ema-alpha", type=float, default=None)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write quality-v2-<date>.md/.json and frame strips here (default bench/results; "
                             "none with --tiny)")
    parser.add_argument("--name", default=None, help="file stem (default quality-v2-<date>)")
    args = parser.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    if args.sampler_shift is not None and not args.sampler_shift > 0:
        parser.error(f"--sampler-shift must be > 0, got {args.sampler_shift}")
    if args.prompt_set == "training":
        prompts = training_prompts(args.prompts or (2 if args.tiny else 48))
        seeds = TRAINING_SEEDS[:args.seeds or 1]
    else:
        prompts = PROMPTS[:args.prompts or (2 if args.tiny else len(PROMPTS))]
        seeds = SEEDS[:args.seeds or (2 if args.tiny else len(SEEDS))]
        check_disjoint(prompts, seeds)
    num_chunks = args.chunks or (3 if args.tiny else 12)
    names = args.methods or (["none", f"best_of_n (n={BEAM * TOP_K})", FULL] if args.tiny else None)
    table = methods(overrides(args), names)
    out_dir = args.out_dir if args.out_dir is not None or args.tiny else Path(__file__).parent / "results"
    stem = args.name or f"quality-v2-{datetime.date.today().isoformat()}"
    print(f"model {args.model}: {len(prompts)} prompts x {len(seeds)} seeds, {num_chunks} chunks, "
          f"{args.workers} worker(s)", flush=True)
    results = run(args.model, table, prompts, seeds, num_chunks, out_dir / f"{stem}-strips" if out_dir else None,
                  args.workers, args.threads, args.sampler_shift)
    summary = summarise(results, args.resamples)
    text = report(results, summary, args, prompts, seeds, num_chunks)
    print(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.md").write_text(text)
        (out_dir / f"{stem}.json").write_text(json.dumps({"command": "python bench/bench_quality.py " + " ".join(argv),
                                                          "results": results, "summary": summary}, indent=1) + "\n")
        print(f"wrote {out_dir / stem}.md/.json")
    return {"results": results, "summary": summary}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
