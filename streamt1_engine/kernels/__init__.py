"""Fused Triton kernels of streamt1-engine, each with a plain-PyTorch reference beside it.

The op packages (``paged_attention``, ``qk_norm_rope``, ``residual_norm``, ``sink_merge``) live in the
repository's top-level ``kernels/`` folder, which has no ``__init__.py`` on purpose: a regular package named
``kernels`` there would shadow Hugging Face's ``kernels`` (which transformers imports) for anyone running from
a checkout. An install copies the op packages here; in a checkout they are found through ``__path__``. Every
``fused.py`` has a ``naive.py`` that defines its semantics.
"""
from pathlib import Path

_OPS_IN_CHECKOUT = Path(__file__).resolve().parents[2] / "kernels"
if not (Path(__file__).parent / "paged_attention").is_dir() and (_OPS_IN_CHECKOUT / "paged_attention").is_dir():
    __path__.append(str(_OPS_IN_CHECKOUT))
