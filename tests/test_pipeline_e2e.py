"""A whole diffusers-format Wan pipeline (tiny, random) loads into the engine and streams a video."""
import json

import pytest
import torch

from streamt1_engine import SearchConfig, StreamConfig, StreamT1Engine, StreamT1Error
from test_text_encoders import tiny_tokenizer, tiny_umt5


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan_pipeline")
    torch.manual_seed(0)
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                          out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2).save_pretrained(
        root / "transformer")
    tiny_umt5().save_pretrained(root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                     latents_std=[1.2, 0.8, 1.0, 1.5]).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def test_pipeline_dir_generates_with_streaming_wan_vae(pipeline_dir):
    stream = StreamConfig.tiny(latent_height=4, latent_width=4)
    engine = StreamT1Engine.from_pretrained(str(pipeline_dir), stream=stream)
    assert engine.config.model.text_dim == 32 and engine.vae.latent_channels == 4
    result = engine.generate("a cat walks on the beach", num_chunks=3, seed=0,
                             search=SearchConfig(strategy="best_of_n", num_candidates=2))
    factor = engine.vae.spatial_factor
    # causal VAE: the first latent frame gives one video frame, every later one gives temporal_factor frames
    tf = engine.vae.temporal_factor
    assert result.frames.shape == (1 + tf * 8, 4 * factor, 4 * factor, 3)
    again = engine.generate("a cat walks on the beach", num_chunks=3, seed=0,
                            search=SearchConfig(strategy="best_of_n", num_candidates=2))
    assert torch.equal(result.frames, again.frames)


def test_bare_checkpoint_needs_text_encoder_and_vae(pipeline_dir):
    with pytest.raises(StreamT1Error, match="text_encoder= and vae="):
        StreamT1Engine.from_pretrained(str(pipeline_dir / "transformer"))
    engine = StreamT1Engine.from_pretrained(str(pipeline_dir / "transformer"), text_encoder=str(pipeline_dir),
                                            vae=str(pipeline_dir), stream=StreamConfig.tiny(latent_height=4,
                                                                                            latent_width=4))
    assert engine.generate("waves crash", num_chunks=1).frames.shape[0] == 1 + 2 * engine.vae.temporal_factor


@pytest.fixture(scope="module")
def torch_checkpoints(tmp_path_factory):
    """A Self-Forcing / CausVid style generator file and a LongLive LoRA for it (tiny, random)."""
    from test_loading import lora_factors, prefixed, tiny_model

    root = tmp_path_factory.mktemp("torch_checkpoints")
    base = tiny_model()
    torch.save({"generator": prefixed(base.state_dict()), "generator_ema": prefixed(base.state_dict())},
               root / "base.pt")
    peft = {}
    for target, (a, b) in lora_factors(base).items():
        peft[f"base_model.model.{target}.lora_A.weight"], peft[f"base_model.model.{target}.lora_B.weight"] = a, b
    torch.save({"generator_lora": peft}, root / "lora.pt")
    return root


def test_stream_preset_follows_the_checkpoint_format(pipeline_dir, torch_checkpoints):
    """Self-Forcing / CausVid files and diffusers folders: global attention over 21 frames; a base file with a
    LoRA (LongLive): local 12 including a sink of 3 that Stream-T1 grows to 15; engine dirs: their own."""
    parts = dict(text_encoder=str(pipeline_dir), vae=str(pipeline_dir))
    cases = [(dict(source=str(pipeline_dir)), "self-forcing"),
             (dict(source=str(pipeline_dir / "transformer"), **parts), "self-forcing"),
             (dict(source=str(torch_checkpoints / "base.pt"), **parts), "self-forcing"),
             (dict(source=str(torch_checkpoints / "base.pt"), lora=str(torch_checkpoints / "lora.pt"), **parts),
              "stream-t1")]
    for kwargs, preset in cases:
        stream = StreamT1Engine.from_pretrained(**kwargs).config.stream
        assert stream == StreamConfig.preset(preset), kwargs
    layouts = {name: StreamConfig.preset(name) for name in ("self-forcing", "longlive", "stream-t1")}
    assert (layouts["self-forcing"].local_attn_size, layouts["self-forcing"].sink_size) == (-1, 0)
    assert (layouts["longlive"].local_attn_size, layouts["longlive"].sink_size,
            layouts["longlive"].max_sink_size) == (12, 3, 3)
    assert (layouts["stream-t1"].local_attn_size, layouts["stream-t1"].max_sink_size) == (12, 15)
    assert StreamConfig.preset("causvid") == layouts["self-forcing"]
    # stream_preset overrides the format's choice and keeps the model's latent size; stream= wins over both
    engine = StreamT1Engine.from_pretrained(str(pipeline_dir), stream_preset="longlive")
    assert engine.config.stream == layouts["longlive"]
    tiny = StreamT1Engine.from_pretrained("random-tiny", stream_preset="longlive").config.stream
    assert tiny == StreamConfig.preset("longlive", latent_height=8, latent_width=8)
    assert StreamT1Engine.from_pretrained("random-tiny").config.stream.local_attn_size == 15
    explicit = StreamConfig.tiny(latent_height=4, latent_width=4)
    engine = StreamT1Engine.from_pretrained(str(pipeline_dir), stream=explicit, stream_preset="longlive")
    assert engine.config.stream == explicit
    with pytest.raises(StreamT1Error, match="unknown stream preset"):
        StreamT1Engine.from_pretrained("random-tiny", stream_preset="longlive-v2")
