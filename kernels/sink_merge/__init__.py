"""Memory-sink merge of evicted pages; ``naive`` defines the semantics, ``fused`` is one Triton launch."""
from __future__ import annotations

from .._backend import BackendUnavailableError, check_backend, require_module
from .naive import APPEND, DISCARD, EMA, frame_rotation, rotate_half_layout, sink_merge_naive_

BACKENDS = ("torch", "triton")


def _triton_impl():
    require_module("triton", "triton")
    from .fused import sink_merge_triton_ as impl

    return impl


def __getattr__(name):
    # Lazy so that importing the package never needs triton.
    if name == "sink_merge_triton_":
        return _triton_impl()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sink_merge_(k_pool, v_pool, page_frame_pos, ops, alpha: float, frame_cos, frame_sin, *,
                backend: str = "torch") -> None:
    """In place; see :func:`sink_merge_naive_`. The torch backend reads ``ops`` on the host."""
    check_backend(backend, BACKENDS, "sink_merge_")
    impl = sink_merge_naive_ if backend == "torch" else _triton_impl()
    impl(k_pool, v_pool, page_frame_pos, ops, alpha, frame_cos, frame_sin)


# The fused names are served lazily by __getattr__ and left out of __all__ so that a star import
# never needs triton.
__all__ = ["APPEND", "BACKENDS", "BackendUnavailableError", "DISCARD", "EMA", "frame_rotation",
           "rotate_half_layout", "sink_merge_", "sink_merge_naive_"]
