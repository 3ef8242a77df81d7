"""No silent fallback: what a model folder leaves out is an error naming the key, or a warning naming the default
used; integer weights are refused, not cast; a bad file or argument is one line, before any work."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamt1_engine import StreamT1Engine, StreamT1Error
from streamt1_engine.cli import main
from streamt1_engine.config import SamplerConfig, WanConfig
from streamt1_engine.loaders import BUILTIN_DIR
from streamt1_engine.memory import parse_size, size_text
from streamt1_engine.model.loading import load_dit
from streamt1_engine.model.wan import CausalWanDiT

PROMPT = "a red circle moving right on a blue background"


def model_copy(tmp_path: Path, edit=None, edit_weights=None) -> Path:
    """The embedded model's folder, its streamt1.json (and dit.safetensors) changed by ``edit``."""
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN_DIR, folder)
    spec = json.loads((folder / "streamt1.json").read_text())
    if edit is not None:
        edit(spec)
    (folder / "streamt1.json").write_text(json.dumps(spec))
    if edit_weights is not None:
        weights = folder / "dit.safetensors"
        save_file(edit_weights(load_file(str(weights))), str(weights))
    return folder


def load_quietly(folder: Path):
    """(engine, warning messages) of loading ``folder``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = StreamT1Engine.from_pretrained(str(folder), device="cpu")
    return engine, [str(w.message) for w in caught]


def refused(folder: Path, pattern: str) -> str:
    with pytest.raises(StreamT1Error, match=pattern) as info:
        StreamT1Engine.from_pretrained(str(folder), device="cpu")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_folder_without_its_stream_section_is_refused_naming_it(tmp_path):
    """No default frame size fits every VAE: the tiny model would silently run at 416x240."""
    refused(model_copy(tmp_path, lambda s: s.pop("stream")), r"streamt1\.json lacks the 'stream' section")


def test_a_stream_section_without_the_latent_size_is_refused(tmp_path):
    refused(model_copy(tmp_path, lambda s: s["stream"].pop("latent_width")), r"'stream' lacks 'latent_width'")


def test_stream_keys_left_out_take_their_defaults_with_a_warning_naming_them(tmp_path):
    engine, caught = load_quietly(model_copy(tmp_path, lambda s: s["stream"].pop("max_sink_size")))
    assert engine.config.stream.max_sink_size == 15
    assert len(caught) == 1 and "does not set max_sink_size: using the defaults max_sink_size=15" in caught[0]


def test_a_folder_without_a_sampler_section_warns_naming_the_defaults(tmp_path):
    engine, caught = load_quietly(model_copy(tmp_path, lambda s: s.pop("sampler")))
    assert engine.config.sampler == SamplerConfig()
    assert len(caught) == 1
    assert "has no 'sampler' section: using the default sampler (denoising_steps=[1000.0, 750.0, 500.0, 250.0], " \
           "shift=5.0" in caught[0]


def test_sampler_keys_left_out_are_named_with_their_defaults(tmp_path):
    engine, caught = load_quietly(model_copy(tmp_path, lambda s: s["sampler"].pop("shift")))
    assert engine.config.sampler.shift == 5.0
    assert caught == [f"{tmp_path / 'model' / 'streamt1.json'} 'sampler' does not set shift: using the defaults "
                      "shift=5.0"]


def test_the_shipped_model_loads_without_a_warning(tmp_path):
    _, caught = load_quietly(model_copy(tmp_path))
    assert caught == []


@pytest.mark.parametrize("key", ["dim", "num_heads", "text_len"])
def test_a_model_section_without_a_shape_key_is_refused_naming_the_key(tmp_path, key):
    """A missing dim gave a shape mismatch; a missing num_heads or text_len would load wrong heads silently."""
    refused(model_copy(tmp_path, lambda s: s["model"].pop(key)), rf"streamt1\.json 'model' lacks '{key}' \(required: ")


def test_a_dit_config_without_a_shape_key_is_refused(tmp_path):
    cfg = WanConfig.tiny()
    save_file(CausalWanDiT(cfg).state_dict(), str(tmp_path / "dit.safetensors"))
    (tmp_path / "dit_config.json").write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "dim"}))
    with pytest.raises(StreamT1Error, match=r"dit_config\.json lacks 'dim'"):
        load_dit(tmp_path)


def test_integer_weights_are_refused_naming_the_tensor_and_dtype(tmp_path):
    def to_int(state):
        state["blocks.0.ffn.0.bias"] = (state["blocks.0.ffn.0.bias"] * 1000).to(torch.int32)
        return state

    message = refused(model_copy(tmp_path, edit_weights=to_int), r"stores 1 floating-point weight as integers")
    assert "blocks.0.ffn.0.bias (int32)" in message


def test_text_encoder_weights_that_are_not_safetensors_are_one_line(tmp_path):
    folder = model_copy(tmp_path, lambda s: s["text_encoder"].update(weights="text_encoder.pt"))
    torch.save({"token_embedding.weight": torch.zeros(3, 4)}, folder / "text_encoder.pt")
    refused(folder, r"cannot read .*text_encoder\.pt as safetensors \(is it a \.safetensors file\?\)")


def test_the_cli_prints_a_default_warning_as_one_line(tmp_path, capsys):
    folder = model_copy(tmp_path, lambda s: s.pop("sampler"))
    out = tmp_path / "x.mp4"
    assert main(["generate", PROMPT, "-o", str(out), "--model", str(folder), "--chunks", "1", "--no-progress",
                 "--height", "16", "--width", "16"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: ") and "using the default sampler" in err[0], err


# ------------------------------------------------------------------------------------- arguments

@pytest.fixture
def no_model(monkeypatch):
    """Argument errors come before any work: loading a model at all fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(StreamT1Engine, "from_pretrained", refuse)


def last_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_prompt_schedule_line_the_file_lacks_is_refused_before_loading(tmp_path, capsys, no_model):
    schedule = tmp_path / "one.jsonl"
    schedule.write_text(json.dumps({"prompts": ["a red circle", "a blue square"], "switch_chunk_indices": [1]}) + "\n")
    argv = ["generate", "-o", str(tmp_path / "x.mp4"), "--prompt-schedule", str(schedule), "--chunks", "3"]
    assert main(argv + ["--prompt-schedule-line", "99"]) == 2
    assert last_error(capsys) == f"error: prompt schedule {schedule} has 1 line, no line 99"
    assert main(argv + ["--prompt-schedule-line", "-1"]) == 2
    assert "must be a non-negative integer" in last_error(capsys)


def test_a_prompt_that_is_not_text_says_so():
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    for prompt, kind in [(123, "int"), (None, "NoneType"), (["a", "b"], "list")]:
        with pytest.raises(StreamT1Error, match=rf"^prompt must be a string, got {kind}$"):
            engine.generate(prompt, num_chunks=1)


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_port_out_of_range_is_refused_before_loading(capsys, no_model, port):
    assert main(["serve", "--port", port]) == 2
    assert last_error(capsys) == f"error: --port must be in 0..65535, got {port}"


def test_memory_sizes_read_in_a_unit_that_does_not_round_to_zero(tmp_path, capsys):
    assert [size_text(n) for n in (0, 1, 1000, 1024, 1536, 100 * 2**20, 3 * 2**30, 5 * 2**40)] == \
        ["0 bytes", "1 byte", "1000 bytes", "1.00 KiB", "1.50 KiB", "100.00 MiB", "3.00 GiB", "5.00 TiB"]
    assert parse_size("1K") == 1024
    assert main(["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--model", "random-tiny",
                 "--memory-limit", "1K"]) == 2
    line = last_error(capsys)
    assert "exceeds the 1.00 KiB memory limit" in line and "0.00 GiB" not in line, line
