"""Text encoders that turn prompts into the DiT's cross-attention context [B, text_len, text_dim].

``UMT5TextEncoder`` reproduces how Wan encodes prompts: umT5-XXL encoder states of the prompt padded to
``text_len`` tokens, zeroed past the prompt's real tokens. ``HashedTextEncoder`` is a weight-free stand-in
for tiny models before trained text weights exist. ``build_text_encoder`` picks one from a config spec.
"""
from __future__ import annotations

import hashlib
import html
import re
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .registry import ComponentRegistry, component_path
from .errors import StreamT1Error, require, require_packages
from .hub import resolve_model_dir

WAN_T5_GLOB = "models_t5_*.pth"  # the Wan repos' umT5 encoder weights, in Wan's own module names
WAN_TOKENIZER_DIR = Path("google") / "umt5-xxl"


def clean_prompt(prompt: str) -> str:
    """Wan's prompt cleaning (HTML entities, collapsed whitespace); empty prompts are an error."""
    require(isinstance(prompt, str), f"prompt must be a string, got {type(prompt).__name__}")
    text = re.sub(r"\s+", " ", html.unescape(html.unescape(prompt))).strip()
    if not text:
        raise StreamT1Error("prompt is empty")
    return text


def _prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    require(len(prompts) > 0, "no prompts given")
    return [clean_prompt(p) for p in prompts]


class UMT5TextEncoder:
    """A transformers ``UMT5EncoderModel`` and its tokenizer, used exactly as the Wan pipelines use them."""

    def __init__(self, model, tokenizer, text_len: int = 512, device="cpu", dtype: torch.dtype = torch.float32,
                 cache_size: int = 8):
        require(isinstance(text_len, int) and text_len > 0, f"text_len must be a positive int, got {text_len}")
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.text_len = text_len
        self.text_dim = int(model.config.d_model)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, text_len: int = 512, device="cpu",
                        dtype: torch.dtype = torch.float32, cache_size: int = 8) -> "UMT5TextEncoder":
        """Load from a transformers model dir, a diffusers pipeline dir (``text_encoder/`` + ``tokenizer/``),
        a Wan repo dir (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``), or a hub id of any."""
        location = resolve_model_dir(str(path_or_id))
        root = location.parent if location.is_file() else location
        encoder = cls(_load_umt5_model(location, dtype), _load_tokenizer(root), text_len=text_len, device=device,
                      dtype=dtype, cache_size=cache_size)
        encoder.source = str(path_or_id)
        return encoder

    source: str | None = None  # where from_pretrained read it: what a saved engine folder points at

    def save_pretrained(self, directory) -> dict:
        """The spec an engine folder stores: a reference to the source the encoder was loaded from (the umT5
        weights are not copied)."""
        require(self.source is not None, "cannot save a umT5 text encoder built without from_pretrained: its "
                                         "source is unknown")
        return {"type": "umt5", "path": self.source, "text_len": self.text_len, "cache_size": self.cache_size}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = _prompt_list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for prompt, states in zip(missing, self._encode_uncached(missing)):
                self._cache[prompt] = states
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        result = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > max(self.cache_size, 0):
            self._cache.popitem(last=False)
        return result

    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.text_len, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return (states * mask.unsqueeze(-1).to(states.dtype)).to(self.dtype)


def _load_umt5_model(location: Path, dtype: torch.dtype):
    """A Wan-format file, a pipeline's text_encoder/, a Wan repo (whose config.json is the DiT's) or a model dir."""
    if location.is_file():
        return load_wan_t5(location)
    if (location / "text_encoder" / "config.json").is_file():
        return _load_transformers_umt5(location / "text_encoder", dtype)
    wan_weights = sorted(location.glob(WAN_T5_GLOB))
    if wan_weights:
        return load_wan_t5(wan_weights[0])
    if (location / "config.json").is_file():
        return _load_transformers_umt5(location, dtype)
    raise StreamT1Error(f"no umT5 encoder in {location}: expected config.json, text_encoder/ or {WAN_T5_GLOB}")


def _load_transformers_umt5(folder: Path, dtype: torch.dtype):
    require_packages("the umT5 text encoder", "transformers")
    from transformers import UMT5EncoderModel

    try:
        return UMT5EncoderModel.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise StreamT1Error(f"cannot load the umT5 encoder from {folder}: {str(exc).splitlines()[0]}") from None


def _load_tokenizer(root: Path):
    require_packages("the umT5 text encoder", "transformers")
    from transformers import AutoTokenizer

    for folder in (root / "tokenizer", root / WAN_TOKENIZER_DIR, root):
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(folder)
            except (OSError, ValueError) as exc:
                raise StreamT1Error(f"cannot load the tokenizer from {folder}: {str(exc).splitlines()[0]}") from None
    raise StreamT1Error(f"no tokenizer in {root} (looked in tokenizer/, {WAN_TOKENIZER_DIR.as_posix()}/ and the dir)")


_WAN_T5_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # gelu(gate(x)) * fc1(x), as T5's gated-gelu
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_t5_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan's umT5 encoder weights (token_embedding, blocks.N.*, norm) to transformers' UMT5 names."""
    converted = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key == "token_embedding.weight":
            converted["shared.weight"] = converted["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            converted["encoder.final_layer_norm.weight"] = value
        elif match and match.group(2) in _WAN_T5_BLOCK_KEYS:
            converted[f"encoder.block.{match.group(1)}.{_WAN_T5_BLOCK_KEYS[match.group(2)]}"] = value
        else:
            raise StreamT1Error(f"unexpected key in a Wan umT5 checkpoint: {key}")
    return converted


def load_wan_t5(path: Path):
    """A ``UMT5EncoderModel`` from a Wan-format checkpoint; its shape is read off the weights."""
    require_packages("the umT5 text encoder", "transformers")
    from transformers import UMT5Config, UMT5EncoderModel

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt or foreign files raise many types; the user only needs the reason
        raise StreamT1Error(f"cannot read umT5 weights {path}: {str(exc).splitlines()[0]}") from None
    state = wan_t5_to_transformers(state)
    require("shared.weight" in state and "encoder.block.0.layer.0.SelfAttention.q.weight" in state,
            f"{path} is not a Wan umT5 encoder checkpoint")
    vocab, dim = state["shared.weight"].shape
    num_buckets, num_heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    config = UMT5Config(
        vocab_size=vocab, d_model=dim, num_heads=num_heads,
        d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // num_heads,
        d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=len({k.split(".")[2] for k in state if k.startswith("encoder.block.")}),
        relative_attention_num_buckets=num_buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise StreamT1Error(f"{path} does not match a umT5 encoder: {str(exc).splitlines()[0]}") from None
    model.tie_weights()  # assign=True gave the shared and encoder embeddings separate parameters
    return model


_TOKEN = re.compile(r"\w+|[^\w\s]")


@lru_cache(maxsize=8192)
def _word_vector(word: str, dim: int, seed: int) -> torch.Tensor:
    """A unit vector fixed by (seed, word): Gaussian via Box-Muller over SHAKE-256 bytes, stable everywhere."""
    pairs = (dim + 1) // 2
    stream = hashlib.shake_256(f"{seed}\x00{word}".encode("utf-8")).digest(8 * pairs)
    uniform = (np.frombuffer(stream, dtype="<u4").astype(np.float64) + 0.5) / 2.0 ** 32
    radius = np.sqrt(-2.0 * np.log(uniform[0::2]))
    angle = 2.0 * np.pi * uniform[1::2]
    gaussian = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:dim]
    return torch.from_numpy(gaussian / np.linalg.norm(gaussian)).float()


class HashedTextEncoder:
    """Weight-free, deterministic encoder: one fixed pseudo-random unit vector per lower-cased word."""

    def __init__(self, text_dim: int, text_len: int, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
        require(isinstance(text_dim, int) and text_dim > 0, f"text_dim must be a positive int, got {text_dim}")
        require(isinstance(text_len, int) and text_len > 0, f"text_len must be a positive int, got {text_len}")
        self.text_dim = text_dim
        self.text_len = text_len
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype

    def save_pretrained(self, directory) -> dict:
        """Weight-free: the spec alone rebuilds it."""
        return {"type": "hashed", "text_dim": self.text_dim, "text_len": self.text_len, "seed": self.seed}

    def tokens(self, prompt: str) -> list[str]:
        """Lower-cased words and punctuation marks, at most ``text_len``."""
        return _TOKEN.findall(clean_prompt(prompt).lower())[: self.text_len]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = _prompt_list(prompts)
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        for row, prompt in enumerate(prompts):
            for position, word in enumerate(self.tokens(prompt)):
                out[row, position] = _word_vector(word, self.text_dim, self.seed)
        return out.to(device=self.device, dtype=self.dtype)


TEXT_ENCODERS = ComponentRegistry("text encoder")
register_text_encoder = TEXT_ENCODERS.register
build_text_encoder = TEXT_ENCODERS.build


def _build_umt5(spec, base_dir, device, dtype):
    return UMT5TextEncoder.from_pretrained(component_path(spec, base_dir), text_len=spec.get("text_len", 512),
                                           device=device, dtype=dtype, cache_size=spec.get("cache_size", 8))


def _build_hashed(spec, base_dir, device, dtype):
    require("text_dim" in spec and "text_len" in spec, "a 'hashed' text encoder spec needs text_dim and text_len")
    return HashedTextEncoder(spec["text_dim"], spec["text_len"], seed=spec.get("seed", 0), device=device, dtype=dtype)


register_text_encoder("umt5", _build_umt5, builtin=True)
register_text_encoder("hashed", _build_hashed, builtin=True)
