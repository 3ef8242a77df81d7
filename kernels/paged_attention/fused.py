"""Triton forward kernel for candidate-batched attention over the shared paged KV cache.

Same contract as :func:`.naive.paged_attention_naive`. Pages hold keys already rotated at their positions,
so the kernel is plain flash attention whose key tiles come from two sources: the pages of the
candidate's table (outer loop over pages, inner loop over a page's key tiles, the partial last tile of a
page peeled off so that full tiles need no mask) and the candidate's own chunk. No RoPE tables, no integer
division in the loops. Tiles are addressed with plain pointers: triton 3.9 removed block pointers, and host
TMA descriptors would need rank-4 boxes for the [P, T, H, D] pool (heads interleaved per token).
``num_pages`` is read inside the kernel so the launch needs no host synchronisation and can be captured in
a CUDA graph (run it once per shape before capturing, so that autotuning happens outside the graph).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# H100/H200 at D=128 (the flash-attention tutorial's space). Every config compiles for sm_90 without register
# spills and within 227 KB of shared memory (bench/kernel_resources.py checks this ahead of time, without a GPU);
# 4-warp 128-row tiles and 128-key tiles spill.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]

def launch_configs(configs: list) -> list:
    """The configs a launch may try: one small config in the interpreter (every program runs in Python; it
    keeps tests fast and exercises tails), the first (the H100 default) with STREAMT1_TRITON_AUTOTUNE=0
    (e.g. many small shapes in a test run), else all of them."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if os.environ.get("STREAMT1_TRITON_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs


_CONFIGS = launch_configs(AUTOTUNE_CONFIGS)


@triton.jit
def _attend_tile(q, k, v, m_i, l_i, acc, qk_scale, key_ok, DTYPE: tl.constexpr, PREC: tl.constexpr,
                 MASKED: tl.constexpr):
    """One key tile (k [D, BLOCK_N], v [BLOCK_N, D]) of the online softmax; ``MASKED``: only ``key_ok`` keys."""
    s = tl.dot(q, k.to(DTYPE), input_precision=PREC)
    if MASKED:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    corr = tl.exp2(m_i - m_new)
    l_i = l_i * corr + tl.sum(p, 1)
    acc = tl.dot(p.to(DTYPE), v.to(DTYPE), acc * corr[:, None], input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _attend_keys(q, K, V, s_kt, s_kd, s_vt, s_vd, length, m_i, l_i, acc, qk_scale, DTYPE: tl.constexpr,
                 PREC: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """All ``length`` keys of one segment (a page, or the own chunk): full tiles unmasked, then the tail."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_ptr = K + offs_n[None, :] * s_kt + offs_d[:, None] * s_kd
    v_ptr = V + offs_n[:, None] * s_vt + offs_d[None, :] * s_vd
    full = length - length % BLOCK_N
    for _ in range(0, full, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, tl.load(k_ptr), tl.load(v_ptr), m_i, l_i, acc, qk_scale, offs_n < BLOCK_N,
                                     DTYPE, PREC, False)
        k_ptr += BLOCK_N * s_kt
        v_ptr += BLOCK_N * s_vt
    if full < length:
        key_ok = offs_n < length - full
        k = tl.load(k_ptr, mask=key_ok[None, :], other=0.0)
        v = tl.load(v_ptr, mask=key_ok[:, None], other=0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, qk_scale, key_ok, DTYPE, PREC, True)
    return m_i, l_i, acc


@triton.jit
def _paged_attn_fwd(
    Q, KC, VC, KP, VP, PT, NP, O,
    s_qn, s_ql, s_qh, s_qd,
    s_kcn, s_kcl, s_kch, s_kcd,
    s_vcn, s_vcl, s_vch, s_vcd,
    s_kpp, s_kpt, s_kph, s_kpd,
    s_vpp, s_vpt, s_vph, s_vpd,
    s_ptn, s_ptm,
    s_on, s_ol, s_oh, s_od,
    H, Lq, Lc, T, max_pages, qk_scale,
    D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    DTYPE = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)
    h = (pid_nh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_ok = offs_m[:, None] < Lq
    q = tl.load(Q + n * s_qn + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd, mask=m_ok, other=0.0)
    q = q.to(DTYPE)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    # 1. The pages of the candidate's table (keys rotated when the page was written).
    npg = tl.minimum(tl.load(NP + n).to(tl.int32), max_pages)
    for slot in range(0, npg):
        page = tl.load(PT + n * s_ptn + slot * s_ptm).to(tl.int64)
        m_i, l_i, acc = _attend_keys(q, KP + page * s_kpp + h * s_kph, VP + page * s_vpp + h * s_vph,
                                     s_kpt, s_kpd, s_vpt, s_vpd, T, m_i, l_i, acc, qk_scale, DTYPE, PREC, D, BLOCK_N)

    # 2. The candidate's own chunk.
    m_i, l_i, acc = _attend_keys(q, KC + n * s_kcn + h * s_kch, VC + n * s_vcn + h * s_vch,
                                 s_kcl, s_kcd, s_vcl, s_vcd, Lc, m_i, l_i, acc, qk_scale, DTYPE, PREC, D, BLOCK_N)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = O + n * s_on + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m_ok)


_paged_attn_fwd_tuned = triton.autotune(configs=_CONFIGS, key=["D", "Lq", "T"])(_paged_attn_fwd)

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages,
           name: str = "paged_attention_triton"):
    n, lq, h, d = q.shape
    if q.dtype not in _TL_DTYPE:
        raise TypeError(f"{name}: unsupported dtype {q.dtype}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"{name}: head dim must be a power of two >= 16, got {d}")
    if k_chunk.shape[0] != n or k_chunk.shape[2:] != (h, d) or v_chunk.shape != k_chunk.shape:
        raise ValueError(f"{name}: chunk K/V must be [N, Lc, H, D] matching q")
    if k_pool.shape[2:] != (h, d) or v_pool.shape != k_pool.shape:
        raise ValueError(f"{name}: pools must be [P, T, H, D] matching q")
    if page_table.dim() != 2 or page_table.shape[0] != n or num_pages.shape != (n,):
        raise ValueError(f"{name}: page_table must be [N, M] and num_pages [N]")


def _launch_inputs(q, k_chunk, v_chunk, page_table, scale, out, name: str):
    """Scale, output buffer, a page table safe to pass (an empty tensor may have a null data pointer; the
    loop never reads it anyway) and chunk K/V in q's dtype, for both kernels' wrappers."""
    n, lq, h, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty((n, lq, h, d), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"{name}: out must have q's shape and dtype")
    if page_table.shape[1] == 0:
        page_table = torch.zeros((n, 1), dtype=torch.int32, device=q.device)
    k_chunk = k_chunk if k_chunk.dtype == q.dtype else k_chunk.to(q.dtype)
    v_chunk = v_chunk if v_chunk.dtype == q.dtype else v_chunk.to(q.dtype)
    return scale, out, page_table, k_chunk, v_chunk


def paged_attention_triton(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale: float | None = None,
                           *, max_pages: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`.naive.paged_attention_naive`; any strides are accepted (e.g. ``k_pool[layer]`` views).

    ``max_pages`` only narrows the loop bound (the kernel reads ``num_pages`` itself); ``out`` (any strides,
    q's shape and dtype) lets a captured CUDA graph reuse a static output buffer.
    """
    _check(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages)
    n, lq, h, d = q.shape
    width = page_table.shape[1] if max_pages is None else min(int(max_pages), page_table.shape[1])
    scale, out, page_table, k_chunk, v_chunk = _launch_inputs(q, k_chunk, v_chunk, page_table, scale, out,
                                                              "paged_attention_triton")
    if n == 0 or lq == 0:
        return out
    dtype = q.dtype

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), n * h)

    _paged_attn_fwd_tuned[grid](
        q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, out,
        *q.stride(), *k_chunk.stride(), *v_chunk.stride(), *k_pool.stride(), *v_pool.stride(),
        *page_table.stride(), *out.stride(),
        h, lq, k_chunk.shape[1], k_pool.shape[1], width, scale * _LOG2E,
        D=d, PREC="ieee" if dtype == torch.float32 else "tf32",
    )
    return out


def attention_flops(n: int, lq: int, kv_len: int, h: int, d: int) -> float:
    """Two matmuls of 2*Lq*S*D FLOPs each per (candidate, head)."""
    return 4.0 * n * lq * kv_len * h * d


__all__ = ["paged_attention_triton", "attention_flops", "AUTOTUNE_CONFIGS"]
