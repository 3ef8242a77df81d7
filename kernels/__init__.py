"""Fused Triton kernels of streamt1-engine, each with a plain-PyTorch reference beside it.

Installed as ``streamt1_engine.kernels``; every ``fused.py`` has a ``naive.py`` that defines its semantics.
"""
