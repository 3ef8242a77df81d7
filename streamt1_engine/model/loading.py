"""Load a CausalWanDiT from the checkpoint layouts that Wan-based streaming models ship in.

Supported sources (a local path or a Hugging Face hub id):

- ``streamt1``: our own folder, ``dit.safetensors`` + ``dit_config.json`` (see ``save_dit``);
- ``diffusers``: a ``WanTransformer3DModel`` folder, or a whole pipeline folder with ``transformer/``;
- ``wan``: the original Wan layout (``config.json`` with ``dim``/``num_heads`` and original tensor names);
- ``self_forcing`` (also CausVid, LongLive's base): a torch file with ``generator`` / ``generator_ema`` state
  dicts whose names carry a ``model.`` prefix, or such a state dict alone;
- LongLive adds a peft LoRA file (``lora=``) that is merged into the dense weights at load time.

Torch files are only read with ``weights_only=True``: a checkpoint must never be able to run code.
Every mismatch between checkpoint and model is an error, never a silently half-loaded model.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..config import REQUIRED_MODEL_KEYS, WanConfig, check_section_keys
from ..errors import StreamT1Error, require
from ..hub import looks_local, resolve_model_dir
from ..validation import build_config
from ..lora import LoraFactors, merge_lora, parse_lora
from .wan import CausalWanDiT

FORMATS = ("auto", "streamt1", "diffusers", "wan", "self_forcing", "causvid", "longlive")
STREAMT1_WEIGHTS = "dit.safetensors"
STREAMT1_CONFIG = "dit_config.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
MAX_LISTED_KEYS = 10

# diffusers WanTransformer3DModel name -> original Wan name, applied in order.
_DIFFUSERS_RULES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]]

# Wrapper fragments that FSDP, activation checkpointing and torch.compile insert into names.
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Leading prefixes over the transformer's own names: training wrappers (Self-Forcing's ``model.``), DDP, peft,
# diffusers LoRA files (``transformer.``) and ComfyUI files (``diffusion_model.``).
_LEADING_PREFIXES = ("base_model.model.", "base_model.", "module.", "model.", "transformer.", "diffusion_model.")



# --------------------------------------------------------------------------------------------- names

def convert_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers WanTransformer3DModel state dict to the original Wan names our model uses."""
    return {_diffusers_name(name): tensor for name, tensor in sd.items()}


def _diffusers_name(name: str) -> str:
    for pattern, replacement in _DIFFUSERS_RULES:
        name = pattern.sub(replacement, name)
    return name


def _looks_diffusers(names) -> bool:
    return any(n.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in n or n == "scale_shift_table"
               for n in names)


def _strip_name(name: str) -> str:
    for fragment in _WRAPPER_FRAGMENTS:
        name = name.replace(fragment, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def strip_wrapper_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop training-wrapper prefixes (``model.``, ``module.``, FSDP fragments) so names match the model."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        clean = _strip_name(name)
        require(clean not in out, f"checkpoint names '{name}' and another key both map to '{clean}'")
        out[clean] = tensor
    return out


# --------------------------------------------------------------------------------------------- configs

def _get(cfg: Mapping, key: str, default, kind: type = int):
    """``cfg[key]`` (or ``default``) of JSON type ``kind``: a string where a number belongs is one clear line."""
    value = cfg.get(key, default)
    if value is None:
        return value
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
    wanted = {int: "an integer", float: "a number", bool: "true or false"}[kind]
    require(ok, f"{key} must be {wanted}, got {value!r}")
    return kind(value)


def wan_config_from_diffusers(config_json: Mapping) -> WanConfig:
    """WanConfig from a diffusers ``WanTransformer3DModel`` config.json (text-to-video models only)."""
    cfg = dict(config_json)
    class_name = cfg.get("_class_name")
    require(class_name in (None, "WanTransformer3DModel"),
            f"diffusers config is for {class_name}, expected WanTransformer3DModel")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        require(cfg.get(key) is None, f"diffusers config sets {key}={cfg.get(key)}: that is an image-to-video Wan "
                                      "model; only text-to-video Wan DiTs are supported")
    qk_norm = cfg.get("qk_norm", "rms_norm_across_heads")
    require(qk_norm == "rms_norm_across_heads", f"unsupported qk_norm {qk_norm!r} (need rms_norm_across_heads)")
    heads = _get(cfg, "num_attention_heads", 40)
    in_channels = _get(cfg, "in_channels", 16)
    return WanConfig(
        dim=heads * _get(cfg, "attention_head_dim", 128),
        ffn_dim=_get(cfg, "ffn_dim", 13824),
        num_heads=heads,
        num_layers=_get(cfg, "num_layers", 40),
        in_channels=in_channels,
        out_channels=_get(cfg, "out_channels", None) or in_channels,
        text_dim=_get(cfg, "text_dim", 4096),
        freq_dim=_get(cfg, "freq_dim", 256),
        patch_size=cfg.get("patch_size", (1, 2, 2)),
        eps=_get(cfg, "eps", 1e-6, float),
        cross_attn_norm=_get(cfg, "cross_attn_norm", True, bool),
    )


def wan_config_from_original(config_json: Mapping) -> WanConfig:
    """WanConfig from an original Wan config.json (keys dim, num_heads, in_dim, ...; model_type must be t2v)."""
    cfg = dict(config_json)
    model_type = cfg.get("model_type", "t2v")
    require(model_type == "t2v", f"Wan model_type is {model_type!r}; only text-to-video ('t2v') is supported")
    require(_get(cfg, "qk_norm", True, bool), "Wan config disables qk_norm, which this model always applies")
    window = tuple(cfg.get("window_size", (-1, -1)))
    require(window == (-1, -1), f"Wan config sets a local window_size {window}; only global attention is supported")
    return WanConfig(
        dim=_get(cfg, "dim", 2048),
        ffn_dim=_get(cfg, "ffn_dim", 8192),
        num_heads=_get(cfg, "num_heads", 16),
        num_layers=_get(cfg, "num_layers", 32),
        in_channels=_get(cfg, "in_dim", 16),
        out_channels=_get(cfg, "out_dim", 16),
        text_dim=_get(cfg, "text_dim", 4096),
        text_len=_get(cfg, "text_len", 512),
        freq_dim=_get(cfg, "freq_dim", 256),
        patch_size=cfg.get("patch_size", (1, 2, 2)),
        eps=_get(cfg, "eps", 1e-6, float),
        cross_attn_norm=_get(cfg, "cross_attn_norm", True, bool),
    )


def default_num_heads(dim: int) -> int:
    """Wan uses 128-channel heads; smaller models get the widest even head size (<= 128) dividing ``dim``."""
    if dim % 128 == 0:
        return dim // 128
    for head_dim in range(min(dim, 128), 1, -1):
        if dim % head_dim == 0 and head_dim % 2 == 0:
            return dim // head_dim
    raise StreamT1Error(f"cannot choose a head count for model width {dim}; pass num_heads or a config")


def infer_wan_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> WanConfig:
    """WanConfig from tensor shapes (original names). Heads and text_len are not visible in the weights:
    heads default to ``default_num_heads(dim)`` and text_len to 512; pass a config when that is wrong."""
    def shape(name: str) -> tuple[int, ...]:
        require(name in state_dict, f"cannot infer the model shape: checkpoint has no '{name}'")
        return tuple(state_dict[name].shape)

    dim, in_channels, *patch = shape("patch_embedding.weight")
    layers = {int(m.group(1)) for n in state_dict if (m := re.match(r"^blocks\.(\d+)\.", n))}
    require(layers, "cannot infer the model shape: checkpoint has no 'blocks.N.' tensors")
    out_features = shape("head.head.weight")[0]
    patch_volume = math.prod(patch)
    require(out_features % patch_volume == 0,
            f"head.head.weight has {out_features} outputs, not a multiple of the patch volume {patch_volume}")
    return WanConfig(
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        num_heads=num_heads or default_num_heads(dim),
        num_layers=max(layers) + 1,
        in_channels=in_channels,
        out_channels=out_features // patch_volume,
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        patch_size=tuple(patch),
        cross_attn_norm="blocks.0.norm3.weight" in state_dict,
    )


def _config_from_json(config_json: Mapping, path: Path) -> tuple[WanConfig, str]:
    """Parse a config.json of either layout; returns the config and the naming it implies."""
    class_name = config_json.get("_class_name")
    try:
        if class_name == "WanTransformer3DModel" or "num_attention_heads" in config_json:
            return wan_config_from_diffusers(config_json), "diffusers"
        if class_name in ("WanModel", "CausalWanModel") or "dim" in config_json:
            return wan_config_from_original(config_json), "wan"
    except StreamT1Error as exc:
        raise StreamT1Error(f"{path}: {exc}") from None
    raise StreamT1Error(f"{path} is neither a diffusers WanTransformer3DModel nor an original Wan config")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StreamT1Error(f"cannot read {path}: {exc}") from None


# --------------------------------------------------------------------------------------------- readers

def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """One .safetensors file, or all shards named by a ``*.safetensors.index.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.name.endswith(".safetensors.index.json"):
        weight_map = _read_json(path).get("weight_map")
        require(isinstance(weight_map, dict) and weight_map, f"{path} has no weight_map")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(path.parent / shard))
        return tensors
    require(path.is_file(), f"no such file: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error type, or an OSError
        raise StreamT1Error(f"cannot read {path} as safetensors (is it a .safetensors file?): "
                            f"{' '.join(str(exc).split())}") from None


def read_torch(path: str | Path):
    """A torch checkpoint read with ``weights_only=True``: tensors and plain containers, never other objects."""
    path = Path(path)
    require(path.is_file(), f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        detail = f" (it references {culprit.group(1)})" if culprit else ""
        raise StreamT1Error(f"refusing to load {path}: it holds Python objects beyond tensors and plain "
                            f"containers, and only weights_only loading is allowed{detail}") from None
    except Exception as exc:
        raise StreamT1Error(f"cannot read torch file {path}: {type(exc).__name__}: {exc}") from None


def read_weights_file(path: str | Path):
    path = Path(path)
    if path.name.endswith((".safetensors", ".safetensors.index.json")):
        return read_safetensors(path)
    return read_torch(path)


def _tensor_dict(obj, what: str) -> dict[str, torch.Tensor]:
    require(isinstance(obj, Mapping), f"{what} is a {type(obj).__name__}, not a state dict")
    for name, value in obj.items():
        require(isinstance(value, torch.Tensor), f"{what} entry '{name}' is a {type(value).__name__}, not a tensor")
    return dict(obj)


def unwrap_generator(obj, use_ema: bool, what: str) -> dict[str, torch.Tensor]:
    """The generator state dict of a Self-Forcing / CausVid / LongLive checkpoint, or a bare state dict."""
    require(isinstance(obj, Mapping), f"{what} holds a {type(obj).__name__}, not a state dict")
    if "generator" in obj or "generator_ema" in obj:
        key = "generator_ema" if (use_ema and "generator_ema" in obj) or "generator" not in obj else "generator"
        return _tensor_dict(obj[key], f"{what}['{key}']")
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), Mapping):
            return _tensor_dict(obj[key], f"{what}['{key}']")
    if "generator_lora" in obj:
        raise StreamT1Error(f"{what} holds only LoRA weights; pass the base checkpoint as the source and this file "
                            "as lora=")
    return _tensor_dict(obj, what)


# --------------------------------------------------------------------------------------------- layouts

def _find_weights(directory: Path) -> Path:
    """The one weights file (or shard index) of a model folder, preferring diffusers/Wan names."""
    for pattern in ("diffusion_pytorch_model.safetensors.index.json", "*.safetensors.index.json",
                    "diffusion_pytorch_model.safetensors", "*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt"):
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            return found[0]
        require(not found, f"{directory} holds several weight files ({', '.join(p.name for p in found[:4])}); "
                           "pass the one to load")
    raise StreamT1Error(f"{directory} holds no weights (.safetensors, .pt, .pth)")


def _sibling_config(weights: Path) -> Path | None:
    """config.json next to a weights file, only where the file's name says it belongs to that config."""
    name = weights.name
    if name == STREAMT1_WEIGHTS and (weights.parent / STREAMT1_CONFIG).is_file():
        return weights.parent / STREAMT1_CONFIG
    if name.startswith("diffusion_pytorch_model") and (weights.parent / "config.json").is_file():
        return weights.parent / "config.json"
    return None


def read_checkpoint(path: str | Path, fmt: str = "auto", use_ema: bool = True):
    """(state dict in our names, config from the checkpoint's files or None, detected format)."""
    require(fmt in FORMATS, f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    require(path.exists(), f"no such file or directory: {path}")
    config_file = None
    if path.is_dir():
        if (path / STREAMT1_CONFIG).is_file():
            config_file, weights = path / STREAMT1_CONFIG, path / STREAMT1_WEIGHTS
            require(weights.is_file(), f"{path} has {STREAMT1_CONFIG} but no {STREAMT1_WEIGHTS}")
        elif not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            return read_checkpoint(path / "transformer", fmt, use_ema)  # a whole diffusers pipeline
        else:
            weights = _find_weights(path)
            config_file = path / "config.json" if (path / "config.json").is_file() else None
    else:
        weights = path
        config_file = _sibling_config(weights)

    raw = read_weights_file(weights)
    if weights.name.endswith(TORCH_SUFFIXES):
        raw = unwrap_generator(raw, use_ema, str(weights))
    state = strip_wrapper_prefixes(_tensor_dict(raw, str(weights)))

    config, naming = None, None
    if config_file is not None:
        config_json = _read_json(config_file)
        if config_file.name == STREAMT1_CONFIG:
            check_section_keys(WanConfig, config_json, str(config_file), required=REQUIRED_MODEL_KEYS)
            config, naming = build_config(WanConfig, config_json, str(config_file)), "streamt1"
        else:
            config, naming = _config_from_json(config_json, config_file)

    if fmt == "auto":
        detected = "diffusers" if _looks_diffusers(state) else (naming or _torch_or_wan(weights))
    else:
        detected = {"causvid": "self_forcing", "longlive": "self_forcing"}.get(fmt, fmt)
    if detected == "diffusers":
        state = convert_diffusers_state_dict(state)
    return state, config, detected


def _torch_or_wan(weights: Path) -> str:
    return "self_forcing" if weights.name.endswith(TORCH_SUFFIXES) else "wan"


def _resolve_source(source: str | Path) -> Path:
    """Local path as is; a hub id is fetched in two steps so only the DiT's files are downloaded."""
    text = str(source)
    local = Path(text).expanduser()
    if local.exists() or looks_local(text):
        return resolve_model_dir(text)
    snapshot = resolve_model_dir(text, allow_patterns=["*.json"])
    if (snapshot / STREAMT1_CONFIG).is_file():
        patterns = [STREAMT1_CONFIG, STREAMT1_WEIGHTS]
    elif (snapshot / "config.json").is_file():
        patterns = ["config.json", "diffusion_pytorch_model*"]
    elif (snapshot / "transformer" / "config.json").is_file():
        patterns = ["transformer/*"]
    else:
        raise StreamT1Error(f"hub repo '{text}' has no DiT config (config.json, transformer/config.json or "
                            f"{STREAMT1_CONFIG}); download the checkpoint file and pass its path")
    return resolve_model_dir(text, allow_patterns=patterns)


# --------------------------------------------------------------------------------------------- LoRA

def read_lora(source: str | Path) -> tuple[LoraFactors, float | None]:
    """The LoRA factors of a file or peft adapter folder (names stripped of wrapper prefixes) and a file-wide
    alpha when the file records one (``adapter_config.json``'s ``lora_alpha``, a training ``adapter.alpha``)."""
    path = resolve_model_dir(str(source))
    file_alpha = None
    if path.is_dir():
        adapter_config = path / "adapter_config.json"
        if adapter_config.is_file():
            file_alpha = _read_json(adapter_config).get("lora_alpha")
        path = _find_weights(path)
    obj = read_weights_file(path)
    require(isinstance(obj, Mapping), f"LoRA file {path} holds a {type(obj).__name__}, not a state dict")
    if "generator_lora" in obj:
        adapter = obj.get("adapter")
        if isinstance(adapter, Mapping) and adapter.get("alpha") is not None:
            file_alpha = adapter["alpha"]
        obj = obj["generator_lora"]
    weights = _tensor_dict(obj, f"LoRA file {path}")
    return parse_lora(weights, f"LoRA file {path}", rename=_strip_name), file_alpha


def _diffusers_module(name: str) -> str:
    return _diffusers_name(name + ".weight")[: -len(".weight")]


# --------------------------------------------------------------------------------------------- model

def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                shown = ", ".join(names[:MAX_LISTED_KEYS]) + (", ..." if len(names) > MAX_LISTED_KEYS else "")
                parts.append(f"{len(names)} {label} key{'s' if len(names) != 1 else ''} ({shown})")
        raise StreamT1Error(f"{what} does not match the model: {'; '.join(parts)}")
    for name, tensor in expected.items():
        got = tuple(state[name].shape)
        require(got == tuple(tensor.shape), f"{what}: shape mismatch for '{name}': checkpoint has {got}, "
                                            f"the model expects {tuple(tensor.shape)}")
    check_float_weights(expected, state, what)


def check_float_weights(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Floating-point weights stored as integers (or bools) are refused, never cast: the cast would load them
    without a word, and integer weights are a quantized or corrupt file, not values the model was trained with."""
    bad = [f"{name} ({str(state[name].dtype).removeprefix('torch.')})" for name, tensor in expected.items()
           if name in state and tensor.is_floating_point() and not state[name].is_floating_point()]
    if bad:
        shown = ", ".join(bad[:MAX_LISTED_KEYS]) + (", ..." if len(bad) > MAX_LISTED_KEYS else "")
        raise StreamT1Error(f"{what} stores {len(bad)} floating-point weight{'s' if len(bad) != 1 else ''} as "
                            f"integers ({shown}); refusing to cast them (a quantized or corrupt file?): save them as "
                            "float32, float16 or bfloat16")


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str) -> None:
    """One line naming the floating-point tensors that hold NaN or infinities (a corrupt or overflowed file)."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:MAX_LISTED_KEYS]) + (", ..." if len(bad) > MAX_LISTED_KEYS else "")
        raise StreamT1Error(f"{what} is corrupt: {len(bad)} tensor{'s' if len(bad) != 1 else ''} hold NaN or "
                            f"infinite values ({shown})")


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in its own 64-byte aligned memory. Tensors read from a safetensors file in their stored dtype are
    views at the file's offsets, and CPU matmuls on unaligned memory round differently: without this, the same
    weights saved in float32 and in float16 would not give bit-identical videos."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def load_dit(source, *, config: WanConfig | None = None, fmt: str = "auto", lora: str | None = None,
             lora_alpha: float | None = None, use_ema: bool = True, device="cpu", dtype=torch.float32,
             max_frames: int = 4096) -> CausalWanDiT:
    """Build a CausalWanDiT from ``source`` (path or hub id) with every weight checked, in eval mode.

    The config comes from ``config``, else the checkpoint's config file, else the tensor shapes.
    ``use_ema`` picks ``generator_ema`` over ``generator`` when a checkpoint has both (Self-Forcing's own
    inference uses the EMA weights; LongLive's and Stream-T1's configs load ``generator`` under their LoRA,
    i.e. use_ema=False). ``lora`` is merged with scale ``lora_alpha / rank`` as peft applies it; without
    ``lora_alpha`` the file's alpha is used, else alpha = rank. LongLive's LoRA files store no alpha: pass the
    ``adapter.alpha`` of the config it was trained with when that differs from its rank.
    """
    path = _resolve_source(source)
    state, file_config, _ = read_checkpoint(path, fmt=fmt, use_ema=use_ema)
    cfg = config or file_config or infer_wan_config(state)
    with torch.device("meta"):
        model = CausalWanDiT(cfg, max_frames=max_frames)
    _check_keys(model, state, f"checkpoint {path}")
    if lora is not None:
        factors, file_alpha = read_lora(lora)
        merge_lora(state, factors, alpha=lora_alpha if lora_alpha is not None else file_alpha,
                   resolve=_diffusers_module, device=device, what=f"LoRA {lora}")
    check_finite_weights(state, f"checkpoint {path}")
    state = {name: _aligned(tensor.to(device=device, dtype=dtype)) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    require(not left_on_meta, f"model tensors not covered by the checkpoint: {left_on_meta[:MAX_LISTED_KEYS]}")
    return model.eval().requires_grad_(False)


def save_dit(model: CausalWanDiT, directory: str | Path) -> Path:
    """Write our own format: ``dit.safetensors`` (original Wan names) + ``dit_config.json``."""
    from ..engine_format import save_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(directory / STREAMT1_WEIGHTS, model.state_dict(), metadata={"format": "streamt1"})
    (directory / STREAMT1_CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2, allow_nan=False) + "\n")
    return directory
