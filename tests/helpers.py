"""Small builders shared by the tests: tiny models, caches and page bookkeeping."""
from __future__ import annotations

import torch

from streamt1_engine.cache import BeamPages, PagedKVCache, RouteFlag
from streamt1_engine.config import StreamConfig, WanConfig
from streamt1_engine.model.wan import CausalWanDiT


def tiny_model(seed: int = 0, **overrides) -> CausalWanDiT:
    torch.manual_seed(seed)
    cfg = WanConfig.tiny(**overrides)
    model = CausalWanDiT(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so attention patterns matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def text_context(model: CausalWanDiT, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return model.encode_text(torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g))


def make_cache(model: CausalWanDiT, stream: StreamConfig, num_pages: int = 32) -> PagedKVCache:
    return PagedKVCache(model.config, stream, num_pages, torch.device("cpu"), torch.float32)


__all__ = ["BeamPages", "RouteFlag", "tiny_model", "text_context", "make_cache"]
