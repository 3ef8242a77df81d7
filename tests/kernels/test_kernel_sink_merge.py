"""Fused sink merge against the reference: in-place and copy-on-write EMA, mixed and chained ops, keys
rotated by each op's frame offset (forwards and backwards)."""
import pytest
import torch

from kernel_testutil import DEVICE, HAS_CUDA, random_tables
from streamt1_engine.kernels.sink_merge import APPEND, DISCARD, EMA, sink_merge_, sink_merge_naive_

ALPHA = 0.37


def make_pools(dtype, layers=2, pages=8, t=12, h=2, d=16, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, pages, t, h, d, generator=gen).to(device, dtype)
    v = torch.randn(layers, pages, t, h, d, generator=gen).to(device, dtype)
    pos = (torch.arange(pages, dtype=torch.int32) * 3 + 1).to(device)
    fc, fs = random_tables(64, d // 2, gen, device)  # rows past 64 frames clamp (offset 25 * 3 + ...)
    return k, v, pos, fc, fs


def with_offsets(rows, pos):
    """Append the frame-offset column the cache computes on the host (sink frame - evicted frame), following
    the frame positions that earlier EMA ops give their destinations."""
    frames = [int(p) for p in pos]
    out = []
    for mode, evicted, sink, dst in rows:
        out.append([mode, evicted, sink, dst, frames[sink] - frames[evicted]])
        if mode == EMA:
            frames[dst] = frames[sink]
    return out


def run_both(ops_rows, dtype, **kw):
    from streamt1_engine.kernels.sink_merge.fused import sink_merge_triton_

    k, v, pos, fc, fs = make_pools(dtype, **kw)
    ops = torch.tensor(with_offsets(ops_rows, pos), dtype=torch.int32, device=k.device).reshape(-1, 5)
    ref = (k.clone(), v.clone(), pos.clone())
    sink_merge_naive_(*ref, ops, ALPHA, fc, fs)
    got = (k.clone(), v.clone(), pos.clone())
    sink_merge_triton_(*got, ops, ALPHA, fc, fs)
    return (k, v, pos), ref, got


def check(ref, got, dtype):
    # float32: the rotation's multiply-adds may fuse differently on a GPU (exact in the interpreter)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
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
    # Values blend as they are; keys are first rotated by the frame offset (page 0 at frame 1, page 5 at 16).
    blend = ALPHA * orig[1][:, 0].float() + (1 - ALPHA) * orig[1][:, 5].float()
    torch.testing.assert_close(got[1][:, 0].float(), blend, atol=1e-2, rtol=1e-2)
    assert not torch.allclose(got[0][:, 0].float(), ALPHA * orig[0][:, 0].float() + (1 - ALPHA) * orig[0][:, 5].float(),
                              atol=1e-2, rtol=1e-2)


def test_key_rotation_by_frame_offset_is_a_rotation_of_pairs():
    """The merged key equals the blend with the evicted key rotated pairwise (i, i + D/2) by the offset's angle,
    including a negative offset (sink older than the evicted page) and a clamped one (past the table)."""
    from streamt1_engine.kernels.sink_merge import frame_rotation, rotate_half_layout

    k, v, pos, fc, fs = make_pools(torch.float32)
    for evicted, sink, offset in [(5, 0, -15), (2, 6, 12), (1, 7, 300)]:
        ops = torch.tensor([[EMA, evicted, sink, sink, offset]], dtype=torch.int32)
        got = k.clone()
        sink_merge_naive_(got, v.clone(), pos.clone(), ops, ALPHA, fc, fs)
        row = min(abs(offset), fc.shape[0] - 1)
        c, s = fc[row], fs[row] * (1 if offset >= 0 else -1)
        half = k.shape[-1] // 2
        lo, hi = k[:, evicted, ..., :half], k[:, evicted, ..., half:]
        moved = torch.cat([lo * c - hi * s, lo * s + hi * c], -1)
        torch.testing.assert_close(got[:, sink], ALPHA * k[:, sink] + (1 - ALPHA) * moved, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rotate_half_layout(k[:, evicted], *frame_rotation(offset, fc, fs)), moved)
        # norms per pair are preserved: a rotation, not a scaling
        torch.testing.assert_close(lo ** 2 + hi ** 2, moved[..., :half] ** 2 + moved[..., half:] ** 2)


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
    k, v, pos, fc, fs = make_pools(torch.float32)
    ops = torch.tensor([[EMA, 5, 0, 0, -15]], dtype=torch.int32, device=k.device)
    ref = (k.clone(), v.clone(), pos.clone())
    sink_merge_(*ref, ops, ALPHA, fc, fs, backend="torch")
    sink_merge_(k, v, pos, ops, ALPHA, fc, fs, backend="triton")
    check(ref, (k, v, pos), torch.float32)
    with pytest.raises(ValueError):
        sink_merge_(k, v, pos, ops, ALPHA, fc, fs, backend="cuda")


def test_triton_rejects_four_column_ops():
    from streamt1_engine.kernels.sink_merge.fused import sink_merge_triton_

    k, v, pos, fc, fs = make_pools(torch.float32)
    with pytest.raises(ValueError, match=r"\[M, 5\]"):
        sink_merge_triton_(k, v, pos, torch.tensor([[EMA, 5, 0, 0]], dtype=torch.int32), ALPHA, fc, fs)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_realistic_bf16():
    ops = [[EMA, 5, 0, 0], [DISCARD, 3, 0, 0], [EMA, 6, 1, 7], [EMA, 4, 0, 0]]
    orig, ref, got = run_both(ops, torch.bfloat16, layers=30, t=4680, h=12, d=128)
    check(ref, got, torch.bfloat16)
