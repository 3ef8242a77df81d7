"""Candidate-batched attention over the shared paged KV cache; ``naive`` defines the semantics.

``paged_attention(..., backend=...)`` picks an implementation at call time so that triton, flash-attn and
xformers stay optional: importing this package needs only torch.
"""
from __future__ import annotations

from .._backend import BackendUnavailableError, check_backend, require_module
from .gathered import gather_rotated_kv, paged_attention_flash_attn, paged_attention_sdpa, paged_attention_xformers
from .naive import paged_attention_naive, rotated_page_keys

BACKENDS = ("torch", "triton", "sdpa", "flash_attn", "xformers")


def _triton_impl():
    require_module("triton", "triton")
    from .fused import paged_attention_triton as impl

    return impl


def __getattr__(name):
    # Lazy so that a missing triton only matters to callers that ask for the fused kernel.
    if name == "paged_attention_triton":
        return _triton_impl()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def paged_attention(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, page_frame_pos, frame_cos,
                    frame_sin, spatial_cos, spatial_sin, frame_tokens: int, scale: float | None = None, *,
                    backend: str = "torch"):
    """Dispatch to one backend; all share :func:`paged_attention_naive`'s signature and semantics."""
    check_backend(backend, BACKENDS, "paged_attention")
    impl = {
        "torch": paged_attention_naive,
        "sdpa": paged_attention_sdpa,
        "flash_attn": paged_attention_flash_attn,
        "xformers": paged_attention_xformers,
    }.get(backend)
    if impl is None:
        impl = _triton_impl()
    return impl(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, page_frame_pos, frame_cos,
                frame_sin, spatial_cos, spatial_sin, frame_tokens, scale)


# The fused names are served lazily by __getattr__ and left out of __all__ so that a star import
# never needs triton.
__all__ = ["BACKENDS", "BackendUnavailableError", "paged_attention", "paged_attention_naive",
           "paged_attention_sdpa", "paged_attention_flash_attn",
           "paged_attention_xformers", "gather_rotated_kv", "rotated_page_keys"]
