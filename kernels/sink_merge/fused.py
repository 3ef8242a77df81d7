"""Triton memory-sink merge: one launch for every op, layer, K/V and page element.

Each program owns the same element range of every page and applies the ops in order, so chained ops (an op
whose sink or evicted page is an earlier op's ``dst``) keep the sequential semantics of the reference, and an
in-place blend (``dst == sink``) reads each element before the same thread overwrites it. ``ops`` stays on
the device (mode is read in-kernel), so the launch needs no host sync and can be captured in a CUDA graph.
The frame offset of each op comes from the host (``ops`` column 4), not from ``page_frame_pos``: that is
written by the first program while others run, so reading it here would race with chained ops.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .naive import EMA

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_BLOCK = 256 if _INTERPRET else 2048


@triton.jit
def _sink_merge_kernel(
    KP, VP, PFP, OPS, FC, FS,
    s_kl, s_kp, s_vl, s_vp, s_om, s_oc, s_fr, s_fd,
    num_ops, E, F_rows, alpha,
    EMA_MODE: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_e = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    which = tl.program_id(2)  # 0: K pool, 1: V pool
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    e_ok = offs < E
    s_page = tl.where(which == 0, s_kp, s_vp).to(tl.int64)
    if which == 0:
        base = KP + layer * s_kl
    else:
        base = VP + layer * s_vl
    # Keys: channel d pairs with d +- D/2 (half-split layout); column d % (D/2) of the frame tables.
    HALF: tl.constexpr = D // 2
    d = offs % D
    lo = d < HALF
    partner = tl.where(lo, offs + HALF, offs - HALF)
    col = d % HALF
    first = (pid_e == 0) & (layer == 0) & (which == 0)
    for i in range(0, num_ops):
        mode = tl.load(OPS + i * s_om)
        if mode == EMA_MODE:
            evicted = tl.load(OPS + i * s_om + s_oc).to(tl.int64)
            sink = tl.load(OPS + i * s_om + 2 * s_oc).to(tl.int64)
            dst = tl.load(OPS + i * s_om + 3 * s_oc).to(tl.int64)
            xs = tl.load(base + sink * s_page + offs, mask=e_ok, other=0.0).to(tl.float32)
            xe = tl.load(base + evicted * s_page + offs, mask=e_ok, other=0.0).to(tl.float32)
            if which == 0:
                offset = tl.load(OPS + i * s_om + 4 * s_oc)
                row = tl.minimum(tl.abs(offset), F_rows - 1)
                c = tl.load(FC + row * s_fr + col * s_fd, mask=e_ok, other=1.0)
                sn = tl.load(FS + row * s_fr + col * s_fd, mask=e_ok, other=0.0)
                sn = tl.where(offset < 0, -sn, sn)
                xp = tl.load(base + evicted * s_page + partner, mask=e_ok, other=0.0).to(tl.float32)
                xe = xe * c + tl.where(lo, -xp, xp) * sn
            blended = alpha * xs + (1.0 - alpha) * xe
            tl.store(base + dst * s_page + offs, blended.to(KP.dtype.element_ty), mask=e_ok)
            if first:
                tl.store(PFP + dst, tl.load(PFP + sink))
        # Later ops may read what this one wrote.
        tl.debug_barrier()


def _page_contiguous(pool: torch.Tensor) -> bool:
    _, _, t, h, d = pool.shape
    return pool.stride(4) == 1 and pool.stride(3) == d and pool.stride(2) == h * d


def sink_merge_triton_(k_pool: torch.Tensor, v_pool: torch.Tensor, page_frame_pos: torch.Tensor,
                       ops: torch.Tensor, alpha: float, frame_cos: torch.Tensor, frame_sin: torch.Tensor) -> None:
    """See :func:`.naive.sink_merge_naive_`. Each page's [T, H, D] block must be contiguous; D even."""
    if k_pool.dim() != 5 or v_pool.shape != k_pool.shape or k_pool.dtype != v_pool.dtype:
        raise ValueError("sink_merge_triton_: k_pool and v_pool must both be [L, P, T, H, D] of one dtype")
    if not (_page_contiguous(k_pool) and _page_contiguous(v_pool)):
        raise ValueError("sink_merge_triton_: each page's [T, H, D] block must be contiguous")
    if ops.dim() != 2 or ops.shape[1] != 5:
        raise ValueError("sink_merge_triton_: ops must be [M, 5]")
    head_dim = k_pool.shape[4]
    if head_dim % 2 or frame_cos.shape != frame_sin.shape or frame_cos.shape[1] != head_dim // 2:
        raise ValueError("sink_merge_triton_: frame tables must be [F, D/2] for an even head dim D")
    if _BLOCK % head_dim:
        raise ValueError(f"sink_merge_triton_: head dim {head_dim} must divide {_BLOCK} (pairs stay in one program)")
    if frame_cos.stride() != frame_sin.stride():
        frame_cos, frame_sin = frame_cos.contiguous(), frame_sin.contiguous()
    num_ops = ops.shape[0]
    if num_ops == 0:
        return
    layers = k_pool.shape[0]
    elems = k_pool.shape[2] * k_pool.shape[3] * k_pool.shape[4]
    grid = (triton.cdiv(elems, _BLOCK), layers, 2)
    _sink_merge_kernel[grid](
        k_pool, v_pool, page_frame_pos, ops, frame_cos, frame_sin,
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), ops.stride(0), ops.stride(1),
        *frame_cos.stride(), num_ops, elems, frame_cos.shape[0], float(alpha),
        EMA_MODE=EMA, D=head_dim, BLOCK=_BLOCK, num_warps=4,
    )


__all__ = ["sink_merge_triton_"]
