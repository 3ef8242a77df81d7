"""An upstream inference YAML (the layout of Stream-T1's stream_scaling.yaml) means the same as the flags."""
import warnings

import pytest

from streamt1_engine import StreamConfig, StreamT1Engine
from streamt1_engine.cli import parse_args, search_config, stream_options
from streamt1_engine.config import SamplerConfig
from streamt1_engine.errors import StreamT1Error
from streamt1_engine.search.config import SearchConfig
from streamt1_engine.upstream_config import load_upstream_config
from test_pipeline_e2e import pipeline_dir, torch_checkpoints  # noqa: F401  (fixtures)

# Same structure as a Stream-T1 scaling config: few-step schedule, model kwargs, run keys, search, LoRA.
SCALING_YAML = """\
denoising_step_list: [1000, 750, 500, 250]
warp_denoising_step: true
num_frame_per_block: 3
model_name: Wan2.1-T2V-1.3B
model_kwargs:
  local_attn_size: 12
  timestep_shift: 5.0
  sink_size: 3
  max_sink_size: 15
data_path: prompts/example.txt
output_folder: videos/
inference_iter: -1
num_output_frames: 30
use_ema: false
seed: 7
beam_size: 3
top_k: 2
sliding_window_size: 6
num_samples: 1
save_with_index: true
global_sink: true
context_noise: 0
generator_ckpt: {base}
lora_ckpt: {lora}
adapter:
  type: lora
  rank: 4
  alpha: 4
  dropout: 0.0
  dtype: bfloat16
  verbose: false
"""


def write(tmp_path, text, name="stream_scaling.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def scaling_yaml(tmp_path, checkpoints, extra=""):
    return write(tmp_path, SCALING_YAML.format(base=checkpoints / "base.pt", lora=checkpoints / "lora.pt") + extra)


def test_yaml_reads_into_engine_terms(tmp_path, torch_checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the structure is known: no warning
        cfg = load_upstream_config(scaling_yaml(tmp_path, torch_checkpoints))
    assert cfg.stream == StreamConfig(num_frame_per_block=3, local_attn_size=12, sink_size=3, max_sink_size=15)
    assert cfg.sampler == SamplerConfig(denoising_steps=(1000, 750, 500, 250), shift=5.0, warp_denoising_steps=True,
                                        context_timestep=0.0)
    assert cfg.search == SearchConfig(strategy="stream_t1", beam_size=3, top_k=2, window_chunks=6)
    assert (cfg.num_chunks, cfg.seed, cfg.lora_rank, cfg.lora_alpha) == (10, 7, 4, 4.0)
    assert cfg.checkpoint.endswith("base.pt") and cfg.lora.endswith("lora.pt")


def test_yaml_gives_the_same_engine_config_as_the_flags(tmp_path, pipeline_dir, torch_checkpoints):  # noqa: F811
    path = scaling_yaml(tmp_path, torch_checkpoints)
    parts = ["--text-encoder", str(pipeline_dir), "--vae", str(pipeline_dir)]
    from_yaml = parse_args(["generate", "a cat", "--config", str(path), *parts])
    from_flags = parse_args(["generate", "a cat", "--model", str(torch_checkpoints / "base.pt"),
                             "--lora", str(torch_checkpoints / "lora.pt"), "--chunks", "10", "--seed", "7",
                             "--search", "stream_t1", "--beam-size", "3", "--top-k", "2", "--window-chunks", "6",
                             "--stream-preset", "stream-t1", *parts])
    assert search_config(from_yaml) == search_config(from_flags)
    for key in ("model", "lora", "chunks", "seed", "text_encoder", "vae"):
        assert getattr(from_yaml, key) == getattr(from_flags, key), key
    engines = [StreamT1Engine.from_pretrained(a.model, text_encoder=a.text_encoder, vae=a.vae, lora=a.lora,
                                              **stream_options(a)) for a in (from_yaml, from_flags)]
    api = load_upstream_config(path)  # the API route: the same engine, and generate() gets chunks, seed, search
    engines.append(StreamT1Engine.from_pretrained(**api.engine_kwargs(text_encoder=str(pipeline_dir),
                                                                      vae=str(pipeline_dir))))
    assert engines[0].config == engines[1].config == engines[2].config
    assert api.generate_kwargs() == dict(num_chunks=10, seed=7, search=search_config(from_flags))
    assert engines[0].config.stream == StreamConfig.preset("stream-t1")
    for p, q in zip(engines[0].model.parameters(), engines[1].model.parameters()):
        assert (p == q).all()  # the same weights, LoRA merged alike


def test_flags_given_explicitly_override_the_yaml(tmp_path, torch_checkpoints):
    path = scaling_yaml(tmp_path, torch_checkpoints)
    args = parse_args(["generate", "a cat", "--config", str(path), "--seed", "3", "--top-k", "1", "--model",
                       "random-tiny", "--stream-preset", "longlive", "--short-history", "window"])
    assert (args.seed, args.top_k, args.model, args.chunks, args.beam_size) == (3, 1, "random-tiny", 10, 3)
    options = stream_options(args)
    assert options["stream_preset"] == "longlive" and "stream" not in options  # the explicit preset wins
    assert search_config(args).short_history == "window"
    assert parse_args(["generate", "a cat"]).seed == 42  # without --config: the built-in defaults


def test_unknown_keys_are_listed_in_one_warning(tmp_path, torch_checkpoints):
    path = scaling_yaml(tmp_path, torch_checkpoints, "fancy_new_knob: 3\nanother: x\n")
    with pytest.warns(UserWarning) as caught:
        load_upstream_config(path)
    assert len(caught) == 1
    assert "another" in str(caught[0].message) and "fancy_new_knob" in str(caught[0].message)


def test_contradictions_are_one_error_naming_each(tmp_path):
    text = """\
denoising_step_list: [1000, 750, 500, 250, 0]
warp_denoising_step: true
num_frame_per_block: 3
model_kwargs: {local_attn_size: 12, sink_size: 12, max_sink_size: 15}
num_output_frames: 20
"""
    with pytest.raises(StreamT1Error) as info:
        load_upstream_config(write(tmp_path, text))
    message = str(info.value)
    assert "num_output_frames (20) is not a multiple of num_frame_per_block (3)" in message
    assert "contains 0 while warp_denoising_step" in message
    assert "sink_size (12) is not smaller than local_attn_size (12)" in message
    glob = "num_frame_per_block: 3\nmodel_kwargs: {local_attn_size: -1}\nnum_output_frames: 30\n"
    with pytest.raises(StreamT1Error, match="exceeds what global attention holds"):
        load_upstream_config(write(tmp_path, glob, "self_forcing.yaml"))
    with pytest.raises(StreamT1Error, match="lora_ckpt without an adapter"):
        load_upstream_config(write(tmp_path, "num_frame_per_block: 3\nlora_ckpt: lora.pt\n", "x.yaml"))
    with pytest.raises(StreamT1Error, match="not valid YAML"):
        load_upstream_config(write(tmp_path, "a: [1, 2\n", "bad.yaml"))


def test_self_forcing_yaml_is_plain_global_streaming(tmp_path):
    text = "denoising_step_list: [1000, 750, 500, 250]\nwarp_denoising_step: true\nnum_frame_per_block: 3\n" \
           "timestep_shift: 5.0\nnum_output_frames: 21\nmodel_kwargs: {timestep_shift: 5.0}\n"
    cfg = load_upstream_config(write(tmp_path, text))
    assert cfg.stream == StreamConfig.preset("self-forcing") and cfg.search.strategy == "none"
    assert cfg.num_chunks == 7 and cfg.checkpoint is None and cfg.lora is None


def test_cli_generates_from_an_upstream_yaml(tmp_path, capsys):
    import json

    from streamt1_engine.cli import main

    text = "denoising_step_list: [1000, 750, 500, 250]\nwarp_denoising_step: true\nnum_frame_per_block: 3\n" \
           "model_kwargs: {local_attn_size: 12, sink_size: 3, max_sink_size: 15, timestep_shift: 5.0}\n" \
           "num_output_frames: 6\nseed: 5\nbeam_size: 2\ntop_k: 1\nsliding_window_size: 2\n"
    out = tmp_path / "v.mp4"
    code = main(["generate", "a red circle", "-o", str(out), "--config", str(write(tmp_path, text)), "--model",
                 "random-tiny", "--stream-preset", "longlive", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["seed"], record["num_chunks"]) == (5, 2)
    assert (record["stream"]["local_attn_size"], record["stream"]["max_sink_size"]) == (12, 3)  # the flag won
    assert (record["search"]["strategy"], record["search"]["beam_size"], record["search"]["top_k"],
            record["search"]["window_chunks"]) == ("stream_t1", 2, 1, 2)
    assert main(["generate", "x", "-o", str(out), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
