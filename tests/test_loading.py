import json
import time

import pytest
import torch
from safetensors.torch import save_file

from streamt1_engine.config import WanConfig
from streamt1_engine.errors import StreamT1Error
from streamt1_engine.hub import resolve_model_dir
from streamt1_engine.model.loading import (convert_diffusers_state_dict, infer_wan_config, load_dit, save_dit,
                                           wan_config_from_diffusers, wan_config_from_original)
from streamt1_engine.model.wan import CausalWanDiT, ChunkAttention

N = 2
TIMESTEPS = torch.tensor([900.0, 300.0])
CFG = WanConfig.tiny()  # dim 64, 4 heads, 2 layers, 4 channels, text 32 x 16 tokens


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every parameter so that a wrong mapping cannot hide behind default init values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def tiny_model(seed: int = 0) -> CausalWanDiT:
    return randomize(CausalWanDiT(CFG), seed)


def inputs(cfg: WanConfig, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(N, cfg.in_channels, 3, 4, 6, generator=gen)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    return latents, text


@torch.no_grad()
def run(model: CausalWanDiT, seed: int = 1) -> torch.Tensor:
    latents, text = inputs(model.config, seed)
    return model(latents, TIMESTEPS, model.encode_text(text), ChunkAttention.dense(N, "cpu"))


def prefixed(sd: dict, prefix: str = "model.") -> dict:
    return {prefix + k: v.clone() for k, v in sd.items()}


def original_config_json(cfg: WanConfig) -> dict:
    return {"_class_name": "WanModel", "model_type": "t2v", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "in_dim": cfg.in_channels,
            "out_dim": cfg.out_channels, "text_dim": cfg.text_dim, "text_len": cfg.text_len,
            "freq_dim": cfg.freq_dim, "eps": cfg.eps}


# ------------------------------------------------------------------------------------------ diffusers

@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                                  text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2)
    randomize(model, seed=3)
    root = tmp_path_factory.mktemp("pipeline")
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root, model


def test_diffusers_transformer_matches_diffusers_forward(diffusers_dir):
    root, reference = diffusers_dir
    model = load_dit(root / "transformer")
    cfg = model.config
    assert (cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.num_layers, cfg.text_dim, cfg.freq_dim) == (48, 2, 64, 2, 16, 32)
    latents, text = inputs(cfg)
    ours = run(model)
    with torch.no_grad():
        ref = reference(latents, TIMESTEPS, text.expand(N, -1, -1), return_dict=False)[0]
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_diffusers_pipeline_dir_uses_transformer_subfolder(diffusers_dir):
    root, _ = diffusers_dir
    from_pipeline = load_dit(root)
    direct = load_dit(root / "transformer")
    assert torch.equal(run(from_pipeline), run(direct))


def test_convert_diffusers_names():
    names = {
        "condition_embedder.time_embedder.linear_1.weight": "time_embedding.0.weight",
        "condition_embedder.time_embedder.linear_2.bias": "time_embedding.2.bias",
        "condition_embedder.time_proj.weight": "time_projection.1.weight",
        "condition_embedder.text_embedder.linear_2.weight": "text_embedding.2.weight",
        "blocks.3.attn1.to_out.0.weight": "blocks.3.self_attn.o.weight",
        "blocks.3.attn2.norm_k.weight": "blocks.3.cross_attn.norm_k.weight",
        "blocks.12.norm2.bias": "blocks.12.norm3.bias",
        "blocks.0.ffn.net.0.proj.weight": "blocks.0.ffn.0.weight",
        "blocks.0.ffn.net.2.bias": "blocks.0.ffn.2.bias",
        "blocks.7.scale_shift_table": "blocks.7.modulation",
        "proj_out.weight": "head.head.weight",
        "scale_shift_table": "head.modulation",
    }
    converted = convert_diffusers_state_dict({k: torch.zeros(1) for k in names})
    assert sorted(converted) == sorted(names.values())


def test_diffusers_config_rejects_image_to_video():
    config = {"_class_name": "WanTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 24,
              "image_dim": 1280}
    with pytest.raises(StreamT1Error, match="image_dim"):
        wan_config_from_diffusers(config)


# ------------------------------------------------------------------------------------------ original Wan

def test_original_wan_dir_sharded(tmp_path):
    source = tiny_model()
    sd = source.state_dict()
    names = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(tmp_path / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(original_config_json(CFG)))
    model = load_dit(tmp_path)
    assert model.config == CFG
    assert torch.equal(run(model), run(source))


def test_original_config_rejects_i2v():
    with pytest.raises(StreamT1Error, match="t2v"):
        wan_config_from_original({**original_config_json(CFG), "model_type": "i2v"})


def test_streamt1_roundtrip(tmp_path):
    source = tiny_model()
    save_dit(source, tmp_path / "ours")
    model = load_dit(tmp_path / "ours")
    assert model.config == CFG
    assert torch.equal(run(model), run(source))
    assert not any(p.requires_grad for p in model.parameters())
    half = load_dit(tmp_path / "ours", dtype=torch.bfloat16)
    assert half.head.head.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ Self-Forcing

def test_self_forcing_checkpoint_prefers_ema(tmp_path):
    ema, plain = tiny_model(seed=0), tiny_model(seed=1)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": prefixed(plain.state_dict()), "generator_ema": prefixed(ema.state_dict()),
                "step": 600}, path)
    # The test config's text_len (16) is not in the weights: pass the config, as a user would.
    from_ema = load_dit(path, config=CFG)
    from_plain = load_dit(path, config=CFG, use_ema=False)
    assert torch.equal(run(from_ema), run(ema))
    assert torch.equal(run(from_plain), run(plain))
    assert not torch.equal(run(from_ema), run(from_plain))


def test_bare_prefixed_state_dict_and_shape_inference(tmp_path):
    source = tiny_model()
    path = tmp_path / "causvid.pt"
    torch.save(prefixed(source.state_dict()), path)
    model = load_dit(path)
    assert model.config == WanConfig.tiny(num_heads=1, text_len=512)  # dim 64 -> one 64-channel head
    assert torch.equal(model.blocks[1].ffn[2].weight, source.blocks[1].ffn[2].weight)


def test_infer_num_heads():
    sd = CausalWanDiT(WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=1, text_dim=32),
                      max_frames=8).state_dict()
    assert infer_wan_config(sd).num_heads == 2  # 128-channel heads
    assert infer_wan_config(sd, num_heads=4).num_heads == 4
    assert infer_wan_config(sd).num_layers == 1


# ------------------------------------------------------------------------------------------ LongLive LoRA

LORA_TARGETS = [f"blocks.{i}.{name}" for i in range(CFG.num_layers)
                for name in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                             "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]


def lora_factors(model: CausalWanDiT, rank: int = 4, seed: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    factors = {}
    for target in LORA_TARGETS:
        out_features, in_features = modules[target].weight.shape
        factors[target] = (torch.randn(rank, in_features, generator=gen) * 0.1,
                           torch.randn(out_features, rank, generator=gen) * 0.1)
    return factors


def test_longlive_lora_merge(tmp_path):
    base = tiny_model()
    base_path = tmp_path / "longlive_base.pt"
    torch.save({"generator": prefixed(base.state_dict())}, base_path)
    factors = lora_factors(base)
    peft_sd = {}
    for target, (a, b) in factors.items():
        peft_sd[f"base_model.model.{target}.lora_A.weight"] = a
        peft_sd[f"base_model.model.{target}.lora_B.weight"] = b
    lora_path = tmp_path / "lora.pt"
    torch.save({"generator_lora": peft_sd, "critic_lora": {}, "step": 1000}, lora_path)

    merged = load_dit(base_path, config=CFG, lora=str(lora_path), lora_alpha=8)
    expected = {k: v.clone() for k, v in base.state_dict().items()}
    for target, (a, b) in factors.items():
        expected[f"{target}.weight"] += (8 / 4) * (b @ a)
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.allclose(run(merged), run(base), atol=1e-3)


DIFFUSERS_LINEAR_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                          "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                          "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                          "ffn.2": "ffn.net.2"}


def test_lora_key_variants_and_default_alpha(tmp_path):
    base = tiny_model()
    base_path = tmp_path / "base.pt"
    torch.save({"generator_ema": prefixed(base.state_dict())}, base_path)
    factors = lora_factors(base)
    variant = {}
    for target, (a, b) in factors.items():
        _, block, linear = target.split(".", 2)
        if block == "0":  # diffusers LoRA naming
            name = f"transformer.blocks.0.{DIFFUSERS_LINEAR_NAMES[linear]}"
            variant[f"{name}.lora_A.weight"], variant[f"{name}.lora_B.weight"] = a, b
        else:  # a full peft state dict: adapter name kept, no wrapper dict
            variant[f"base_model.model.{target}.lora_A.default.weight"] = a
            variant[f"base_model.model.{target}.lora_B.default.weight"] = b
    lora_path = tmp_path / "adapter.pt"
    torch.save(variant, lora_path)
    merged = load_dit(base_path, config=CFG, lora=str(lora_path))  # no alpha anywhere: alpha = rank, scale 1
    for target in ("blocks.0.self_attn.o", "blocks.0.ffn.0", "blocks.1.ffn.0", "blocks.1.cross_attn.k"):
        a, b = factors[target]
        module = merged.get_submodule(target)
        torch.testing.assert_close(module.weight, base.get_submodule(target).weight + b @ a, rtol=1e-6, atol=1e-6)


def test_lora_on_non_linear_is_refused(tmp_path):
    base = tiny_model()
    base_path = tmp_path / "base.pt"
    torch.save({"generator": prefixed(base.state_dict())}, base_path)
    lora_path = tmp_path / "bad_lora.pt"
    torch.save({"generator_lora": {"base_model.model.blocks.0.norm3.lora_A.weight": torch.zeros(4, 64),
                                   "base_model.model.blocks.0.norm3.lora_B.weight": torch.zeros(64, 4)}}, lora_path)
    with pytest.raises(StreamT1Error, match=r"blocks\.0\.norm3.*not a linear"):
        load_dit(base_path, config=CFG, lora=str(lora_path))


# ------------------------------------------------------------------------------------------ errors

def test_missing_key_is_named(tmp_path):
    sd = tiny_model().state_dict()
    del sd["blocks.1.ffn.2.bias"]
    save_file(sd, str(tmp_path / "dit.safetensors"))
    (tmp_path / "dit_config.json").write_text(json.dumps(CFG.to_dict()))
    with pytest.raises(StreamT1Error, match=r"1 missing key \(blocks\.1\.ffn\.2\.bias\)"):
        load_dit(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    sd = prefixed(tiny_model().state_dict())
    sd["model.blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    torch.save({"generator": sd}, tmp_path / "ckpt.pt")
    with pytest.raises(StreamT1Error, match=r"unexpected key \(blocks\.0\.self_attn\.extra\.weight\)") as info:
        load_dit(tmp_path / "ckpt.pt", config=CFG)
    assert "\n" not in str(info.value)


def test_shape_mismatch_is_named(tmp_path):
    sd = tiny_model().state_dict()
    sd["blocks.1.ffn.0.weight"] = torch.zeros(CFG.ffn_dim + 1, CFG.dim)
    save_file(sd, str(tmp_path / "weights.safetensors"))
    with pytest.raises(StreamT1Error, match=r"blocks\.1\.ffn\.0\.weight.*\(129, 64\).*\(128, 64\)"):
        load_dit(tmp_path / "weights.safetensors", config=CFG)


UNPICKLED = []


def record_unpickle():
    UNPICKLED.append(True)
    return "executed"


class Payload:
    def __reduce__(self):
        return record_unpickle, ()


def test_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"generator": prefixed(tiny_model().state_dict()), "payload": Payload()}, path)
    with pytest.raises(StreamT1Error, match="weights_only"):
        load_dit(path, config=CFG)
    assert not UNPICKLED


def test_lora_file_given_as_source(tmp_path):
    torch.save({"generator_lora": {"base_model.model.blocks.0.ffn.0.lora_A.weight": torch.zeros(2, 64)}},
               tmp_path / "lora.pt")
    with pytest.raises(StreamT1Error, match="lora="):
        load_dit(tmp_path / "lora.pt")


# ------------------------------------------------------------------------------------------ hub

def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    for call in (lambda: resolve_model_dir("streamt1-test-org/no-such-model"),
                 lambda: load_dit("streamt1-test-org/no-such-model")):
        with pytest.raises(StreamT1Error, match="cannot load 'streamt1-test-org/no-such-model'") as info:
            call()
        assert "\n" not in str(info.value)
    assert time.monotonic() - start < 10


def test_missing_local_path(tmp_path):
    with pytest.raises(StreamT1Error, match="no such file or directory"):
        load_dit(str(tmp_path / "nothing" / "here"))
    with pytest.raises(StreamT1Error, match="no such file or directory"):
        resolve_model_dir("./no/such/model.pt")


def test_lora_scale_is_alpha_over_rank_as_peft():
    from streamt1_engine.lora import lora_scale

    assert lora_scale(None, 128) == 1.0  # LongLive: alpha = rank when its config gives none
    assert lora_scale(256, 128) == 2.0 and lora_scale(64.0, 128) == 0.5
    assert lora_scale(32, 16, rslora=True) == pytest.approx(32 / 4)  # rsLoRA: alpha / sqrt(rank)
    for bad in (0, -1.0, float("nan"), "8"):
        with pytest.raises(StreamT1Error, match="alpha"):
            lora_scale(bad, 4)


def longlive_lora_file(path, model: CausalWanDiT, targets, rank: int, seed: int = 3) -> dict:
    """A LongLive LoRA file (``generator_lora`` peft state dict, no alpha stored) for ``targets`` of ``model``."""
    gen = torch.Generator().manual_seed(seed)
    factors, peft_sd = {}, {}
    for target in targets:
        out_features, in_features = model.get_submodule(target).weight.shape
        a, b = torch.randn(rank, in_features, generator=gen) * 0.1, torch.randn(out_features, rank, generator=gen) * 0.1
        factors[target] = (a, b)
        peft_sd[f"base_model.model.{target}.lora_A.weight"] = a
        peft_sd[f"base_model.model.{target}.lora_B.weight"] = b
    torch.save({"generator_lora": peft_sd, "critic_lora": {}, "step": 10}, path)
    return factors


def test_from_pretrained_and_cli_pass_lora_alpha_to_the_merge(tmp_path, monkeypatch):
    """A LoRA trained with alpha != rank: merged weight = W + (alpha / rank) * B @ A, through the public API; the
    CLI's --lora-alpha reaches from_pretrained."""
    from streamt1_engine import StreamT1Engine, cli

    base = StreamT1Engine.from_pretrained("tiny").model
    targets = ["blocks.0.ffn.0", "blocks.1.self_attn.q"]
    lora_path = tmp_path / "lora.pt"
    factors = longlive_lora_file(lora_path, base, targets, rank=4)
    merged = StreamT1Engine.from_pretrained("tiny", lora=str(lora_path), lora_alpha=12).model
    for target, (a, b) in factors.items():
        expected = base.get_submodule(target).weight + (12 / 4) * (b @ a)
        torch.testing.assert_close(merged.get_submodule(target).weight, expected, rtol=1e-6, atol=1e-6)
    untouched = "blocks.0.ffn.2"
    torch.testing.assert_close(merged.get_submodule(untouched).weight, base.get_submodule(untouched).weight)

    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs, source=source)
        raise StreamT1Error("stop here")

    monkeypatch.setattr(StreamT1Engine, "from_pretrained", fake_from_pretrained)
    args = ["generate", "a cat", "-o", str(tmp_path / "o.mp4"), "--lora", str(lora_path)]
    assert cli.main(args + ["--lora-alpha", "256"]) == 2
    assert seen["lora"] == str(lora_path) and seen["lora_alpha"] == 256.0
    assert cli.main(args) == 2 and seen["lora_alpha"] is None  # default: the file's alpha, else the rank
