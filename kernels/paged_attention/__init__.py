"""Candidate-batched attention over the shared paged KV cache; ``naive`` defines the semantics.

``paged_attention(..., backend=...)`` picks an implementation at call time so that triton, flash-attn and
xformers stay optional: importing this package needs only torch. Every backend reads the same pool of keys
rotated at their positions. ``naive_rope`` / ``fused_rope`` (the previous pre-RoPE layout) are kept one
release for the kernel-level A/B in ``bench/bench_attention.py`` (backend ``triton_rope`` there).
"""
from __future__ import annotations

from .._backend import BackendUnavailableError, check_backend, require_module
from .gathered import gather_kv, paged_attention_flash_attn, paged_attention_sdpa, paged_attention_xformers
from .naive import paged_attention_naive, valid_page_slots

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


def paged_attention(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale: float | None = None, *,
                    backend: str = "torch", max_pages: int | None = None, row_pages: tuple[int, ...] | None = None):
    """Dispatch to one backend; all share :func:`paged_attention_naive`'s signature and semantics.

    ``max_pages``: host int >= every ``num_pages`` entry (the longest beam), or None for the table width.
    ``row_pages``: host copy of ``num_pages``; the torch path then attends each row over exactly its pages
    (batch invariant); the other backends are per row already and ignore it.
    """
    check_backend(backend, BACKENDS, "paged_attention")
    if backend == "torch" and row_pages is not None:
        return paged_attention_naive(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale,
                                     row_pages=row_pages)
    impl = {
        "torch": paged_attention_naive,
        "sdpa": paged_attention_sdpa,
        "flash_attn": paged_attention_flash_attn,
        "xformers": paged_attention_xformers,
    }.get(backend)
    if impl is None:
        impl = _triton_impl()
    return impl(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale, max_pages=max_pages)


# The fused names are served lazily by __getattr__ and left out of __all__ so that a star import
# never needs triton.
__all__ = ["BACKENDS", "BackendUnavailableError", "paged_attention", "paged_attention_naive",
           "paged_attention_sdpa", "paged_attention_flash_attn", "paged_attention_xformers", "gather_kv",
           "valid_page_slots"]
