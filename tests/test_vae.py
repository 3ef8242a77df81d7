import math

import pytest
import torch

from streamt1_engine.components import VideoVAE
from streamt1_engine.errors import StreamT1Error
from streamt1_engine.vae import SpaceToDepthVAE, WanVAE, build_vae, default_vae_dtype, register_vae, vae_dtype

Z_DIM = 4


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    """A random AutoencoderKLWan saved as a diffusers pipeline dir (weights in vae/)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True],
                             latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.7, 2.0, 1.1])
    root = tmp_path_factory.mktemp("pipeline")
    model.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def wan(tiny_wan_dir):
    return build_vae({"type": "wan", "path": "."}, base_dir=tiny_wan_dir)


def full_decode(vae: WanVAE, latents: torch.Tensor) -> torch.Tensor:
    """Reference: diffusers' one-shot decode of de-normalised latents, as [N, T, 3, H, W] in [0, 1]."""
    z = latents * vae.latents_std + vae.latents_mean
    with torch.no_grad():
        video = vae.model.decode(z).sample
    return ((video + 1) / 2).permute(0, 2, 1, 3, 4)


def stream_decode(vae, latents, chunk=3, state=None):
    frames = []
    for start in range(0, latents.shape[2], chunk):
        out, state = vae.decode_chunk(latents[:, :, start:start + chunk], state)
        frames.append(out)
    return torch.cat(frames, dim=1), state


def test_wan_loads_from_pipeline_dir_and_reports_factors(wan):
    assert isinstance(wan, VideoVAE)
    assert wan.latent_channels == Z_DIM
    assert wan.spatial_factor == 4 and wan.temporal_factor == 2
    assert wan.frames_per_chunk(True, 3) == 5 and wan.frames_per_chunk(False, 3) == 6


def test_streaming_decode_matches_full_decode(wan):
    torch.manual_seed(1)
    latents = torch.randn(2, Z_DIM, 7, 3, 4)
    streamed, _ = stream_decode(wan, latents, chunk=3)
    reference = full_decode(wan, latents)
    assert streamed.shape == (2, 13, 3, 12, 16) == reference.shape
    assert streamed.min() >= 0 and streamed.max() <= 1
    torch.testing.assert_close(streamed, reference, atol=1e-5, rtol=1e-5)
    # The chunk boundaries matter for nothing but the schedule: the first chunk has 1 + 2 * 2 frames.
    first, _ = wan.decode_chunk(latents[:, :, :3], None)
    assert first.shape[1] == wan.frames_per_chunk(True, 3)


def test_streaming_matches_full_decode_for_the_wan22_style_residual_vae():
    """The Wan 2.2 VAE layout: residual up blocks (which use first_chunk) and a 2x2 patchified output."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(5)
    model = AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True], is_residual=True, in_channels=12, out_channels=12,
                             patch_size=2, latents_mean=[0.1] * Z_DIM, latents_std=[2.0] * Z_DIM)
    vae = WanVAE(model)
    assert vae.spatial_factor == 8
    latents = torch.randn(1, Z_DIM, 4, 2, 3)
    streamed, _ = stream_decode(vae, latents, chunk=3)
    assert streamed.shape == (1, 7, 3, 16, 24)
    torch.testing.assert_close(streamed, full_decode(vae, latents), atol=1e-5, rtol=1e-5)


def test_denormalisation_is_applied(wan):
    latents = torch.zeros(1, Z_DIM, 1, 3, 4)
    frames, _ = wan.decode_chunk(latents, None)
    with torch.no_grad():
        raw = ((wan.model.decode(latents).sample + 1) / 2).permute(0, 2, 1, 3, 4)
    assert not torch.allclose(frames, raw, atol=1e-4)
    torch.testing.assert_close(frames, full_decode(wan, latents), atol=1e-5, rtol=1e-5)


def test_forked_state_decodes_each_continuation_like_its_full_sequence(wan):
    torch.manual_seed(2)
    beams = torch.randn(2, Z_DIM, 3, 3, 4)
    _, state = wan.decode_chunk(beams, None)
    parents = torch.tensor([1, 0, 1])
    continuations = torch.randn(3, Z_DIM, 3, 3, 4)
    forked = wan.select_state(state, parents)
    frames, forked_after = wan.decode_chunk(continuations, forked)
    reference = full_decode(wan, torch.cat([beams[parents], continuations], dim=2))[:, 5:]
    torch.testing.assert_close(frames, reference, atol=1e-5, rtol=1e-5)

    # Decoding from the fork left the beams' own state untouched: back from 3 candidates to 2 beams.
    again, _ = wan.decode_chunk(continuations[:2], state)
    torch.testing.assert_close(again, full_decode(wan, torch.cat([beams, continuations[:2]], dim=2))[:, 5:],
                               atol=1e-5, rtol=1e-5)
    survivors = wan.select_state(forked_after, torch.tensor([2, 0]))
    tail = torch.randn(2, Z_DIM, 1, 3, 4)
    last, _ = wan.decode_chunk(tail, survivors)
    history = torch.cat([beams[parents[[2, 0]]], continuations[[2, 0]], tail], dim=2)
    torch.testing.assert_close(last, full_decode(wan, history)[:, 11:], atol=1e-5, rtol=1e-5)


def test_vae_dtype_defaults_to_bf16_on_cuda_as_the_upstream_pipelines():
    assert default_vae_dtype("cuda") == torch.bfloat16 and default_vae_dtype("cpu") == torch.float32
    assert vae_dtype(None, "cuda:1") == vae_dtype("auto", "cuda") == torch.bfloat16
    assert vae_dtype("fp32", "cuda") == vae_dtype("float32", "cuda") == torch.float32
    assert vae_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(StreamT1Error, match="unknown VAE dtype"):
        vae_dtype("int8", "cpu")


def test_bf16_decode_stays_close_to_float32(wan, tiny_wan_dir):
    """The bf16 decoder (a spec's ``dtype``) runs in bf16, keeps its causal state in bf16, returns float32
    frames, and differs from float32 by rounding only (PSNR > 40 dB on random weights)."""
    bf16 = build_vae({"type": "wan", "path": ".", "dtype": "bf16"}, base_dir=tiny_wan_dir)
    assert wan.dtype == torch.float32 and bf16.dtype == torch.bfloat16  # CPU default: float32
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    torch.manual_seed(6)
    latents = torch.randn(2, Z_DIM, 4, 3, 4)
    want, _ = stream_decode(wan, latents)
    got, state = stream_decode(bf16, latents)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert {e.dtype for e in state.cache if isinstance(e, torch.Tensor)} == {torch.bfloat16}
    mse = float((got.double() - want.double()).pow(2).mean())
    assert 0 < mse and 10 * math.log10(1 / mse) > 40


def test_state_batch_mismatch_is_an_error(wan):
    _, state = wan.decode_chunk(torch.randn(2, Z_DIM, 1, 3, 4), None)
    with pytest.raises(StreamT1Error, match="streams"):
        wan.decode_chunk(torch.randn(3, Z_DIM, 1, 3, 4), state)


def test_wan_encode_returns_normalised_latents(wan):
    torch.manual_seed(3)
    video = torch.rand(1, 5, 3, 12, 16)
    latents = wan.encode(video)
    assert latents.shape == (1, Z_DIM, 3, 3, 4)
    with torch.no_grad():
        mean = wan.model.encode(video.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(latents, (mean - wan.latents_mean) / wan.latents_std)
    with pytest.raises(StreamT1Error, match="frames"):
        wan.encode(torch.rand(1, 4, 3, 12, 16))
    with pytest.raises(StreamT1Error, match="divisible"):
        wan.encode(torch.rand(1, 5, 3, 10, 16))


def test_wan_bad_latents_and_missing_dir(wan, tmp_path):
    with pytest.raises(StreamT1Error, match="channels"):
        wan.decode_chunk(torch.randn(1, Z_DIM + 1, 1, 3, 4), None)
    with pytest.raises(StreamT1Error, match="5-D"):
        wan.decode_chunk(torch.randn(Z_DIM, 1, 3, 4), None)
    with pytest.raises(StreamT1Error, match="config.json"):
        build_vae({"type": "wan", "path": str(tmp_path)})
    with pytest.raises(StreamT1Error, match="missing"):
        build_vae({"type": "wan", "path": str(tmp_path / "missing")})


def test_space_to_depth_round_trip():
    vae = build_vae({"type": "space_to_depth", "factor": 2})
    assert isinstance(vae, VideoVAE) and vae.latent_channels == 12 and vae.spatial_factor == 2
    torch.manual_seed(4)
    video = torch.rand(2, 3, 3, 6, 8)
    latents = vae.encode(video)
    assert latents.shape == (2, 12, 3, 3, 4)
    assert latents.min() >= -1 and latents.max() <= 1
    # Each latent channel is one pixel of a 2x2 block, in [-1, 1].
    assert torch.allclose(latents[0, 0, 0], video[0, 0, 0, ::2, ::2] * 2 - 1)
    frames, state = vae.decode_chunk(latents, None)
    assert state is None and vae.frames_per_chunk(True, 3) == 3
    torch.testing.assert_close(frames, video)
    clipped, _ = vae.decode_chunk(latents * 3, None)
    assert clipped.min() >= 0 and clipped.max() <= 1


def test_space_to_depth_bad_sizes():
    vae = SpaceToDepthVAE(4)
    with pytest.raises(StreamT1Error, match="divisible"):
        vae.encode(torch.rand(1, 1, 3, 8, 6))
    with pytest.raises(StreamT1Error, match="channels"):
        vae.decode_chunk(torch.rand(1, 3, 1, 2, 2), None)
    with pytest.raises(StreamT1Error, match="video"):
        vae.encode(torch.rand(1, 1, 4, 8, 8))
    with pytest.raises(StreamT1Error, match="factor"):
        SpaceToDepthVAE(0)


def test_registry():
    with pytest.raises(StreamT1Error, match="unknown VAE type"):
        build_vae({"type": "nope"})
    register_vae("test_identity", lambda spec, base_dir, device, dtype: SpaceToDepthVAE(1))
    assert build_vae({"type": "test_identity"}).latent_channels == 3
