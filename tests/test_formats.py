"""The engine format (one reader, one writer, save_pretrained), the one LoRA merge path, the component registry
and the CLI flags generated from the config dataclasses."""
import copy
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from streamt1_engine import SearchConfig, StreamT1Engine
from streamt1_engine.config import EngineConfig, SamplerConfig, StreamConfig, WanConfig
from streamt1_engine.engine_format import ENGINE_CONFIG_FILE, read_engine_spec
from streamt1_engine.errors import StreamT1Error
from streamt1_engine.lora import merge_lora, parse_lora, peft_base_weights, peft_lora_entries
from streamt1_engine.loaders import BUILTIN_DIR
from streamt1_engine.model.loading import load_dit
from streamt1_engine.model.wan import CausalWanDiT
from streamt1_engine.text_encoders import HashedTextEncoder
from streamt1_engine.vae import SpaceToDepthVAE

PROMPT = "a red circle moving left on a blue background"
SEARCH = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, noise_mode="portable")


def same_output(a: StreamT1Engine, b: StreamT1Engine, chunks: int = 2, search=SEARCH) -> None:
    """Bit-identical frames, latents and search decisions (fp32)."""
    ra = a.generate(PROMPT, num_chunks=chunks, seed=3, search=search)
    rb = b.generate(PROMPT, num_chunks=chunks, seed=3, search=search)
    assert torch.equal(ra.frames, rb.frames) and torch.equal(ra.latents, rb.latents)
    assert [c.to_dict() for c in ra.chunks] == [c.to_dict() for c in rb.chunks]


# --------------------------------------------------------------------------------------------- format

def test_save_pretrained_round_trip_of_the_tiny_model(tmp_path):
    engine = StreamT1Engine.from_pretrained("tiny")
    saved = engine.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == ["dit.safetensors", "streamt1.json", "text_encoder.safetensors"]
    again = StreamT1Engine.from_pretrained(str(saved))
    assert again.config == engine.config and again.fps == engine.fps
    assert again.default_rewards == engine.default_rewards == {"short": "procedural_frame",
                                                               "long": "procedural_video_motion"}
    same_output(engine, again)
    # saving the reloaded engine gives the same files' contents
    twice = again.save_pretrained(tmp_path / "twice")
    assert json.loads((twice / ENGINE_CONFIG_FILE).read_text()) == json.loads((saved / ENGINE_CONFIG_FILE).read_text())


def small_wan_dir(tmp_path, cfg: WanConfig, seed: int = 0):
    """A random DiT in the original Wan layout (config.json + safetensors), larger weights than the init."""
    gen = torch.Generator().manual_seed(seed)
    model = CausalWanDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = tmp_path / "wan"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "in_dim": cfg.in_channels, "out_dim": cfg.out_channels, "text_dim": cfg.text_dim,
        "text_len": cfg.text_len, "freq_dim": cfg.freq_dim, "eps": cfg.eps}))
    return folder, model


def longlive_lora(path, model: nn.Module, targets, rank: int, seed: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    factors, peft_sd = {}, {}
    for target in targets:
        out_features, in_features = model.get_submodule(target).weight.shape
        a = torch.randn(rank, in_features, generator=gen) * 0.2
        b = torch.randn(out_features, rank, generator=gen) * 0.2
        factors[target] = (a, b)
        peft_sd[f"base_model.model.{target}.lora_A.weight"] = a
        peft_sd[f"base_model.model.{target}.lora_B.weight"] = b
    torch.save({"generator_lora": peft_sd, "step": 1}, path)
    return factors


def test_save_pretrained_round_trip_of_a_wan_model_with_a_merged_lora(tmp_path):
    cfg = WanConfig.tiny(in_channels=48, out_channels=48)
    wan_dir, base = small_wan_dir(tmp_path, cfg)
    targets = ["blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.cross_attn.o"]
    factors = longlive_lora(tmp_path / "lora.pt", base, targets, rank=4)
    model = load_dit(wan_dir, lora=str(tmp_path / "lora.pt"), lora_alpha=6, use_ema=False)
    for target, (a, b) in factors.items():  # the DiT's merge: W + (alpha / r) B A
        expected = base.get_submodule(target).weight + (6 / 4) * (b @ a)
        torch.testing.assert_close(model.get_submodule(target).weight, expected, rtol=1e-6, atol=1e-6)
    stream = StreamConfig(num_frame_per_block=3, local_attn_size=12, sink_size=3, max_sink_size=6,
                          latent_height=4, latent_width=4)
    engine = StreamT1Engine(model, HashedTextEncoder(cfg.text_dim, cfg.text_len, seed=2), SpaceToDepthVAE(4),
                            EngineConfig(cfg, stream, SamplerConfig(shift=3.0)), fps=12, name="wan-lora",
                            default_rewards={"short": "sharpness_exposure", "long": "motion_smoothness"})
    saved = engine.save_pretrained(tmp_path / "saved")
    again = StreamT1Engine.from_pretrained(str(saved))
    assert again.name == "wan-lora" and again.fps == 12 and again.config == engine.config
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    same_output(engine, again, chunks=3)


def test_trainer_output_round_trips_through_save_pretrained(tmp_path):
    from streamt1_engine.tiny import build_tiny_model, load_tiny_model
    from streamt1_engine.tiny.train import save_model_dir

    save_model_dir(build_tiny_model(seed=0), tmp_path / "trained", training={"steps": 0})
    trained = StreamT1Engine.from_pretrained(str(tmp_path / "trained"))
    assert read_engine_spec(tmp_path / "trained").training == {"steps": 0}
    resaved = StreamT1Engine.from_pretrained(str(trained.save_pretrained(tmp_path / "resaved")))
    same_output(trained, resaved, search=SearchConfig(strategy="none"))
    assert load_tiny_model(tmp_path / "resaved").dit.config == load_tiny_model(tmp_path / "trained").dit.config


def copy_builtin(tmp_path, edit) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN_DIR, folder)
    spec = json.loads((folder / ENGINE_CONFIG_FILE).read_text())
    edit(spec)
    (folder / ENGINE_CONFIG_FILE).write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(extra=1), r"streamt1\.json has unknown keys \['extra'\]"),
    (lambda s: s["model"].update(depth=3), r"streamt1\.json 'model' has unknown keys \['depth'\]"),
    (lambda s: s["sampler"].update(shift="5"), r"streamt1\.json 'sampler'.*SamplerConfig\.shift must be a number"),
    (lambda s: s["stream"].update(sink_size=True), r"streamt1\.json 'stream'.*sink_size must be an integer"),
    (lambda s: s.update(fps=0), r"streamt1\.json 'fps' must be a positive integer"),
    (lambda s: s.update(rewards={"shrot": "x"}), r"streamt1\.json 'rewards' has unknown keys \['shrot'\]"),
    (lambda s: s.update(version=2), r"streamt1\.json 'version'"),
    (lambda s: s.update(vae="space_to_depth"), r"streamt1\.json 'vae' must be an object with a 'type'"),
    (lambda s: s.pop("text_encoder"), r"lacks the 'text_encoder' section"),
    (lambda s: s.update(weights="../dit.safetensors"), r"'weights' must be a file inside the folder"),
])
def test_reading_is_strict_and_names_the_file_and_key(tmp_path, edit, message):
    folder = copy_builtin(tmp_path, edit)
    with pytest.raises(StreamT1Error, match=message):
        read_engine_spec(folder)
    with pytest.raises(StreamT1Error, match=message):  # every reader goes through it: the engine and the trainer's
        StreamT1Engine.from_pretrained(str(folder))
    from streamt1_engine.tiny import load_tiny_model

    with pytest.raises(StreamT1Error, match=message):
        load_tiny_model(folder)


def test_old_stream_keys_still_load_with_one_warning(tmp_path):
    def old_keys(spec):
        spec["stream"] = {"chunk_frames": 3, "window_frames": 12, "sink_frames": 3, "max_sink_frames": 9,
                          "latent_height": 8, "latent_width": 8}

    folder = copy_builtin(tmp_path, old_keys)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = read_engine_spec(folder).stream
    assert [str(w.message) for w in caught if "old keys" in str(w.message)] and len(caught) == 1
    assert (stream.local_attn_size, stream.sink_size, stream.max_sink_size) == (15, 3, 9)


def test_invalid_json_names_the_file(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN_DIR, folder)
    (folder / ENGINE_CONFIG_FILE).write_text("{not json")
    with pytest.raises(StreamT1Error, match=r"streamt1\.json is not valid JSON"):
        read_engine_spec(folder)


def test_save_pretrained_refuses_what_it_cannot_write(tmp_path):
    engine = StreamT1Engine.from_pretrained("random-tiny")
    engine.default_rewards = {"short": lambda frames, prompt: frames.mean()}
    with pytest.raises(StreamT1Error, match="not plain JSON"):
        engine.save_pretrained(tmp_path / "a")
    engine.default_rewards = {}
    engine.vae = type("OpaqueVAE", (), {"latent_channels": 48, "spatial_factor": 4})()
    with pytest.raises(StreamT1Error, match=r"cannot save the VAE \(OpaqueVAE\)"):
        engine.save_pretrained(tmp_path / "b")


# --------------------------------------------------------------------------------------------- LoRA

class RewardShaped(nn.Module):
    """The module names of a Qwen2-VL reward model's language part (q/k/v/o, MLP) and its score head."""

    def __init__(self, dim: int = 16, hidden: int = 24, layers: int = 2):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, nn.Linear(dim, dim, bias=name != "o_proj"))
            layer.mlp = nn.Module()
            layer.mlp.up_proj, layer.mlp.down_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)
            layer.input_layernorm = nn.LayerNorm(dim)
            self.model.layers.append(layer)
        self.rm_head = nn.Linear(dim, 3, bias=False)


def peft_checkpoint(model: nn.Module, targets, rank: int, seed: int = 0):
    """A peft-wrapped model's full state dict (``base_layer``, adapter name ``default``) and its factors."""
    gen = torch.Generator().manual_seed(seed)
    state, factors = {}, {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in targets:
            state[f"base_model.model.{module}.base_layer.{key.rsplit('.', 1)[1]}"] = value.clone()
            if key.endswith(".weight"):
                a = torch.randn(rank, value.shape[1], generator=gen)
                b = torch.randn(value.shape[0], rank, generator=gen)
                factors[module] = (a, b)
                state[f"base_model.model.{module}.lora_A.default.weight"] = a
                state[f"base_model.model.{module}.lora_B.default.weight"] = b
        else:
            state[f"base_model.model.{key}"] = value.clone()
    return state, factors


@pytest.mark.parametrize("rslora", [False, True])
def test_one_merge_for_a_reward_shaped_module_and_its_state_dict(rslora):
    from streamt1_engine.rewards.models import _merge_lora

    torch.manual_seed(0)
    base = RewardShaped()
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    checkpoint, factors = peft_checkpoint(base, targets, rank=4)
    alpha, rank = 32.0, 4
    scale = alpha / (math.sqrt(rank) if rslora else rank)

    module = RewardShaped()
    module.load_state_dict(peft_base_weights(checkpoint))
    merged = merge_lora(module, peft_lora_entries(checkpoint), alpha=alpha, rslora=rslora, rank=rank)
    assert sorted(merged) == sorted(targets)
    for name, weight in base.state_dict().items():
        target = name.rsplit(".", 1)[0]
        expected = weight + scale * factors[target][1] @ factors[target][0] if name.endswith("weight") and \
            target in factors else weight
        torch.testing.assert_close(module.state_dict()[name], expected, rtol=1e-6, atol=1e-6, msg=name)
    # VideoAlign's loader merges the same checkpoint through the same function (on its state dict)
    state = _merge_lora(checkpoint, {"lora_r": rank, "lora_alpha": alpha, "use_rslora": rslora}, "test")
    assert state.keys() == module.state_dict().keys()
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_lora_alpha_precedence_and_kohya_names():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(6, 5))
    w = module[0].weight.detach().clone()
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    lora = {"0.lora_down.weight": a, "0.lora_up.weight": b, "0.alpha": torch.tensor(4.0)}
    merge_lora(module, lora)  # the per-module alpha: 4 / 2
    torch.testing.assert_close(module[0].weight, w + 2.0 * b @ a)
    merge_lora(module, lora, alpha=1.0)  # the caller's alpha wins: + 1 / 2
    torch.testing.assert_close(module[0].weight, w + 2.5 * b @ a)


@pytest.mark.parametrize("lora, message", [
    ({"0.lora_A.weight": torch.zeros(2, 6), "0.lora_B.weight": torch.zeros(5, 2), "0.bias": torch.zeros(5)},
     r"unsupported entry '0\.bias'"),
    ({"1.lora_A.weight": torch.zeros(2, 6), "1.lora_B.weight": torch.zeros(5, 2)}, r"target '1' is not a linear"),
    ({"0.lora_A.weight": torch.zeros(2, 6)}, r"'0' has only lora_A"),
    ({"0.lora_A.weight": torch.zeros(2, 7), "0.lora_B.weight": torch.zeros(5, 2)}, r"do not fit its weight"),
    ({"0.lora_A.a.weight": torch.zeros(2, 6), "0.lora_B.b.weight": torch.zeros(5, 2)}, r"mixes several adapters"),
    ({}, r"is empty"),
])
def test_bad_lora_entries_are_named(lora, message):
    with pytest.raises(StreamT1Error, match=message):
        merge_lora(nn.Sequential(nn.Linear(6, 5)), lora)


def test_lora_rank_must_match_the_config():
    with pytest.raises(StreamT1Error, match="has rank 2, its config says r=4"):
        merge_lora(nn.Sequential(nn.Linear(6, 5)), {"0.lora_A.weight": torch.zeros(2, 6),
                                                    "0.lora_B.weight": torch.zeros(5, 2)}, rank=4)


def test_parse_lora_keeps_targets_and_alphas():
    factors = parse_lora({"x.y.lora_A.weight": torch.zeros(3, 4), "x.y.lora_B.weight": torch.zeros(2, 3),
                          "x.y.alpha": torch.tensor(6.0)})
    assert list(factors.pairs) == ["x.y"] and factors.alphas == {"x.y": 6.0}


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_peft(rslora):
    peft = pytest.importorskip("peft")  # third-party: only where it is installed
    torch.manual_seed(2)
    base = RewardShaped()
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], use_rslora=rslora,
                             init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(base), config)  # random A and B (init_lora_weights=False)
    lora = {k: v for k, v in wrapped.state_dict().items() if "lora_" in k}
    assert len(lora) == 2 * 2 * 2  # q_proj and down_proj of both layers
    ours = RewardShaped()
    ours.load_state_dict(base.state_dict())
    merge_lora(ours, peft_lora_entries(lora), alpha=12, rslora=rslora, rank=4)
    theirs = wrapped.merge_and_unload()
    for name, tensor in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------- registry

def test_one_unknown_name_message_for_every_registry():
    from streamt1_engine.rewards import build_reward
    from streamt1_engine.text_encoders import build_text_encoder
    from streamt1_engine.vae import build_vae

    for build, kind in ((lambda: build_text_encoder({"type": "bert"}), "text encoder"),
                        (lambda: build_vae({"type": "bert"}), "VAE"), (lambda: build_reward("bert"), "reward")):
        with pytest.raises(StreamT1Error, match=rf"^unknown {kind} type 'bert' \(known: [a-z_0-9]+(, [a-z_0-9]+)*\)$"):
            build()


def test_third_party_components_load_from_an_engine_folder(tmp_path):
    """Registered types are built from streamt1.json like the built-in ones, and saved back by save_pretrained."""
    from streamt1_engine.text_encoders import TEXT_ENCODERS, register_text_encoder
    from streamt1_engine.vae import VAES, register_vae

    class ScaledHashed(HashedTextEncoder):
        def save_pretrained(self, directory):
            return {"type": "scaled_hashed", "text_dim": self.text_dim, "text_len": self.text_len}

        def encode(self, prompts):
            return 2 * super().encode(prompts)

    register_text_encoder("scaled_hashed", lambda spec, base_dir, device, dtype:
                          ScaledHashed(spec["text_dim"], spec["text_len"], device=device, dtype=dtype))
    register_vae("my_vae", lambda spec, base_dir, device, dtype: SpaceToDepthVAE(spec["factor"], device=device))
    try:
        engine = StreamT1Engine.from_pretrained("random-tiny")
        engine.text_encoder = ScaledHashed(32, 16)
        engine.save_pretrained(tmp_path / "m")
        spec = json.loads((tmp_path / "m" / ENGINE_CONFIG_FILE).read_text())
        spec["vae"] = {"type": "my_vae", "factor": 4}
        (tmp_path / "m" / ENGINE_CONFIG_FILE).write_text(json.dumps(spec))
        again = StreamT1Engine.from_pretrained(str(tmp_path / "m"))
        assert type(again.text_encoder) is ScaledHashed and isinstance(again.vae, SpaceToDepthVAE)
        same_output(engine, again, search=SearchConfig(strategy="none"))
    finally:
        TEXT_ENCODERS.pop("scaled_hashed")
        VAES.pop("my_vae")
    assert "scaled_hashed" not in TEXT_ENCODERS


def test_built_in_names_cannot_be_replaced_or_removed():
    from streamt1_engine.registry import Registry
    from streamt1_engine.rewards import register_reward
    from streamt1_engine.vae import VAES, register_vae

    with pytest.raises(StreamT1Error, match="cannot register a VAE type under the name 'wan'"):
        register_vae("wan", lambda *a: None)
    with pytest.raises(StreamT1Error, match="cannot unregister the built-in VAE type 'wan'"):
        VAES.pop("wan")
    with pytest.raises(StreamT1Error, match="cannot register a reward type"):
        register_reward("Motion_Smoothness", lambda frames, prompt: frames.mean())
    lazy = Registry("thing")
    loads = []
    lazy.register_lazy("late", lambda: loads.append(1) or (lambda: "built"))
    assert loads == [] and lazy.get("late")() == "built" and lazy.get("late")() == "built" and loads == [1]


# --------------------------------------------------------------------------------------------- CLI flags

def parse(*flags):
    from streamt1_engine.cli import build_parser

    return build_parser().parse_args(["generate", "a prompt", *flags])


def test_every_search_field_has_a_flag_with_its_help_choices_and_default():
    import dataclasses

    from streamt1_engine.cli import build_parser
    from streamt1_engine.flags import field_flags
    from streamt1_engine.search.config import NOISE_MODES, REWARD_FRAMES, SHORT_HISTORIES, STRATEGIES

    flags = {item.field: item for item in field_flags(SearchConfig)}
    assert set(flags) == {f.name for f in dataclasses.fields(SearchConfig)}
    actions = {a.option_strings[0]: a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
               if a.option_strings}
    for f in dataclasses.fields(SearchConfig):
        action = actions[flags[f.name].option]
        assert action.help.startswith(f.metadata["flag"].help)
    assert [actions[o].choices for o in ("--search", "--short-history", "--noise-mode", "--reward-frames")] == \
        [STRATEGIES, SHORT_HISTORIES, NOISE_MODES, REWARD_FRAMES]
    assert actions["--beam-size"].default == SearchConfig().beam_size and actions["--search"].default == "none"


def test_the_flags_parse_back_to_the_dataclass():
    from streamt1_engine.cli import search_config
    from streamt1_engine.flags import args_for_config

    assert search_config(parse()) == SearchConfig(strategy="none")  # the CLI's one default of its own
    configs = [SearchConfig(), SearchConfig(strategy="best_of_n", num_candidates=7, reward_pruning=False),
               SearchConfig(beam_size=3, top_k=4, window_chunks=5, noise_sigma=0.25, short_threshold=-0.5,
                            long_threshold=0.75, fusion_cap=0.1, ema_alpha=0.5, noise_propagation=False,
                            memory_sinking=False, short_history="window", noise_mode="portable",
                            reward_frames="streamed")]
    for config in configs:
        assert search_config(parse(*args_for_config(SearchConfig, config))) == config


def test_existing_flag_spellings_still_parse():
    from streamt1_engine.cli import search_config

    got = search_config(parse("--search", "stream_t1", "--beam-size", "3", "--top-k", "1", "--no-noise-propagation",
                              "--no-reward-pruning", "--no-memory-sinking", "--short-threshold", "0.1",
                              "--noise-mode", "portable"))
    assert got == SearchConfig(beam_size=3, top_k=1, noise_propagation=False, reward_pruning=False,
                               memory_sinking=False, short_threshold=0.1, noise_mode="portable")
    with pytest.raises(SystemExit):
        parse("--noise-mode", "random")


def test_preset_and_flag_defaults_come_from_the_same_fields():
    from streamt1_engine.cli import build_parser, parse_args, search_config
    from streamt1_engine.flags import flag_defaults
    from streamt1_engine.presets import run_preset

    preset = run_preset("stream-t1-paper")
    assert search_config(parse_args(["generate", "p", "--preset", "stream-t1-paper"])) == preset.search
    ablated = SearchConfig(memory_sinking=False, noise_mode="portable")
    assert flag_defaults(SearchConfig, ablated)["no_memory_sinking"] is True
    assert search_config(build_parser(flag_defaults(SearchConfig, ablated)).parse_args(["generate", "p"])) == ablated
