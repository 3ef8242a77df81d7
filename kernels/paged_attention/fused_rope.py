"""The previous paged-attention kernel, over a pool of pre-RoPE keys (rotated while they are loaded).

Same contract as :func:`.naive_rope.paged_attention_rope_naive`. The engine's cache now holds keys already
rotated (``fused.py``); this kernel stays one release as the bench backend ``triton_rope`` for the
kernel-level A/B: it rotates every cached key in every query-tile program, from the factorised
frame/spatial tables, which the new kernel does not need. It cannot read the engine's post-RoPE pool
(it would rotate twice), so it is not a model backend. ``num_pages`` is read inside the
kernel so the launch needs no host synchronisation and can be captured in a CUDA graph (run it once per
shape before capturing, so that autotuning happens outside the graph).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .fused import _LOG2E, _TL_DTYPE, _check, _launch_inputs, launch_configs


# H100 at D=128. 128-row query tiles amortise the per-key rotation over many queries. Every config compiles
# for sm_90 on triton 3.6 and 3.9 without register spills and within 227 KB of shared memory
# (bench/kernel_resources.py checks this ahead of time, without a GPU); 4-warp 128-row and 64x128 tiles spill.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]

_CONFIGS = launch_configs(AUTOTUNE_CONFIGS)


@triton.jit
def _online_update(s, v, m_i, l_i, acc, PREC: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    corr = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * corr + tl.sum(p, 1)
    acc = acc * corr[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _paged_attn_rope_fwd(
    Q, KC, VC, KP, VP, PT, NP, PFP, FC, FS, SC, SS, O,
    s_qn, s_ql, s_qh, s_qd,
    s_kcn, s_kcl, s_kch, s_kcd,
    s_vcn, s_vcl, s_vch, s_vcd,
    s_kpp, s_kpt, s_kph, s_kpd,
    s_vpp, s_vpt, s_vph, s_vpd,
    s_ptn, s_ptm,
    s_fcr, s_fcd, s_fsr, s_fsd, s_scr, s_scd, s_ssr, s_ssd,
    s_on, s_ol, s_oh, s_od,
    H, Lq, Lc, T, frame_tokens, F_max, max_pages, qk_scale,
    HALF: tl.constexpr, DH: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    DTYPE = Q.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    n64 = n.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, DH)  # half-tile columns, padded to 16 so tl.dot is legal for D=16
    offs_d = tl.arange(0, D)
    col_ok = offs_h < HALF
    m_ok = offs_m < Lq

    q_base = Q + n64 * s_qn + h * s_qh
    q_ptr = q_base + offs_m[:, None] * s_ql + offs_h[None, :] * s_qd
    q_mask = m_ok[:, None] & col_ok[None, :]
    q_lo = tl.load(q_ptr, mask=q_mask, other=0.0).to(DTYPE)
    q_hi = tl.load(q_ptr + HALF * s_qd, mask=q_mask, other=0.0).to(DTYPE)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    # 1. Pages of the shared pool: pre-RoPE keys, rotated at the page's frame positions. Key tiles never
    #    straddle a frame, so the frame rotation is one table row per tile (the spatial part is the only
    #    per-key table load). One flat loop, key tile outer and page inner: every page starts at spatial
    #    index 0, so consecutive iterations reuse the same spatial-table rows from L1.
    npg = tl.minimum(tl.load(NP + n).to(tl.int32), max_pages)
    frames_per_page = (T + frame_tokens - 1) // frame_tokens
    tiles_per_frame = (frame_tokens + BLOCK_N - 1) // BLOCK_N
    for j in range(0, npg * frames_per_page * tiles_per_frame):
        tile = j // npg
        slot = j - tile * npg
        frame_in_page = tile // tiles_per_frame
        sp = (tile - frame_in_page * tiles_per_frame) * BLOCK_N + offs_n
        t = frame_in_page * frame_tokens + sp
        t_ok = (sp < frame_tokens) & (t < T)
        page = tl.load(PT + n64 * s_ptn + slot * s_ptm).to(tl.int64)
        frame = tl.minimum(tl.maximum(tl.load(PFP + page).to(tl.int32) + frame_in_page, 0), F_max - 1)
        kmask = t_ok[:, None] & col_ok[None, :]
        k_ptr = KP + page * s_kpp + h * s_kph + t[:, None] * s_kpt + offs_h[None, :] * s_kpd
        k_lo = tl.load(k_ptr, mask=kmask, other=0.0).to(tl.float32)
        k_hi = tl.load(k_ptr + HALF * s_kpd, mask=kmask, other=0.0).to(tl.float32)
        fc = tl.load(FC + frame * s_fcr + offs_h * s_fcd, mask=col_ok, other=1.0).to(tl.float32)[None, :]
        fs = tl.load(FS + frame * s_fsr + offs_h * s_fsd, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        sc = tl.load(SC + sp[:, None] * s_scr + offs_h[None, :] * s_scd, mask=kmask, other=1.0).to(tl.float32)
        ss = tl.load(SS + sp[:, None] * s_ssr + offs_h[None, :] * s_ssd, mask=kmask, other=0.0).to(tl.float32)
        cos = fc * sc - fs * ss
        sin = fs * sc + fc * ss
        r_lo = (k_lo * cos - k_hi * sin).to(DTYPE)
        r_hi = (k_lo * sin + k_hi * cos).to(DTYPE)
        s = tl.dot(q_lo, tl.trans(r_lo), input_precision=PREC)
        s = tl.dot(q_hi, tl.trans(r_hi), s, input_precision=PREC)
        s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
        v_ptr = VP + page * s_vpp + h * s_vph + t[:, None] * s_vpt + offs_d[None, :] * s_vpd
        v = tl.load(v_ptr, mask=t_ok[:, None], other=0.0)
        m_i, l_i, acc = _online_update(s, v.to(DTYPE), m_i, l_i, acc, PREC)

    # 2. The candidate's own chunk, already rotated.
    kc_base = KC + n64 * s_kcn + h * s_kch
    vc_base = VC + n64 * s_vcn + h * s_vch
    for c0 in range(0, Lc, BLOCK_N):
        c = c0 + offs_n
        c_ok = c < Lc
        kmask = c_ok[:, None] & col_ok[None, :]
        k_ptr = kc_base + c[:, None] * s_kcl + offs_h[None, :] * s_kcd
        k_lo = tl.load(k_ptr, mask=kmask, other=0.0).to(DTYPE)
        k_hi = tl.load(k_ptr + HALF * s_kcd, mask=kmask, other=0.0).to(DTYPE)
        s = tl.dot(q_lo, tl.trans(k_lo), input_precision=PREC)
        s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision=PREC)
        s = tl.where(c_ok[None, :], s * qk_scale, float("-inf"))
        v = tl.load(vc_base + c[:, None] * s_vcl + offs_d[None, :] * s_vcd, mask=c_ok[:, None], other=0.0)
        m_i, l_i, acc = _online_update(s, v.to(DTYPE), m_i, l_i, acc, PREC)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = O + n64 * s_on + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m_ok[:, None])


_paged_attn_rope_fwd_tuned = triton.autotune(configs=_CONFIGS, key=["HALF", "Lq", "T"])(_paged_attn_rope_fwd)



def paged_attention_triton_rope(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, page_frame_pos,
                           frame_cos, frame_sin, spatial_cos, spatial_sin, frame_tokens: int,
                           scale: float | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`.naive_rope.paged_attention_rope_naive`; any strides are accepted (e.g. ``k_pool[layer]`` views).

    ``out`` (any strides, q's shape and dtype) lets a captured CUDA graph reuse a static output buffer.
    """
    _check(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, "paged_attention_triton_rope")
    n, lq, h, d = q.shape
    max_pages = page_table.shape[1]
    scale, out, page_table, k_chunk, v_chunk = _launch_inputs(q, k_chunk, v_chunk, page_table, scale, out,
                                                              "paged_attention_triton_rope")
    if n == 0 or lq == 0:
        return out
    dtype = q.dtype
    half = d // 2

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), n * h)

    _paged_attn_rope_fwd_tuned[grid](
        q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, page_frame_pos,
        frame_cos, frame_sin, spatial_cos, spatial_sin, out,
        *q.stride(), *k_chunk.stride(), *v_chunk.stride(), *k_pool.stride(), *v_pool.stride(),
        *page_table.stride(),
        *frame_cos.stride(), *frame_sin.stride(), *spatial_cos.stride(), *spatial_sin.stride(),
        *out.stride(),
        h, lq, k_chunk.shape[1], k_pool.shape[1], int(frame_tokens), frame_cos.shape[0], max_pages,
        scale * _LOG2E,
        HALF=half, DH=max(half, 16), D=d,
        PREC="ieee" if dtype == torch.float32 else "tf32",
    )
    return out


__all__ = ["paged_attention_triton_rope", "AUTOTUNE_CONFIGS"]
