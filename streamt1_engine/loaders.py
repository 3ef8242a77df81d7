"""Turn a model source (embedded name, engine directory, diffusers pipeline, or a bare DiT checkpoint plus
text-encoder and VAE sources) into the parts the engine needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import EngineConfig, SamplerConfig, StreamConfig, WanConfig
from .engine_format import ENGINE_CONFIG_FILE, ENGINE_CONFIG_KEYS, ENGINE_FORMAT, read_engine_spec  # noqa: F401
from .errors import StreamT1Error, require, require_packages
from .model.wan import CausalWanDiT

BUILTIN_DIR = Path(__file__).parent / "assets" / "tiny"


def checkpoint_stream_preset(lora) -> str:
    """The attention layout a bare DiT checkpoint was released with (480x832 latents).

    A base checkpoint with a LoRA is LongLive, which Stream-T1 runs: "stream-t1" (LongLive's local 12 frames
    with a sink of 3, which memory sinking may grow to 15; without stream_t1 search that is exactly LongLive).
    Without a LoRA it is Self-Forcing or CausVid (one file layout, one layout of attention): "self-forcing",
    global attention over up to 21 frames. Diffusers and original-Wan folders get "self-forcing" too: that
    is the layout of causal Wan DiTs converted to those formats, and the closest to the full attention of the
    bidirectional Wan2.1 base."""
    return "stream-t1" if lora is not None else "self-forcing"


@dataclass
class ModelParts:
    model: CausalWanDiT
    text_encoder: object
    vae: object
    config: EngineConfig
    fps: int
    name: str
    default_rewards: dict = field(default_factory=dict)


def random_tiny_parts(device, dtype, seed: int = 0) -> ModelParts:
    """A deterministic random-weight tiny model: exercises every code path in seconds, makes no sense."""
    from .text_encoders import HashedTextEncoder
    from .vae import SpaceToDepthVAE

    model_cfg = WanConfig.tiny(in_channels=48, out_channels=48, text_dim=32, text_len=16)
    stream = StreamConfig(num_frame_per_block=3, local_attn_size=15, sink_size=3, max_sink_size=9,
                          latent_height=8, latent_width=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CausalWanDiT(model_cfg, max_frames=stream.max_frames)
    text = HashedTextEncoder(model_cfg.text_dim, model_cfg.text_len, seed=seed)
    vae = SpaceToDepthVAE(4, device=device, dtype=torch.float32)
    return ModelParts(model, text, vae, EngineConfig(model_cfg, stream, SamplerConfig()), fps=8, name="random-tiny")


def _engine_dir_parts(directory: Path, device, dtype, lora, lora_alpha=None, vae_dtype=None) -> ModelParts:
    from .model.loading import load_dit
    from .text_encoders import build_text_encoder
    from .vae import build_vae

    spec = read_engine_spec(directory)
    weights = directory / spec.weights
    require(weights.exists(), f"missing weights file {weights}")
    model = load_dit(str(weights), config=spec.model, fmt="wan", lora=lora, lora_alpha=lora_alpha, device="cpu",
                     dtype=torch.float32,
                     max_frames=spec.stream.max_frames)
    if spec.vae.get("type") == "wan":
        require_packages(f"the Wan VAE of {directory}", "diffusers")
    text = build_text_encoder(spec.text_encoder, directory, device, dtype)
    vae = build_vae(spec.vae, directory, device, vae_dtype)
    check_finite_tensors(text, f"text encoder of {directory}")
    return ModelParts(model, text, vae, EngineConfig(spec.model, spec.stream, spec.sampler), fps=spec.fps,
                      name=spec.name or directory.name, default_rewards=spec.rewards)


def load_parts(source: str, *, device, dtype, text_encoder=None, vae=None, lora=None, lora_alpha=None,
               vae_dtype=None, stream: StreamConfig | None = None, stream_preset: str | None = None,
               sampler: SamplerConfig | None = None) -> ModelParts:
    """``stream`` replaces the model's stream layout; else ``stream_preset`` (a ``StreamConfig.preset`` name)
    replaces its attention layout and keeps its latent size; else the model's own (engine format) or the one
    its checkpoint format implies (``checkpoint_stream_preset``). ``vae_dtype``: what a Wan VAE decodes in
    (None: bf16 on CUDA as the upstream pipelines, else float32; a spec's own ``"dtype"`` wins)."""
    if source == "tiny":
        _register_builtin_components()
        if (BUILTIN_DIR / ENGINE_CONFIG_FILE).exists():
            parts = _engine_dir_parts(BUILTIN_DIR, device, dtype, lora, lora_alpha, vae_dtype)
            parts.name = "tiny"
        else:
            parts = random_tiny_parts(device, dtype)
    elif source == "random-tiny":
        parts = random_tiny_parts(device, dtype)
    else:
        from .hub import resolve_model_dir

        path = resolve_model_dir(source)
        _require_model_source(path, source)
        if path.is_dir() and (path / ENGINE_CONFIG_FILE).exists():
            _register_builtin_components()
            parts = _engine_dir_parts(path, device, dtype, lora, lora_alpha, vae_dtype)
        else:
            parts = _wan_parts(path, source, device, dtype, text_encoder, vae, lora, lora_alpha, vae_dtype)
    if stream is None and stream_preset is not None:
        own = parts.config.stream
        stream = StreamConfig.preset(stream_preset, latent_height=own.latent_height, latent_width=own.latent_width,
                                     max_frames=own.max_frames)
    if stream is not None or sampler is not None:
        parts.config = EngineConfig(parts.config.model, stream or parts.config.stream, sampler or parts.config.sampler)
    return parts


def _require_model_source(path: Path, source: str) -> None:
    """A folder that holds no model files gets its own message, not the bare-checkpoint one."""
    if not path.is_dir():
        return
    require(any(path.iterdir()), f"model directory {path} is empty")
    markers = (ENGINE_CONFIG_FILE, "model_index.json", "config.json", "transformer")
    weights = ("*.safetensors", "*.safetensors.index.json", "*.pt", "*.pth", "*.bin", "*.ckpt")
    found = any((path / m).exists() for m in markers) or any(any(path.glob(w)) for w in weights)
    require(found, f"{source!r} is not a model directory: it has no {ENGINE_CONFIG_FILE}, model_index.json, "
                   "config.json or weights files")


def check_finite_tensors(module, what: str) -> None:
    """Refuse weights holding NaN or infinities (a corrupt file would otherwise give a silent black video)."""
    from .model.loading import check_finite_weights

    if isinstance(module, torch.nn.Module):
        check_finite_weights(module.state_dict(), what)


def _wan_parts(path: Path, source: str, device, dtype, text_encoder, vae, lora, lora_alpha=None,
               vae_dtype=None) -> ModelParts:
    """A Wan-architecture DiT from diffusers / original Wan / Self-Forcing / LongLive files."""
    from .model.loading import load_dit
    from .text_encoders import build_text_encoder
    from .vae import build_vae

    require_packages(f"the Wan model {source!r} (umT5 text encoder, Wan VAE)", "diffusers", "transformers")
    is_pipeline = path.is_dir() and (path / "model_index.json").exists()
    if not is_pipeline:
        require(text_encoder is not None and vae is not None,
                f"{source!r} is a bare DiT checkpoint: pass text_encoder= and vae= (e.g. a Wan2.1 diffusers "
                f"pipeline directory or hub id)")
    # LongLive trains its LoRA on the non-EMA generator, Self-Forcing samples with the EMA weights
    model = load_dit(str(path), lora=lora, lora_alpha=lora_alpha, use_ema=lora is None, device="cpu",
                     dtype=torch.float32, max_frames=StreamConfig().max_frames)
    text = build_text_encoder({"type": "umt5", "path": str(text_encoder or path)}, None, device, dtype)
    decoder = build_vae({"type": "wan", "path": str(vae or path)}, None, device, vae_dtype)
    stream = StreamConfig.preset(checkpoint_stream_preset(lora))
    return ModelParts(model, text, decoder, EngineConfig(model.config, stream, SamplerConfig()), fps=16,
                      name=source)


def _register_builtin_components() -> None:
    """The embedded model's own component types register themselves on import."""
    try:
        import streamt1_engine.tiny  # noqa: F401
    except ImportError as exc:  # pragma: no cover - only if the package is broken
        raise StreamT1Error(f"the embedded model's components failed to import: {exc}") from None
