"""Video VAEs that decode latents chunk by chunk, carrying a causal state that beams can fork.

``WanVAE`` wraps diffusers' ``AutoencoderKLWan``. Its ``decode`` runs the decoder one latent frame at a
time and keeps, for every causal 3D convolution, the last input frames in a feature cache. We run that
same loop but hand the cache back to the caller after each chunk, so a stream is decoded exactly once,
chunk after chunk, with the same frames as one full decode. The cache holds one row per stream, so forking
candidates from beams is an index-select along the batch dimension.

``SpaceToDepthVAE`` is a weight-free stand-in (pixel unshuffle) for tiny models and tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import StreamT1Error, require
from .hub import resolve_model_dir
from .registry import ComponentRegistry, component_path


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    require(isinstance(latents, torch.Tensor) and latents.dim() == 5,
            "latents must be a 5-D tensor [N, C, F, h, w]")
    require(latents.shape[1] == channels, f"latents have {latents.shape[1]} channels, the VAE expects {channels}")
    require(latents.shape[2] >= 1, "latents have no frames")


def _check_video(video: torch.Tensor) -> None:
    require(isinstance(video, torch.Tensor) and video.dim() == 5 and video.shape[2] == 3,
            "video must be a float tensor [B, T, 3, H, W]")


@dataclass
class WanDecodeState:
    """Causal decoder state of N streams.

    ``cache`` has one entry per causal convolution of the decoder: a tensor [N, C, t, H, W] of its last input
    frames, ``None`` before the first frame, or diffusers' ``"Rep"`` marker (temporal upsamplers after the
    first frame). ``started`` is False until the first chunk, which alone decodes its first latent frame into
    one video frame.
    """

    cache: list
    started: bool

    @property
    def batch_size(self) -> int | None:
        for entry in self.cache:
            if isinstance(entry, torch.Tensor):
                return entry.shape[0]
        return None


_VAE_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
               "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def default_vae_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA, as Self-Forcing, LongLive and Stream-T1 decode (their whole pipeline, VAE included, is
    cast to bf16 before inference); float32 elsewhere, where bf16 convolutions are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def vae_dtype(value: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """A dtype, its name ("bf16", "float32", ...) or None / "auto" for :func:`default_vae_dtype`."""
    if value is None or value == "auto":
        return default_vae_dtype(device)
    if isinstance(value, torch.dtype):
        return value
    require(value in _VAE_DTYPES, f"unknown VAE dtype {value!r} (use auto, {', '.join(_VAE_DTYPES)})")
    return _VAE_DTYPES[value]


class WanVAE:
    """Streaming decoder over a diffusers ``AutoencoderKLWan`` (Wan 2.1 / 2.2 VAE).

    ``dtype`` (default: :func:`default_vae_dtype`) is what the decoder's convolutions run in; the
    de-normalisation of the latents and the output frames stay float32.
    """

    def __init__(self, model, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        dtype = vae_dtype(dtype, device)
        model = model.to(device)
        if next(model.parameters()).dtype != dtype:
            model = model.to(dtype)
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        config = model.config
        self.latent_channels = int(config.z_dim)
        self.patch_size = config.patch_size
        self.spatial_factor = 2 ** (len(config.dim_mult) - 1) * (self.patch_size or 1)
        self.temporal_factor = 2 ** sum(bool(d) for d in config.temperal_downsample)
        shape = (1, self.latent_channels, 1, 1, 1)
        require(len(config.latents_mean) == len(config.latents_std) == self.latent_channels,
                f"VAE config has {len(config.latents_mean)} latents_mean / {len(config.latents_std)} latents_std "
                f"values for {self.latent_channels} latent channels")
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(shape).to(self.device)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(shape).to(self.device)
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in self.model.decoder.modules())

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device="cpu", dtype: torch.dtype | str | None = None) -> "WanVAE":
        """Load from a VAE dir, a diffusers pipeline dir (``vae/`` subfolder) or a hub id of either."""
        from diffusers import AutoencoderKLWan

        dtype = vae_dtype(dtype, device)
        root = resolve_model_dir(str(path_or_id))
        folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
        require((folder / "config.json").is_file(),
                f"no Wan VAE config.json in {root} (nor in its vae/ folder); "
                "a diffusers AutoencoderKLWan dir or pipeline dir is needed")
        try:
            model = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise StreamT1Error(f"cannot load the Wan VAE from {folder}: {str(exc).splitlines()[0]}") from None
        vae = cls(model, device=device, dtype=dtype)
        vae.source = str(path_or_id)
        return vae

    source: str | None = None  # where from_pretrained read it: what a saved engine folder points at

    def save_pretrained(self, directory) -> dict:
        """The spec an engine folder stores: a reference to the VAE's source and the dtype it decodes in."""
        require(self.source is not None, "cannot save a Wan VAE built without from_pretrained: its source is unknown")
        dtype = next(name for name, value in _VAE_DTYPES.items() if value == self.dtype)
        return {"type": "wan", "path": self.source, "dtype": dtype}

    def frames_per_chunk(self, first: bool, latent_frames: int) -> int:
        """Video frames decoded from ``latent_frames``; the stream's first latent frame gives one frame."""
        return 1 + self.temporal_factor * (latent_frames - 1) if first else self.temporal_factor * latent_frames

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: WanDecodeState | None) -> tuple[torch.Tensor, WanDecodeState]:
        _check_latents(latents, self.latent_channels)
        if state is None:
            state = WanDecodeState(cache=[None] * self._num_convs, started=False)
        require(state.batch_size in (None, latents.shape[0]),
                f"decoder state holds {state.batch_size} streams but {latents.shape[0]} latents were given")
        # The decoder replaces cache entries (never writes into them), so a shallow copy keeps ``state`` intact.
        cache, started = list(state.cache), state.started
        z = latents.to(self.device, torch.float32) * self.latents_std + self.latents_mean
        x = self.model.post_quant_conv(z.to(self.dtype))
        outputs = []
        for i in range(x.shape[2]):
            frame = x[:, :, i:i + 1]
            outputs.append(self.model.decoder(frame, feat_cache=cache, feat_idx=[0], first_chunk=not started))
            started = True
        video = torch.cat(outputs, dim=2)
        if self.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=self.patch_size)
        frames = ((video.float().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 1, 3, 4).contiguous()
        return frames, WanDecodeState(cache=cache, started=started)

    def select_state(self, state: WanDecodeState, index: torch.Tensor) -> WanDecodeState:
        index = index.to(self.device)
        cache = [e.index_select(0, index) if isinstance(e, torch.Tensor) else e for e in state.cache]
        return WanDecodeState(cache=cache, started=state.started)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, T, 3, H, W] in [0, 1], T = 1 + k * temporal_factor -> normalised latents (posterior mean)."""
        _check_video(video)
        t, h, w = video.shape[1], video.shape[3], video.shape[4]
        require((t - 1) % self.temporal_factor == 0,
                f"video has {t} frames; the Wan VAE needs 1 + a multiple of {self.temporal_factor}")
        require(h % self.spatial_factor == 0 and w % self.spatial_factor == 0,
                f"video size {h}x{w} is not divisible by the VAE factor {self.spatial_factor}")
        x = (video.to(self.device, self.dtype) * 2.0 - 1.0).permute(0, 2, 1, 3, 4)
        mean = self.model.encode(x).latent_dist.mode().float()
        return (mean - self.latents_mean) / self.latents_std


class SpaceToDepthVAE:
    """Weight-free latent: each f x f pixel block becomes 3*f*f channels in [-1, 1]; one latent frame per frame."""

    def __init__(self, factor: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        require(isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1,
                f"space-to-depth factor must be a positive int, got {factor!r}")
        self.factor = factor
        self.spatial_factor = factor
        self.temporal_factor = 1
        self.latent_channels = 3 * factor * factor
        self.device = torch.device(device)
        self.dtype = dtype

    def save_pretrained(self, directory) -> dict:
        """Weight-free: the spec alone rebuilds it."""
        return {"type": "space_to_depth", "factor": self.factor}

    def frames_per_chunk(self, first: bool, latent_frames: int) -> int:
        return latent_frames

    def decode_chunk(self, latents: torch.Tensor, state: Any | None) -> tuple[torch.Tensor, None]:
        _check_latents(latents, self.latent_channels)
        n, c, t, h, w = latents.shape
        planes = latents.to(self.device, torch.float32).permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        frames = F.pixel_shuffle(planes, self.factor).reshape(n, t, 3, h * self.factor, w * self.factor)
        return ((frames + 1.0) / 2.0).clamp(0.0, 1.0), None

    def select_state(self, state: Any, index: torch.Tensor) -> None:
        return None

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        _check_video(video)
        b, t, _, h, w = video.shape
        require(h % self.factor == 0 and w % self.factor == 0,
                f"video size {h}x{w} is not divisible by the space-to-depth factor {self.factor}")
        planes = video.to(self.device, torch.float32).reshape(b * t, 3, h, w) * 2.0 - 1.0
        latents = F.pixel_unshuffle(planes, self.factor).reshape(b, t, self.latent_channels, h // self.factor,
                                                                  w // self.factor)
        return latents.permute(0, 2, 1, 3, 4).to(self.dtype).contiguous()


def decode_cold_windows(vae, prefixes: torch.Tensor | None, latents: torch.Tensor,
                        prefix_index: torch.Tensor) -> torch.Tensor:
    """Decode every candidate's window ``prefixes[prefix_index[n]] ++ latents[n]`` from a cold decoder state.

    Candidates that share a prefix (siblings of one beam) share its decode: the P prefixes [P, C, Fp, h, w]
    are decoded once, batched, then all N candidates [N, C, F, h, w] continue from their prefix's state in
    one batched call. Equals decoding each window alone, since a causal decoder's output for a frame depends
    only on the frames before it. Works for any VAE with ``decode_chunk`` / ``select_state``; returns float
    frames [N, T, 3, H, W] in [0, 1]."""
    if prefixes is None or prefixes.shape[2] == 0:
        return vae.decode_chunk(latents, None)[0]
    require(prefix_index.dim() == 1 and prefix_index.shape[0] == latents.shape[0],
            f"prefix_index needs one prefix per candidate ({latents.shape[0]}), got shape {tuple(prefix_index.shape)}")
    head, state = vae.decode_chunk(prefixes, None)
    index = prefix_index.to(head.device)
    state = vae.select_state(state, index) if state is not None else None
    tail, _ = vae.decode_chunk(latents, state)
    return torch.cat([head.index_select(0, index), tail], dim=1)


VAES = ComponentRegistry("VAE")
register_vae = VAES.register
build_vae = VAES.build


register_vae("wan", lambda spec, base_dir, device, dtype:
             WanVAE.from_pretrained(component_path(spec, base_dir), device=device, dtype=spec.get("dtype", dtype)),
             builtin=True)
register_vae("space_to_depth", lambda spec, base_dir, device, dtype:
             SpaceToDepthVAE(spec.get("factor", 8), device=device, dtype=dtype or torch.float32), builtin=True)
