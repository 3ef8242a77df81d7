"""Fused sink merge against the reference: in-place and copy-on-write EMA, mixed and chained ops."""
import pytest
import torch

from kernel_testutil import DEVICE, HAS_CUDA
from streamt1_engine.kernels.sink_merge import APPEND, DISCARD, EMA, sink_merge_, sink_merge_naive_

ALPHA = 0.37


def make_pools(dtype, layers=2, pages=8, t=12, h=2, d=16, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, pages, t, h, d, generator=gen).to(device, dtype)
    v = torch.randn(layers, pages, t, h, d, generator=gen).to(device, dtype)
    pos = (torch.arange(pages, dtype=torch.int32) * 3 + 1).to(device)
    return k, v, pos


def run_both(ops_rows, dtype, **kw):
    from streamt1_engine.kernels.sink_merge.fused import sink_merge_triton_

    k, v, pos = make_pools(dtype, **kw)
    ops = torch.tensor(ops_rows, dtype=torch.int32, device=k.device).reshape(-1, 4)
    ref = (k.clone(), v.clone(), pos.clone())
    sink_merge_naive_(*ref, ops, ALPHA)
    got = (k.clone(), v.clone(), pos.clone())
    sink_merge_triton_(*got, ops, ALPHA)
    return (k, v, pos), ref, got


def check(ref, got, dtype):
    tol = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    assert torch.equal(got[2], ref[2])


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_ema_in_place(dtype):
    orig, ref, got = run_both([[EMA, 5, 0, 0]], dtype)
    check(ref, got, dtype)
    untouched = [p for p in range(8) if p != 0]
    assert torch.equal(got[0][:, untouched], orig[0][:, untouched])
    assert torch.equal(got[1][:, untouched], orig[1][:, untouched])
    blend = ALPHA * orig[0][:, 0].float() + (1 - ALPHA) * orig[0][:, 5].float()
    torch.testing.assert_close(got[0][:, 0].float(), blend, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_ema_copy_on_write(dtype):
    orig, ref, got = run_both([[EMA, 4, 1, 6]], dtype)
    check(ref, got, dtype)
    assert torch.equal(got[0][:, 1], orig[0][:, 1]) and torch.equal(got[1][:, 1], orig[1][:, 1])
    assert int(got[2][6]) == int(orig[2][1])
    keep = [0, 2, 3, 4, 5, 7]
    assert torch.equal(got[0][:, keep], orig[0][:, keep]) and torch.equal(got[2][keep], orig[2][keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_mixed_modes_and_chains(dtype):
    ops = [[DISCARD, 3, 0, 0],
           [EMA, 5, 0, 0],        # in place
           [APPEND, 2, 0, 2],
           [EMA, 6, 1, 7],        # copy-on-write
           [EMA, 4, 0, 0],        # chained: reads the result of op 1
           [EMA, 3, 7, 2]]        # chained: sink is op 3's destination
    orig, ref, got = run_both(ops, dtype, layers=3, t=20, d=32)
    check(ref, got, dtype)
    untouched = [3, 4, 5, 6]
    assert torch.equal(got[0][:, untouched], orig[0][:, untouched])
    assert torch.equal(got[1][:, untouched], orig[1][:, untouched])


def test_no_ema_rows_changes_nothing():
    orig, ref, got = run_both([[DISCARD, 1, 0, 0], [APPEND, 2, 0, 2]], torch.float32)
    for a, b in zip(got, orig):
        assert torch.equal(a, b)


def test_empty_ops():
    orig, ref, got = run_both([], torch.float32)
    for a, b in zip(got, orig):
        assert torch.equal(a, b)


def test_dispatch_triton():
    k, v, pos = make_pools(torch.float32)
    ops = torch.tensor([[EMA, 5, 0, 0]], dtype=torch.int32, device=k.device)
    ref = (k.clone(), v.clone(), pos.clone())
    sink_merge_(*ref, ops, ALPHA, backend="torch")
    sink_merge_(k, v, pos, ops, ALPHA, backend="triton")
    check(ref, (k, v, pos), torch.float32)
    with pytest.raises(ValueError):
        sink_merge_(k, v, pos, ops, ALPHA, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_realistic_bf16():
    ops = [[EMA, 5, 0, 0], [DISCARD, 3, 0, 0], [EMA, 6, 1, 7], [EMA, 4, 0, 0]]
    orig, ref, got = run_both(ops, torch.bfloat16, layers=30, t=4680, h=12, d=128)
    check(ref, got, torch.bfloat16)
