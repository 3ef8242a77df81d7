"""Turn a user-given model location into a local path: a file or folder as is, else a Hugging Face hub id.

Downloads go through ``huggingface_hub.snapshot_download`` so its cache is reused; with ``HF_HUB_OFFLINE``
set only that cache is consulted, and a miss fails at once instead of waiting on the network.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import StreamT1Error

_TRUE_VALUES = {"1", "on", "yes", "true"}
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json")


def hub_offline() -> bool:
    """Read the offline switch now, not at import time, so a late ``HF_HUB_OFFLINE=1`` still counts."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE_VALUES


def looks_local(path_or_hub_id: str) -> bool:
    """True for strings that can only mean a path (hub ids are plain ``org/name``)."""
    text = path_or_hub_id
    if text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text in (".", ".."):
        return True
    if "\\" in text or text.count("/") > 1 or text.lower().endswith(_WEIGHT_SUFFIXES):
        return True
    parent = Path(text).parent
    return str(parent) not in ("", ".") and parent.exists()


def resolve_model_dir(path_or_hub_id: str, allow_patterns=None) -> Path:
    """Local file/folder -> that path; otherwise download (or find in the cache) the hub repo's snapshot."""
    text = str(path_or_hub_id).strip()
    if not text:
        raise StreamT1Error("empty model path or hub id")
    local = Path(text).expanduser()
    if local.exists():
        return local
    if looks_local(text):
        raise StreamT1Error(f"no such file or directory: {text}")
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(text, allow_patterns=allow_patterns, local_files_only=hub_offline())
    except Exception as exc:  # offline, unknown repo, invalid id, network: all end the same way for the user
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise StreamT1Error(f"cannot load '{text}': not a local path and the hub download failed (offline?): "
                            f"{type(exc).__name__}: {reason}") from None
    return Path(snapshot)
