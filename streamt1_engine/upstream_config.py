"""Read an upstream inference YAML (Stream-T1's ``stream_scaling.yaml``, LongLive's or Self-Forcing's inference
configs) into the engine's configs, so values pasted from the paper's code mean the same thing here.

Keys read: ``denoising_step_list``, ``warp_denoising_step``, ``num_frame_per_block``, ``num_train_timestep``,
``timestep_shift``, ``model_kwargs.{local_attn_size, timestep_shift, sink_size, max_sink_size}``,
``num_output_frames``, ``seed``, ``beam_size``, ``top_k``, ``sliding_window_size``, ``context_noise``,
``generator_ckpt``, ``lora_ckpt``, ``use_ema``, ``adapter.{type, rank, alpha}``; also the search knobs that
upstream takes on its command line (``short_threshold``, ``long_threshold``, ``noise_fusion_sigma``,
``short_score_fusion_threshold``). Keys that only steer upstream's own file handling (prompt files, output
folders, sample counts) are accepted and ignored. Anything else is named in one warning; contradictory values
are one error that lists every contradiction.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from .config import SamplerConfig, StreamConfig
from .errors import StreamT1Error, require
from .search.config import SearchConfig

# upstream keys about its own runs (prompts, files, dtype of the LoRA wrapper): no meaning for the engine
RUN_KEYS = {"model_name", "data_path", "output_folder", "inference_iter", "num_samples", "save_with_index",
            "global_sink", "distributed"}
ADAPTER_RUN_KEYS = {"dropout", "dtype", "verbose"}
MODEL_KWARGS = {"local_attn_size", "timestep_shift", "sink_size", "max_sink_size"}
TOP_KEYS = {"denoising_step_list", "warp_denoising_step", "num_frame_per_block", "num_train_timestep",
            "timestep_shift", "model_kwargs", "num_output_frames", "seed", "beam_size", "top_k",
            "sliding_window_size", "context_noise", "generator_ckpt", "lora_ckpt", "use_ema", "adapter",
            "short_threshold", "long_threshold", "noise_fusion_sigma", "short_score_fusion_threshold"}
SEARCH_KEYS = ("beam_size", "top_k", "sliding_window_size")  # present: a Stream-T1 (beam search) config


@dataclass(frozen=True)
class UpstreamConfig:
    """What an upstream inference YAML asks for, in the engine's terms."""

    stream: StreamConfig
    sampler: SamplerConfig
    search: SearchConfig
    num_chunks: int
    seed: int
    checkpoint: str | None = None
    lora: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    source: str = "<dict>"

    def engine_kwargs(self, **overrides) -> dict:
        """Keyword arguments for ``StreamT1Engine.from_pretrained`` (``overrides`` win, e.g. text_encoder=)."""
        kwargs = dict(source=self.checkpoint, lora=self.lora, stream=self.stream, sampler=self.sampler)
        if self.lora is not None and self.lora_alpha is not None:
            kwargs["lora_alpha"] = self.lora_alpha
        kwargs.update(overrides)
        return kwargs

    def generate_kwargs(self, **overrides) -> dict:
        """Keyword arguments for ``StreamT1Engine.generate`` / ``stream`` besides the prompt."""
        return {**dict(num_chunks=self.num_chunks, seed=self.seed, search=self.search), **overrides}


def load_upstream_config(path: str | Path) -> UpstreamConfig:
    """Parse an upstream inference YAML file (see the module docstring for the keys)."""
    import yaml

    path = Path(path)
    require(path.is_file(), f"upstream config {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StreamT1Error(f"{path} is not valid YAML: {exc}") from None
    require(isinstance(data, dict), f"{path} does not hold a mapping of config keys")
    return upstream_config_from_dict(data, source=str(path))


def upstream_config_from_dict(data: dict, source: str = "<dict>") -> UpstreamConfig:
    try:
        return _from_dict(data, source)
    except (TypeError, ValueError, KeyError) as exc:
        raise StreamT1Error(f"{source}: malformed upstream config value: {type(exc).__name__}: {exc}") from None


def _from_dict(data: dict, source: str) -> UpstreamConfig:
    model_kwargs = data.get("model_kwargs") or {}
    adapter = data.get("adapter")
    require(isinstance(model_kwargs, dict), f"{source}: model_kwargs must be a mapping")
    require(adapter is None or isinstance(adapter, dict), f"{source}: adapter must be a mapping")
    unknown = sorted(set(data) - TOP_KEYS - RUN_KEYS)
    unknown += sorted(f"model_kwargs.{k}" for k in set(model_kwargs) - MODEL_KWARGS)
    unknown += sorted(f"adapter.{k}" for k in set(adapter or {}) - {"type", "rank", "alpha"} - ADAPTER_RUN_KEYS)

    errors: list[str] = []
    block = int(data.get("num_frame_per_block", 1))  # upstream's own default is 1 frame per block
    local = int(model_kwargs.get("local_attn_size", -1))
    sink = int(model_kwargs.get("sink_size", 0))
    max_sink = int(model_kwargs.get("max_sink_size", sink))
    frames = int(data.get("num_output_frames", 21))
    steps = [float(t) for t in data.get("denoising_step_list", SamplerConfig().denoising_steps)]
    warp = bool(data.get("warp_denoising_step", False))
    shifts = {float(v) for v in (data.get("timestep_shift"), model_kwargs.get("timestep_shift")) if v is not None}

    if frames % block:
        errors.append(f"num_output_frames ({frames}) is not a multiple of num_frame_per_block ({block})")
    if warp and 0 in steps:
        errors.append("denoising_step_list contains 0 while warp_denoising_step is true (upstream: remove the 0)")
    if local != -1 and sink >= local:
        errors.append(f"sink_size ({sink}) is not smaller than local_attn_size ({local}), which includes the sink")
    if max_sink < sink:
        errors.append(f"max_sink_size ({max_sink}) is smaller than sink_size ({sink})")
    if local == -1 and (sink or max_sink):
        errors.append(f"global attention (local_attn_size -1) with a sink (sink_size {sink}, max_sink_size {max_sink})")
    if len(shifts) > 1:
        errors.append(f"timestep_shift differs between the top level and model_kwargs ({sorted(shifts)})")
    if data.get("lora_ckpt") and adapter is None:
        errors.append("lora_ckpt without an adapter section: upstream would not apply the LoRA")
    if adapter is not None and adapter.get("type", "lora") != "lora":
        errors.append(f"adapter type {adapter.get('type')!r} is not supported (only lora)")
    if "use_ema" in data and bool(data["use_ema"]) != (not data.get("lora_ckpt")):
        if data.get("lora_ckpt"):
            errors.append("use_ema true with a LoRA: the engine merges a LoRA into the non-EMA generator, as "
                          "upstream's Stream-T1 and LongLive configs do (use_ema false)")
        else:
            unknown.append("use_ema (without a LoRA the engine loads generator_ema, as Self-Forcing samples)")

    configs = {}
    if not errors:
        try:
            configs["stream"] = StreamConfig(num_frame_per_block=block, local_attn_size=local, sink_size=sink,
                                             max_sink_size=max_sink)
            configs["sampler"] = SamplerConfig(
                denoising_steps=tuple(steps), shift=shifts.pop() if shifts else SamplerConfig().shift,
                num_train_timesteps=int(data.get("num_train_timestep", 1000)), warp_denoising_steps=warp,
                context_timestep=float(data.get("context_noise", 0)))
            if configs["stream"].is_global and frames > configs["stream"].max_stream_frames:
                errors.append(f"num_output_frames ({frames}) exceeds what global attention holds "
                              f"({configs['stream'].max_stream_frames} frames; upstream's cache would overflow)")
            beam = any(k in data for k in SEARCH_KEYS)
            d = SearchConfig()
            configs["search"] = SearchConfig(
                strategy="stream_t1" if beam else "none", beam_size=int(data.get("beam_size", d.beam_size)),
                top_k=int(data.get("top_k", d.top_k)),
                window_chunks=int(data.get("sliding_window_size", d.window_chunks)),
                noise_sigma=float(data.get("noise_fusion_sigma", d.noise_sigma)),
                short_threshold=float(data.get("short_threshold", d.short_threshold)),
                long_threshold=float(data.get("long_threshold", d.long_threshold)),
                fusion_cap=float(data.get("short_score_fusion_threshold", d.fusion_cap)))
        except StreamT1Error as exc:
            errors.append(str(exc))
    if errors:
        raise StreamT1Error(f"{source}: contradictory upstream config: " + "; ".join(errors))
    if unknown:
        warnings.warn(f"{source}: ignoring keys the engine does not use: {', '.join(unknown)}", UserWarning,
                      stacklevel=4)
    return UpstreamConfig(
        stream=configs["stream"], sampler=configs["sampler"], search=configs["search"], num_chunks=frames // block,
        seed=int(data.get("seed", 42)), checkpoint=data.get("generator_ckpt") or None,
        lora=(data.get("lora_ckpt") or None) if adapter is not None else None,
        lora_rank=int(adapter["rank"]) if adapter and "rank" in adapter else None,
        lora_alpha=float(adapter["alpha"]) if adapter and "alpha" in adapter else None, source=source)


__all__ = ["UpstreamConfig", "load_upstream_config", "upstream_config_from_dict"]
