"""A tiny trainable text encoder for the procedural prompt grammar.

Word-level tokens (unknown words map to one ``<unk>`` token, so any prompt encodes), an embedding with
learned positions and a small pre-norm transformer; the output is zero past each prompt's length, as the
engine's TextEncoder protocol asks (Wan pads its umT5 context the same way).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..errors import StreamT1Error, require
from .procedural import VOCABULARY, tokenize

PAD, UNK = "<pad>", "<unk>"


TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"


class TinyTextEncoder(nn.Module):
    def __init__(self, vocabulary: tuple[str, ...] = VOCABULARY, text_dim: int = 64, text_len: int = 16,
                 num_layers: int = 2, num_heads: int = 4, ffn_dim: int = 128):
        super().__init__()
        self.vocabulary = tuple(vocabulary)
        self.index = {word: i + 2 for i, word in enumerate(self.vocabulary)}  # 0 = pad, 1 = unk
        self.text_dim, self.text_len = text_dim, text_len
        self.num_layers, self.num_heads, self.ffn_dim = num_layers, num_heads, ffn_dim
        self.token_embedding = nn.Embedding(len(self.vocabulary) + 2, text_dim)
        self.position_embedding = nn.Parameter(torch.randn(text_len, text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(text_dim, num_heads, ffn_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(text_dim)

    def config(self) -> dict:
        return {"vocabulary": list(self.vocabulary), "text_dim": self.text_dim, "text_len": self.text_len,
                "num_layers": self.num_layers, "num_heads": self.num_heads, "ffn_dim": self.ffn_dim}

    def save_pretrained(self, directory) -> dict:
        """Write ``text_encoder.safetensors`` into an engine folder; returns the spec that loads it."""
        save_tiny_text_encoder(self, os.path.join(os.fspath(directory), TEXT_ENCODER_WEIGHTS))
        return {"type": "tiny", "weights": TEXT_ENCODER_WEIGHTS, **self.config()}

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, text_len] and a bool mask of real tokens; prompts longer than text_len are cut."""
        ids = torch.zeros(len(prompts), self.text_len, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = tokenize(prompt)[: self.text_len] or [UNK]
            ids[row, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words])
        return ids, ids != 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        x = self.layers(x, src_key_padding_mask=~mask)
        return self.norm(x) * mask[..., None]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, text_len, text_dim] float, zero past each prompt's length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        device = self.token_embedding.weight.device
        ids, mask = self.token_ids(list(prompts))
        with torch.no_grad():
            return self(ids.to(device), mask.to(device))


def load_tiny_text_encoder(spec: dict, base_dir: str | os.PathLike | None = None, device="cpu",
                           dtype=torch.float32) -> TinyTextEncoder:
    """Build from a ``text_encoder`` config entry: architecture keys plus ``weights`` (a safetensors file
    relative to ``base_dir``; without it the encoder keeps its random initialisation)."""
    from ..model.loading import check_float_weights, read_safetensors

    arch = {k: spec[k] for k in ("text_dim", "text_len", "num_layers", "num_heads", "ffn_dim") if k in spec}
    if "vocabulary" in spec:
        arch["vocabulary"] = tuple(spec["vocabulary"])
    try:
        encoder = TinyTextEncoder(**arch)
    except (TypeError, ValueError, AssertionError) as err:
        raise StreamT1Error(f"bad tiny text encoder config: {err}") from None
    weights = spec.get("weights")
    if weights:
        path = os.path.join(os.fspath(base_dir or "."), weights)
        require(os.path.isfile(path), f"tiny text encoder weights not found: {path}")
        state = read_safetensors(path)  # a file of another kind is one line, not safetensors' traceback
        check_float_weights(encoder.state_dict(), state, f"tiny text encoder weights {path}")
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        require(not missing and not unexpected,
                f"tiny text encoder weights do not match the config (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})")
    return encoder.to(device=device, dtype=dtype).eval()


def save_tiny_text_encoder(encoder: TinyTextEncoder, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}, os.fspath(path),
              metadata={"config": json.dumps(encoder.config(), allow_nan=False)})


def _register() -> None:
    """Make ``{"type": "tiny"}`` buildable by the engine; harmless when the registry is not there yet."""
    try:
        from ..text_encoders import register_text_encoder
    except ImportError:
        return
    register_text_encoder("tiny", load_tiny_text_encoder)


_register()
