"""Residual add + row norm + adaLN modulation of a Wan block; ``naive`` defines the semantics."""
from __future__ import annotations

from .._backend import BackendUnavailableError, check_backend, require_module
from .naive import NORMS, modulation_term, residual_norm_naive

BACKENDS = ("torch", "triton")


def _triton_impl():
    require_module("triton", "triton")
    from .fused import residual_norm_triton as impl

    return impl


def __getattr__(name):
    # Lazy so that importing the package never needs triton.
    if name == "residual_norm_triton":
        return _triton_impl()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def residual_norm(x, y=None, gate=None, *, norm: str = "layer", weight=None, bias=None, scale=None, shift=None,
                  eps: float = 1e-6, backend: str = "torch"):
    """Returns (x', h); see :func:`residual_norm_naive`."""
    check_backend(backend, BACKENDS, "residual_norm")
    impl = residual_norm_naive if backend == "torch" else _triton_impl()
    return impl(x, y, gate, norm=norm, weight=weight, bias=bias, scale=scale, shift=shift, eps=eps)


# The fused names are served lazily by __getattr__ and left out of __all__ so that a star import
# never needs triton.
__all__ = ["BACKENDS", "NORMS", "BackendUnavailableError", "modulation_term", "residual_norm",
           "residual_norm_naive"]
