"""The one LoRA merge path, shared by every loader that folds adapters into dense weights (the DiT, the reward
models).

peft scales an adapter's update by ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), so a merged weight is
``W + scale * B @ A``. Files that store no alpha (LongLive's) need the training-time alpha from the user;
LongLive's own code falls back to alpha = rank, i.e. scale 1.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import StreamT1Error, require

# peft's ``lora_A`` / ``lora_B`` (with or without an adapter name) and kohya's ``lora_down`` / ``lora_up``
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")


def lora_scale(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """peft's scaling of a rank-``rank`` adapter: ``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA);
    ``alpha=None`` means alpha = rank."""
    require(isinstance(rank, int) and rank > 0, f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is None:
        alpha = rank
    require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0,
            f"LoRA alpha must be a positive number, got {alpha!r}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                  device=None) -> torch.Tensor:
    """``weight + scale * b @ a`` computed in float32 (on ``device`` when given); a [rank, in], b [out, rank]."""
    return weight.to(device, torch.float32) + scale * (b.to(device, torch.float32) @ a.to(device, torch.float32))


@dataclass
class LoraFactors:
    """A parsed LoRA: ``pairs[module] = (A [rank, in], B [out, rank])`` and per-module alphas (kohya's
    ``.alpha`` entries; peft files keep their alpha in ``adapter_config.json`` instead)."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)


def parse_lora(state: Mapping[str, torch.Tensor], what: str = "LoRA",
               rename: Callable[[str], str] | None = None) -> LoraFactors:
    """Group a LoRA state dict's entries by target module; ``rename`` maps each key first (e.g. strips wrapper
    prefixes). An entry that is no LoRA factor or alpha, a lone factor, a repeated factor or a mix of several
    adapters is an error naming it."""
    require(len(state) > 0, f"{what} is empty")
    sides: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    adapters = set()
    for name, tensor in state.items():
        require(isinstance(tensor, torch.Tensor), f"{what} entry '{name}' is a {type(tensor).__name__}, not a tensor")
        key = rename(name) if rename is not None else name
        if m := _FACTOR_KEY.match(key):
            adapters.add(m.group("adapter") or "default")
            side = "A" if m.group("kind") in ("lora_A", "lora_down") else "B"
            require(side not in sides.setdefault(m.group("module"), {}), f"{what} repeats '{name}'")
            require(tensor.dim() == 2, f"{what} entry '{name}' has shape {tuple(tensor.shape)}, LoRA factors are 2-D")
            sides[m.group("module")][side] = tensor
        elif m := _ALPHA_KEY.match(key):
            require(tensor.numel() == 1, f"{what} entry '{name}' is not a scalar alpha")
            alphas[m.group("module")] = float(tensor)
        else:
            raise StreamT1Error(f"{what}: unsupported entry '{name}' (expected lora_A/lora_B weights)")
    require(len(adapters) <= 1, f"{what} mixes several adapters: {sorted(adapters)}")
    pairs = {}
    for module, found in sides.items():
        require(set(found) == {"A", "B"},
                f"{what}: '{module}' has only lora_{''.join(found)}, both factors are needed")
        a, b = found["A"], found["B"]
        require(b.shape[1] == a.shape[0], f"{what}: the factors of '{module}' disagree on the rank "
                                          f"(A {tuple(a.shape)}, B {tuple(b.shape)})")
        pairs[module] = (a, b)
    stray = sorted(set(alphas) - set(pairs))
    require(not stray, f"{what}: alpha entries for modules without factors: {stray}")
    return LoraFactors(pairs, alphas)


def peft_base_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense weights of a peft-wrapped model's full state dict: ``base_model.model.`` and ``.base_layer.``
    dropped, a ``modules_to_save`` copy in place of its original, LoRA factors left out (peft keeps the alpha in
    its config, so a parameter named ``alpha`` is a model weight here)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")
        if _FACTOR_KEY.match(key) or ".original_module." in key:
            continue
        out[re.sub(r"\.modules_to_save\.[^.]+\.", ".", key.replace(".base_layer.", "."))] = value
    return out


def peft_lora_entries(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA factors of a peft-wrapped model's full state dict, ``base_model.model.`` dropped."""
    return {key.removeprefix("base_model.model."): value for key, value in state.items()
            if _FACTOR_KEY.match(key.removeprefix("base_model.model."))}


def merge_lora(target: nn.Module | MutableMapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor] | LoraFactors,
               *, alpha: float | None = None, rslora: bool = False, rank: int | None = None,
               resolve: Callable[[str], str] | None = None, device=None, what: str = "LoRA") -> list[str]:
    """Fold ``lora`` into the linear layers of ``target`` as peft merges an adapter: ``W += scale * B @ A`` with
    ``scale = alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA), computed in float32. ``alpha`` (the user's or
    the adapter config's ``lora_alpha``) wins over per-module alphas, which win over alpha = rank; ``rank``,
    when given (a config's ``r``), must be every factor's rank.

    ``target``: an ``nn.Module`` (its ``nn.Linear`` weights are updated in place, keeping their dtype), or a
    state dict ``{name: tensor}`` (each ``<module>.weight`` is replaced by the float32 merged weight, on
    ``device`` when given). ``resolve`` maps a LoRA target name the model does not have to one it has (e.g.
    diffusers names). A target that is not a linear layer, or whose factors do not fit its weight, is an error.
    Returns the merged module names."""
    factors = lora if isinstance(lora, LoraFactors) else parse_lora(lora, what)
    is_module = isinstance(target, nn.Module)
    if is_module:
        linears = {name: m.weight for name, m in target.named_modules() if isinstance(m, nn.Linear)}
    else:
        linears = {key[: -len(".weight")]: t for key, t in target.items()
                   if key.endswith(".weight") and isinstance(t, torch.Tensor) and t.dim() == 2}
    merged = []
    for name, (a, b) in factors.pairs.items():
        module = name if name in linears or resolve is None else resolve(name)
        require(module in linears, f"{what} target '{name}' is not a linear layer of the model")
        weight = linears[module]
        r = a.shape[0]
        require(rank is None or r == rank, f"{what} of '{module}' has rank {r}, its config says r={rank}")
        require(a.shape[1] == weight.shape[1] and b.shape[0] == weight.shape[0],
                f"{what} factors of '{module}' (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit its weight "
                f"{tuple(weight.shape)}")
        module_alpha = alpha if alpha is not None else factors.alphas.get(name, r)
        new = merged_weight(weight, a, b, lora_scale(module_alpha, r, rslora), device=device)
        if is_module:
            with torch.no_grad():
                weight.copy_(new.to(weight.dtype))
        else:
            target[f"{module}.weight"] = new
        merged.append(module)
    return merged
