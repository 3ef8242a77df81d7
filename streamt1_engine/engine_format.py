"""The engine's own model folder, read and written here only: ``streamt1.json`` (model, stream and sampler
configs, component specs, default rewards), ``dit.safetensors`` (original Wan tensor names) and whatever files
the component specs name (e.g. ``text_encoder.safetensors``).

Reading is strict: an unknown key, a missing section (the sampler's alone may be left out, with a warning
naming the defaults used), a missing shape or frame-size key or a wrong value is one line naming the file and
the key; any other key left out takes its default with one warning naming the values used.
The stream keys of the first format version (``chunk_frames``, ``window_frames``, ...) still convert, with one
warning (``StreamConfig.from_dict``).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import (REQUIRED_MODEL_KEYS, REQUIRED_STREAM_KEYS, SamplerConfig, StreamConfig, WanConfig,
                     check_section_keys, defaults_text)
from .errors import StreamT1Error, require
from .validation import build_config

ENGINE_FORMAT = "streamt1-engine"
FORMAT_VERSION = 1
ENGINE_CONFIG_FILE = "streamt1.json"
DIT_WEIGHTS = "dit.safetensors"
ENGINE_CONFIG_KEYS = ("format", "version", "name", "description", "model", "stream", "sampler", "text_encoder",
                      "vae", "weights", "fps", "rewards", "training")
REWARD_ROLES = ("short", "long", "final")
DEFAULT_FPS = 16


@dataclass
class EngineSpec:
    """What ``streamt1.json`` says, checked; ``text_encoder`` and ``vae`` are registry specs (``{"type": ...}``)."""

    model: WanConfig
    text_encoder: dict
    vae: dict
    stream: StreamConfig = field(default_factory=StreamConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    weights: str = DIT_WEIGHTS
    fps: int = DEFAULT_FPS
    name: str | None = None
    description: str | None = None
    rewards: dict = field(default_factory=dict)
    training: dict | None = None
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        data = {"format": ENGINE_FORMAT, "version": self.version, "name": self.name, "description": self.description,
                "model": self.model.to_dict(), "stream": self.stream.to_dict(), "sampler": _sampler_dict(self.sampler),
                "text_encoder": dict(self.text_encoder), "vae": dict(self.vae), "weights": self.weights,
                "fps": self.fps, "rewards": dict(self.rewards), "training": self.training}
        return {k: v for k, v in data.items() if v is not None}


def _sampler_dict(sampler: SamplerConfig) -> dict:
    return {"denoising_steps": list(sampler.denoising_steps), "shift": sampler.shift,
            "num_train_timesteps": sampler.num_train_timesteps, "warp_denoising_steps": sampler.warp_denoising_steps,
            "context_timestep": sampler.context_timestep}


def is_engine_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / ENGINE_CONFIG_FILE).is_file()


def _component(spec, where: str) -> dict:
    require(isinstance(spec, dict) and isinstance(spec.get("type"), str),
            f"{where} must be an object with a 'type' string, got {spec!r}")
    return spec


def read_engine_spec(directory) -> EngineSpec:
    """``directory/streamt1.json``, checked key by key (errors name the file and the key)."""
    where = Path(directory) / ENGINE_CONFIG_FILE
    require(where.is_file(), f"no {ENGINE_CONFIG_FILE} in {directory}")
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StreamT1Error(f"{where} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise StreamT1Error(f"cannot read {where}: {exc}") from None
    require(isinstance(data, dict) and data.get("format") == ENGINE_FORMAT, f"{where} is not a {ENGINE_FORMAT} config")
    unknown = sorted(set(data) - set(ENGINE_CONFIG_KEYS))
    require(not unknown, f"{where} has unknown keys {unknown}; known: {list(ENGINE_CONFIG_KEYS)}")
    for key in ("model", "stream", "text_encoder", "vae"):
        require(key in data, f"{where} lacks the {key!r} section" + (_STREAM_HINT if key == "stream" else ""))
    _check_sections(data, where)
    version = data.get("version", FORMAT_VERSION)
    require(isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= FORMAT_VERSION,
            f"{where} 'version' must be an integer in [1, {FORMAT_VERSION}], got {version!r} (a newer engine wrote it?)")
    fps = data.get("fps", DEFAULT_FPS)
    require(isinstance(fps, int) and not isinstance(fps, bool) and fps > 0,
            f"{where} 'fps' must be a positive integer, got {fps!r}")
    for key in ("name", "description", "weights"):
        require(data.get(key) is None or isinstance(data[key], str),
                f"{where} {key!r} must be a string, got {data.get(key)!r}")
    weights = data.get("weights", DIT_WEIGHTS)
    require(not Path(weights).is_absolute() and ".." not in Path(weights).parts,
            f"{where} 'weights' must be a file inside the folder, got {weights!r}")
    rewards = data.get("rewards", {})
    require(isinstance(rewards, dict), f"{where} 'rewards' must be an object, got {rewards!r}")
    stray = sorted(set(rewards) - set(REWARD_ROLES))
    require(not stray, f"{where} 'rewards' has unknown keys {stray}; known: {list(REWARD_ROLES)}")
    training = data.get("training")
    require(training is None or isinstance(training, dict), f"{where} 'training' must be an object, got {training!r}")
    return EngineSpec(
        model=build_config(WanConfig, data["model"], f"{where} 'model'"),
        stream=build_config(StreamConfig, data["stream"], f"{where} 'stream'", StreamConfig.from_dict),
        sampler=build_config(SamplerConfig, data.get("sampler", {}), f"{where} 'sampler'"),
        text_encoder=_component(data["text_encoder"], f"{where} 'text_encoder'"),
        vae=_component(data["vae"], f"{where} 'vae'"),
        weights=weights, fps=fps, name=data.get("name"), description=data.get("description"), rewards=rewards,
        training=training, version=version)


_STREAM_HINT = (" (the latent frame size and attention layout, e.g. {\"num_frame_per_block\": 3, \"local_attn_size\": 12, "
                "\"sink_size\": 3, \"max_sink_size\": 15, \"latent_height\": 60, \"latent_width\": 104})")
# The stream keys of the first format version fill the layout themselves (StreamConfig.from_dict); max_frames is
# only a cap on a stream's length, so its default needs no warning.
_LAYOUT_KEYS = ("num_frame_per_block", "local_attn_size", "sink_size", "max_sink_size")


def _check_sections(data: dict, where: Path) -> None:
    """What a section leaves out: the model's shapes and the latent size are errors naming the key, any other
    field (and a missing sampler section) takes its default with one warning naming the values used."""
    check_section_keys(WanConfig, data["model"], f"{where} 'model'", required=REQUIRED_MODEL_KEYS)
    stream = data["stream"]
    old_keys = isinstance(stream, dict) and any(k in stream for k in StreamConfig.OLD_KEYS)
    check_section_keys(StreamConfig, stream, f"{where} 'stream'", required=REQUIRED_STREAM_KEYS,
                       skip=("max_frames", *(_LAYOUT_KEYS if old_keys else ())))
    if "sampler" in data:
        check_section_keys(SamplerConfig, data["sampler"], f"{where} 'sampler'")
    else:
        warnings.warn(f"{where} has no 'sampler' section: using the default sampler ({defaults_text(SamplerConfig)})",
                      UserWarning, stacklevel=3)


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_engine_spec(directory, spec: EngineSpec) -> Path:
    """Write ``directory/streamt1.json`` (replaced atomically); returns its path."""
    path = Path(directory) / ENGINE_CONFIG_FILE
    try:
        text = json.dumps(spec.to_dict(), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:  # e.g. a reward given as a Python object, not a name or spec
        raise StreamT1Error(f"cannot write {path}: a value is not plain JSON ({exc})") from None
    _replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def save_weights(path, state: dict, dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    """A state dict as safetensors (CPU, contiguous, cast to ``dtype`` when given), replaced atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    _replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def component_spec(component, directory: Path, what: str) -> dict:
    """The registry spec of a text encoder or VAE, writing its files into ``directory``: the component's own
    ``save_pretrained(directory) -> spec``."""
    save = getattr(component, "save_pretrained", None)
    require(callable(save), f"cannot save the {what} ({type(component).__name__}): it has no "
                            "save_pretrained(directory) returning its spec")
    return _component(save(directory), f"the {what}'s spec")


def save_engine_dir(directory, *, model, text_encoder, vae, stream: StreamConfig, sampler: SamplerConfig,
                    fps: int, name: str | None = None, rewards: dict | None = None, description: str | None = None,
                    training: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write an engine folder that ``read_engine_spec`` / ``from_pretrained`` read back: the DiT's weights (in
    ``dtype``, default their own), the components' files and specs, and ``streamt1.json`` last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(directory / DIT_WEIGHTS, model.state_dict(), dtype, metadata={"format": ENGINE_FORMAT})
    spec = EngineSpec(model=model.config, stream=stream, sampler=sampler,
                      text_encoder=component_spec(text_encoder, directory, "text encoder"),
                      vae=component_spec(vae, directory, "VAE"), fps=fps, name=name, description=description,
                      rewards=dict(rewards or {}), training=training)
    return write_engine_spec(directory, spec).parent
