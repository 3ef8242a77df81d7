"""Run the Triton kernels in the interpreter when there is no GPU.

The variable must be set before the kernel modules are imported (``triton.jit`` reads it when a kernel is
defined), hence at module top rather than in a fixture.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
