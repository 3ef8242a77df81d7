"""On a fixed prompt set, the shipped weights must beat the weights shipped before v2 on signed speed,
seam ratio and square fill, as measured by the quality bench's own code (plain generation, no search).

The previous figures are the ``none`` row of bench/results/quality-v2-2026-12-01-previous-weights.json
(the same prompts, seed and chunks as below), measured on the weights shipped before v2.
"""
import importlib.util
import json
from pathlib import Path

from streamt1_engine.tiny.model import ASSET_DIR

BENCH = Path(__file__).resolve().parent.parent / "bench"
PREVIOUS = {"signed_speed": -0.2574900984764099, "seam_ratio": 1.2068304816881816, "square_fill": 0.5616660714149475}
ARGS = ["--tiny", "--prompts", "12", "--seeds", "1", "--chunks", "4", "--methods", "none"]


def test_shipped_weights_beat_the_previous_weights():
    training = json.loads((ASSET_DIR / "streamt1.json").read_text()).get("training", {})
    assert "clip_chunks" in json.dumps(training), "the shipped weights are not the v2 weights"
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    means = bench.main(ARGS)["summary"]["means"]["none"]
    assert means["signed_speed"] > PREVIOUS["signed_speed"]
    assert abs(means["seam_ratio"] - 1) < abs(PREVIOUS["seam_ratio"] - 1)
    assert means["square_fill"] > PREVIOUS["square_fill"]
