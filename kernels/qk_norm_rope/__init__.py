"""Q/K RMS norm + half-layout permutation + RoPE; ``naive`` defines the semantics."""
from __future__ import annotations

from .._backend import BackendUnavailableError, check_backend, require_module
from .naive import qk_norm_rope_naive, rms_norm

BACKENDS = ("torch", "triton")


def _triton_impl():
    require_module("triton", "triton")
    from .fused import qk_norm_rope_triton as impl

    return impl


def __getattr__(name):
    # Lazy so that importing the package never needs triton.
    if name == "qk_norm_rope_triton":
        return _triton_impl()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def qk_norm_rope(q, k, q_weight, k_weight, eps: float, num_heads: int, cos, sin, *, backend: str = "torch"):
    """Returns (q_rot, k_pre, k_rot); see :func:`qk_norm_rope_naive`."""
    check_backend(backend, BACKENDS, "qk_norm_rope")
    impl = qk_norm_rope_naive if backend == "torch" else _triton_impl()
    return impl(q, k, q_weight, k_weight, eps, num_heads, cos, sin)


# The fused names are served lazily by __getattr__ and left out of __all__ so that a star import
# never needs triton.
__all__ = ["BACKENDS", "BackendUnavailableError", "qk_norm_rope", "qk_norm_rope_naive", "rms_norm"]
