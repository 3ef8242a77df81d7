"""The embedded tiny model: its shapes, loading the shipped weights, and a reference dense sampler.

The dense sampler runs the same semantics as the engine (block-causal chunks, clean context at timestep
0, warped few-step flow matching with re-noising) with plain masked attention; it is what training,
tests and the quality checks use independently of the engine's paged cache.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SamplerConfig, StreamConfig, WanConfig
from ..errors import require
from ..model.wan import CausalWanDiT, ChunkAttention
from ..sampler import ChunkNoise, denoise_chunk, make_schedule
from .text_encoder import TinyTextEncoder, load_tiny_text_encoder

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
FRAME_SIZE = 32
VAE_FACTOR = 4
FPS = 8


def tiny_wan_config(dim: int = 256, ffn_dim: int = 512, num_heads: int = 4, num_layers: int = 3,
                    vae_factor: int = VAE_FACTOR) -> WanConfig:
    """The shipped shapes by default; wider/deeper or other VAE factors for training experiments."""
    channels = 3 * vae_factor * vae_factor
    return WanConfig(dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, in_channels=channels,
                     out_channels=channels, text_dim=64, text_len=16, freq_dim=64)


def tiny_stream_config(frame_size: int = FRAME_SIZE, vae_factor: int = VAE_FACTOR) -> StreamConfig:
    require(frame_size % (2 * vae_factor) == 0, f"frame size {frame_size} must be a multiple of 2 x {vae_factor}")
    latent = frame_size // vae_factor
    # 3 sink + 9 cached + own 3 frames: the extent the shipped weights were trained and evaluated with
    return StreamConfig(num_frame_per_block=3, local_attn_size=15, sink_size=3, max_sink_size=9,
                        latent_height=latent, latent_width=latent)


def tiny_sampler_config() -> SamplerConfig:
    return SamplerConfig(denoising_steps=(1000.0, 750.0, 500.0, 250.0), shift=5.0)


def inference_timesteps(sampler: SamplerConfig) -> list[float]:
    """The model timesteps the engine's few-step sampler uses (e.g. 1000, 937.5, 833.3, 625)."""
    return list(make_schedule(sampler).timesteps)


def space_to_depth_vae(factor: int = VAE_FACTOR, device="cpu"):
    from ..vae import SpaceToDepthVAE

    return SpaceToDepthVAE(factor, device=device)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """latents [B, C, F, h, w] -> frames [B, F, 3, H, W] in [0, 1] (a space-to-depth VAE has no state)."""
    frames, _ = vae.decode_chunk(latents, None)
    return frames


def teacher_forcing_mask(num_frames: int, chunk_frames: int, frame_tokens: int, device=None,
                         window_chunks: int | None = None) -> torch.Tensor:
    """bool [2L, 2L] over [clean frames | noisy frames]: clean frames attend block-causally among clean
    frames; each noisy chunk attends to the clean chunks before it and to itself. With ``window_chunks``
    a chunk sees only the first chunk (the sink) and the ``window_chunks`` chunks before it, as at
    inference (clips longer than the window)."""
    chunk = torch.arange(num_frames, device=device) // chunk_frames
    clean_clean = chunk[None, :] <= chunk[:, None]
    noisy_clean = chunk[None, :] < chunk[:, None]
    if window_chunks is not None:
        seen = (chunk[None, :] == 0) | (chunk[None, :] >= chunk[:, None] - window_chunks)
        clean_clean, noisy_clean = clean_clean & seen, noisy_clean & seen
    noisy_noisy = chunk[None, :] == chunk[:, None]
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], dim=1)
    bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
    frames = torch.cat([top, bottom], dim=0)
    return frames.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)


@dataclass
class TinyModel:
    dit: CausalWanDiT
    text_encoder: TinyTextEncoder
    vae: object
    stream: StreamConfig
    sampler: SamplerConfig
    config: dict

    @property
    def frame_tokens(self) -> int:
        ph, pw = self.dit.config.patch_size[1:]
        return (self.stream.latent_height // ph) * (self.stream.latent_width // pw)


def build_tiny_model(dit_config: WanConfig | None = None, text_config: dict | None = None, seed: int | None = None,
                     frame_size: int = FRAME_SIZE):
    """A randomly initialised model of the shipped shapes (training start, and the tests' baseline); the
    VAE factor follows the DiT's channels (3 x factor^2)."""
    if seed is not None:
        torch.manual_seed(seed)
    dit_config = dit_config or tiny_wan_config()
    factor = round((dit_config.in_channels / 3) ** 0.5)
    require(3 * factor * factor == dit_config.in_channels, "a tiny DiT has 3 x factor^2 input channels")
    dit = CausalWanDiT(dit_config)
    text_encoder = TinyTextEncoder(**(text_config or {}))
    return TinyModel(dit, text_encoder, space_to_depth_vae(factor), tiny_stream_config(frame_size, factor),
                     tiny_sampler_config(), {})


def load_tiny_model(path: str | os.PathLike | None = None, device="cpu", dtype=torch.float32) -> TinyModel:
    """Load an engine-format model dir written by ``tiny.train`` (default: the weights shipped inside the
    package)."""
    from safetensors.torch import load_file

    from ..engine_format import read_engine_spec

    path = Path(path) if path is not None else ASSET_DIR
    spec = read_engine_spec(path)
    require(spec.text_encoder["type"] == "tiny" and spec.vae["type"] == "space_to_depth",
            f"{path} is not a tiny model: its text encoder is {spec.text_encoder['type']!r}, its VAE "
            f"{spec.vae['type']!r}")
    dit = CausalWanDiT(spec.model)
    weights = path / spec.weights
    require(weights.is_file(), f"DiT weights not found: {weights}")
    missing, unexpected = dit.load_state_dict(load_file(str(weights)), strict=False)
    require(not missing and not unexpected,
            f"{weights} does not match the config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    dit = dit.to(device=device, dtype=dtype).eval()
    text_encoder = load_tiny_text_encoder(spec.text_encoder, path, device, dtype)
    return TinyModel(dit, text_encoder, space_to_depth_vae(spec.vae.get("factor", VAE_FACTOR), device),
                     spec.stream, spec.sampler, spec.to_dict())


@torch.no_grad()
def sample_video(model: TinyModel, prompts: list[str], num_chunks: int = 4, seed: int = 0,
                 steps: list[float] | None = None, return_latents: bool = False) -> torch.Tensor:
    """Generate videos chunk by chunk with dense masked attention; frames [B, T, 3, H, W] in [0, 1].

    Every chunk attends to the first chunk (the sink) and the chunks of the local window at their true
    frame positions, and is denoised by the warped few-step schedule with fresh noise between steps.
    """
    dit, stream = model.dit, model.stream
    device = dit.patch_embedding.weight.device
    dtype = dit.patch_embedding.weight.dtype
    b, c = len(prompts), dit.config.in_channels
    cf, h, w = stream.chunk_frames, stream.latent_height, stream.latent_width
    sampler = model.sampler if steps is None else \
        dataclasses.replace(model.sampler, denoising_steps=tuple(steps), warp_denoising_steps=False)
    schedule = make_schedule(sampler)
    text = dit.encode_text(model.text_encoder.encode(prompts).to(device, dtype))
    gen = torch.Generator().manual_seed(seed)
    window_chunks = stream.window_pages
    chunks: list[torch.Tensor] = []
    for k in range(num_chunks):
        context_ids = sorted(set(range(max(0, k - window_chunks), k)) | ({0} if k > 0 else set()))
        context = [chunks[i] for i in context_ids]
        positions = [i * cf + j for i in context_ids for j in range(cf)] + [k * cf + j for j in range(cf)]
        # the initial noise, then one draw per re-noise
        draws = [torch.randn(b, c, cf, h, w, generator=gen) for _ in range(schedule.num_steps)]
        noise = ChunkNoise(draws[0].to(device, dtype), torch.stack(draws[1:]).to(device, dtype))

        def dense_flow(x, t, text_ctx, attn, context=context, positions=positions):
            return dense_chunk_flow(dit, context, x, float(t[0]), text_ctx, positions, model.frame_tokens)

        chunks.append(denoise_chunk(dense_flow, schedule, noise, text, None).to(dtype))
    latents = torch.cat(chunks, dim=2)
    return latents if return_latents else decode_latents(model.vae, latents.float())


def dense_chunk_flow(dit, context, x, t, text, positions, frame_tokens):
    """One dense forward of [context chunks at timestep 0 | noisy chunk at t]; flow of the noisy chunk."""
    b, cf = x.shape[0], x.shape[2]
    inp = torch.cat(context + [x], dim=2)
    frames = inp.shape[2]
    ctx_frames = frames - cf
    chunk = torch.tensor([i // cf for i in range(frames)], device=x.device)
    visible = chunk[None, :] <= chunk[:, None]  # context block-causal, the noisy chunk sees everything
    mask = visible.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)
    timesteps = torch.zeros(b, frames, device=x.device)
    timesteps[:, ctx_frames:] = t
    pos = torch.tensor(positions, device=x.device)[None].expand(b, -1)
    flow = dit(inp, timesteps, text, ChunkAttention.dense(b, x.device, mask, frame_positions=pos))
    return flow[:, :, ctx_frames:]
