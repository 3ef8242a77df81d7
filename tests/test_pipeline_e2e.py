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
