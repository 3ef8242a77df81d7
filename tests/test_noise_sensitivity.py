"""bench/noise_sensitivity.py: a chunk's dependence on its initial noise against its re-noise draws."""
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from streamt1_engine.tiny.model import build_tiny_model
from streamt1_engine.tiny.train import pass_through_init

BENCH = Path(__file__).resolve().parent.parent / "bench" / "noise_sensitivity.py"
PROMPTS = ["a red circle moving left on a blue background", "a green square moving up on a black background"]


def _bench():
    spec = importlib.util.spec_from_file_location("noise_sensitivity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_first_step_at_sigma_one_forgets_the_initial_noise_and_a_lower_start_keeps_it():
    torch.set_num_threads(1)
    bench = _bench()
    model = build_tiny_model(seed=0)
    pass_through_init(model.dit)  # flow ~ x_t: the x0 estimate (1 - sigma) x_t is ~0 at sigma 1
    at_one = bench.noise_sensitivity(model, PROMPTS)
    assert at_one["renoise_change"] > 0.01 and at_one["ratio"] < 0.01
    below = dataclasses.replace(model, sampler=dataclasses.replace(
        model.sampler, denoising_steps=(700.0, 500.0, 250.0), warp_denoising_steps=False))
    kept = bench.noise_sensitivity(below, PROMPTS)  # 30 % of the initial noise survives the first step
    assert kept["ratio"] > 0.1 and kept["initial_noise_change"] > 10 * at_one["initial_noise_change"]


def test_the_command_line_runs_each_shift(tmp_path):
    from streamt1_engine.tiny.train import save_model_dir

    save_model_dir(build_tiny_model(seed=0), tmp_path / "m", training={"steps": 0})
    rows = _bench().main(["--model", str(tmp_path / "m"), "--prompts", "1", "--shifts", "5", "1.5"])
    assert [row["shift"] for row in rows] == [5.0, 1.5]
    assert all(row["renoise_change"] > 0 for row in rows)
    with pytest.raises(SystemExit):  # a clear usage error, not a traceback
        _bench().main(["--model", str(tmp_path / "missing")])
