"""Shared builders for the kernel tests."""
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def assert_close(actual, expected, dtype):
    assert torch.isfinite(actual.float()).all(), "non-finite output (unwritten element?)"
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def random_tables(rows, half, gen, device=DEVICE):
    """cos/sin of random angles: stricter than real RoPE tables at catching a wrong row or column."""
    ang = torch.rand(rows, half, generator=gen, dtype=torch.float64) * 6.3
    return ang.cos().float().to(device), ang.sin().float().to(device)
