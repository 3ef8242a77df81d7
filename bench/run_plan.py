#!/usr/bin/env python
"""The GPU run's plan from the steps' own estimates, and partial result tables, for bench/gpu_run.sh.

    run_plan.py fixed STEP            estimate line of a step that is not a bench script (env, gpu_tests)
    run_plan.py table PLAN LIMIT_S    markdown table of PLAN (lines "STEP TIMEOUT_S {estimate json}") and the
                                      total; exit 1 when the total exceeds LIMIT_S or a step's estimate does
                                      not fit its timeout
    run_plan.py partial ROWS.jsonl    markdown table of the rows a step wrote before it ended

No torch import: it runs in a fraction of a second, also where the bench scripts cannot start.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from report_tables import markdown_table  # bench/ is the script's folder: first on sys.path

# Steps with no FLOP count of their own: assumed seconds and why.
FIXED = {
    "env": (20.0, "nvidia-smi, the carried wheels' offline install, version report"),
    "gpu_tests": (60.0, "pytest -m gpu: tiny models, so Triton compilation (autotuning off) dominates; assumed"),
    "vae": (0.0, "skipped: no diffusers"),
}


def fixed(step: str) -> None:
    if step not in FIXED:
        raise SystemExit(f"run_plan.py: no fixed estimate for {step!r} (known: {', '.join(FIXED)})")
    seconds, why = FIXED[step]
    print("estimate " + json.dumps(dict(step=step, pflop=0.0, vae_pflop=0.0, overhead_s=seconds, seconds=seconds,
                                        detail=why)))


def read_plan(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        step, timeout, body = line.split(" ", 2)
        row = json.loads(body)
        row.update(step=step, timeout_s=int(timeout))
        rows.append(row)
    return rows


def table(path: Path, limit_s: float) -> int:
    rows = read_plan(path)
    assumed = next((r for r in rows if "assumed_tflops" in r), {})
    lines = ["## Plan: estimated H100 seconds per step (from FLOP counts)", "",
             f"Assumed: {assumed.get('assumed_tflops', '?')} TFLOP/s for the DiT (H100 SXM dense bf16 spec peak "
             f"989: ~40% realistic), {assumed.get('assumed_vae_tflops', '?')} TFLOP/s for the VAE's 3-D "
             "convolutions, plus per-step overhead (process start, random weights, Triton compile/autotune, "
             "graph capture).", "",
             "| step | PFLOP | VAE PFLOP | overhead s | estimated s | timeout s | what |",
             "|---|---|---|---|---|---|---|"]
    total, bad = 0.0, []
    for r in rows:
        seconds = r.get("seconds")
        if seconds is None:
            bad.append(f"{r['step']}: no estimate")
            lines.append(f"| {r['step']} | - | - | - | - | {r['timeout_s']} | no estimate |")
            continue
        total += seconds
        if seconds >= r["timeout_s"]:
            bad.append(f"{r['step']}: {seconds} s >= its {r['timeout_s']} s timeout")
        lines.append(f"| {r['step']} | {r['pflop']} | {r['vae_pflop']} | {r['overhead_s']} | {seconds} | "
                     f"{r['timeout_s']} | {r.get('detail', '')} |")
    if total > limit_s:
        bad.append(f"total {total:.0f} s > {limit_s:g} s")
    verdict = ": FITS" if not bad else ": DOES NOT FIT (" + "; ".join(bad) + ")"
    lines += ["", f"Estimated total: {total:.0f} s of at most {limit_s:g} s{verdict}"]
    print("\n".join(lines))
    return 1 if bad else 0


def partial(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    name = path.name.removesuffix(".rows.jsonl")
    print(f"## {name}: partial ({len(rows)} rows written before the step ended; no report)\n")
    print(markdown_table(rows, list(dict.fromkeys(k for row in rows for k in row))), end="")


def main(argv: list[str]) -> int:
    usage = "usage: run_plan.py fixed STEP | table PLAN LIMIT_S | partial ROWS.jsonl"
    if len(argv) == 2 and argv[0] == "fixed":
        fixed(argv[1])
        return 0
    if len(argv) == 3 and argv[0] == "table":
        return table(Path(argv[1]), float(argv[2]))
    if len(argv) == 2 and argv[0] == "partial":
        partial(Path(argv[1]))
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
