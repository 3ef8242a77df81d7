"""Fused paged attention against the reference, over the table layouts the cache manager produces.

The engine's kernel (``fused``) reads a pool of keys rotated when written; the previous kernel
(``fused_rope``, bench backend ``triton_rope``) reads pre-RoPE keys and rotates them, against its own
reference ``naive_rope``.
"""
import pytest
import torch

from kernel_testutil import DEVICE, HAS_CUDA, assert_close, random_tables
from streamt1_engine.kernels.paged_attention import (BackendUnavailableError, paged_attention,
                                                     paged_attention_naive)
from streamt1_engine.kernels.paged_attention.naive_rope import paged_attention_rope_naive

# Unused slots hold garbage that must never be dereferenced.
GARBAGE = -1


def make_rope_case(n, lq, d, dtype, tables, counts, *, h=2, pool_pages=8, chunk_frames=2, frame_tokens=6,
                   lc=None, layers=2, seed=0, f_max=48, device=DEVICE):
    """Inputs of the previous (pre-RoPE pool) kernel: pools, tables and the RoPE tables that rotate pages."""
    gen = torch.Generator().manual_seed(seed)
    t = chunk_frames * frame_tokens
    lc = lq if lc is None else lc

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    q, k_chunk, v_chunk = rnd(n, lq, h, d), rnd(n, lc, h, d), rnd(n, lc, h, d)
    # Pools as a [L, P, T, H, D] allocation: the kernel sees the non-contiguous-in-L view of one layer.
    k_pool, v_pool = rnd(layers, pool_pages, t, h, d), rnd(layers, pool_pages, t, h, d)
    width = max([len(r) for r in tables] + [0])
    rows = [list(r) + [GARBAGE] * (width - len(r)) for r in tables]
    page_table = torch.tensor(rows, dtype=torch.int32).reshape(n, width).to(device)
    num_pages = torch.tensor(counts, dtype=torch.int32, device=device)
    page_frame_pos = torch.randint(0, f_max - chunk_frames + 4, (pool_pages,), generator=gen,
                                   dtype=torch.int32).to(device)  # a few past F_max exercise the clamp
    fc, fs = random_tables(f_max, d // 2, gen, device)
    sc, ss = random_tables(frame_tokens, d // 2, gen, device)
    layer = layers - 1
    return (q, k_chunk, v_chunk, k_pool[layer], v_pool[layer], page_table, num_pages, page_frame_pos,
            fc, fs, sc, ss, frame_tokens)


def make_case(n, lq, d, dtype, tables, counts, **kw):
    """Inputs of the post-RoPE kernel: q, chunk K/V, one layer's pools, page table, page counts."""
    return make_rope_case(n, lq, d, dtype, tables, counts, **kw)[:7]


# (N, Lq, D, page tables, num_pages); rows may be longer than num_pages (partially filled tables).
CASES = {
    "chunk-only-empty-table": (1, 5, 16, [[]], [0]),
    "zero-pages": (3, 37, 16, [[3, 4], [GARBAGE], [7]], [0, 0, 0]),
    "one-page": (1, 37, 32, [[5]], [1]),
    "wrapped-scrambled": (1, 5, 32, [[6, 7, 0, 1]], [4]),
    "ragged-shared": (3, 37, 16, [[6, 7, 0, 1], [2, 7, 5, GARBAGE], [1, GARBAGE, 9999, 3]], [4, 2, 1]),
    "ragged-shared-d32": (3, 5, 32, [[0, 3, 7], [3, 0, GARBAGE], [7, 6, 5]], [3, 2, 3]),
    "count-exceeds-width": (3, 5, 16, [[1, 2], [2, 1], [4, 4]], [5, 2, 7]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_naive(case, dtype):
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    n, lq, d, tables, counts = CASES[case]
    args = make_case(n, lq, d, dtype, tables, counts)
    expected = paged_attention_naive(*args)
    out = torch.full_like(args[0], float("nan"))
    got = paged_attention_triton(*args, out=out)
    assert got is out
    assert_close(got, expected, dtype)


def _scenario_tables(scenario, n):
    """Page tables per scenario for n candidates; rows mix shared, wrapped and scrambled page ids."""
    if scenario == "none":
        return [[] for _ in range(n)], [0] * n
    if scenario == "zero":
        return [[4, GARBAGE, 2]] * n, [0] * n
    if scenario == "one":
        return [[(5 + 2 * i) % 8, GARBAGE] for i in range(n)], [1] * n
    base = [[6, 7, 0, 1], [7, 0, 3, GARBAGE], [1, 6, GARBAGE, 9999]]
    return base[:n], [4, 3, 2][:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("lq", [5, 37])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("scenario", ["none", "zero", "one", "several"])
def test_triton_grid(scenario, n, lq, d, dtype):
    """T = 20 tokens per page straddles the 16-key tile of the test config: page tails are masked."""
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    tables, counts = _scenario_tables(scenario, n)
    args = make_case(n, lq, d, dtype, tables, counts, chunk_frames=2, frame_tokens=10, seed=lq + d + n)
    out = torch.full_like(args[0], float("nan"))
    assert_close(paged_attention_triton(*args, out=out), paged_attention_naive(*args), dtype)


def _cache_tables(n, sinks, window, shared):
    """Tables the cache manager builds: ``sinks`` sink pages (shared by all candidates or private), then a
    window of ``window`` pages in ring order (oldest first, so ids wrap around), each candidate's own."""
    rows, next_id = [], 0
    common_sink = list(range(sinks))
    next_id = sinks
    for i in range(n):
        sink = common_sink if shared else list(range(next_id, next_id + sinks))
        next_id += 0 if shared else sinks
        ring = list(range(next_id, next_id + 3))
        next_id += 3
        start = (i + 1) % 3  # where the ring's oldest page is: the window wraps around the ring
        rows.append(sink + [ring[(start + j) % 3] for j in range(window)])
    counts = [len(r) for r in rows]
    counts[-1] -= 1 if n > 1 and counts[-1] > 0 else 0  # one beam a page shorter: a ragged table
    return rows, counts, next_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("window", [1, 3], ids=["partial-window", "full-wrapped"])
@pytest.mark.parametrize("sinks", [0, 3, 5], ids=["sink0", "sink3", "sinkmax"])
@pytest.mark.parametrize("n", [1, 3])
def test_triton_sink_window_grid(n, sinks, window, shared, dtype):
    """Odd Lq and page counts, T = 21 tokens per page (one full 16-key tile and a 5-key tail)."""
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    tables, counts, used = _cache_tables(n, sinks, window, shared)
    args = make_case(n, 37, 16, dtype, tables, counts, pool_pages=used + 1, chunk_frames=3, frame_tokens=7,
                     seed=n * 100 + sinks * 10 + window)
    out = torch.full_like(args[0], float("nan"))
    assert_close(paged_attention_triton(*args, out=out), paged_attention_naive(*args), dtype)


@pytest.mark.parametrize("frame_tokens,chunk_frames", [
    (21, 2),  # 42 tokens: two full 16-key tiles and a 10-key tail per page
    (16, 2),  # 32 tokens: exactly two tiles, no tail
    (5, 1),   # 5 tokens: the tail is the whole page
])
def test_triton_page_tails(frame_tokens, chunk_frames):
    """Full key tiles are read unmasked, the partial last tile of every page (and of the chunk) masked."""
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    dtype = torch.float32
    args = make_case(3, 19, 16, dtype, [[6, 7, 0], [7, 1, GARBAGE], [5]], [3, 2, 1], lc=21,
                     frame_tokens=frame_tokens, chunk_frames=chunk_frames, seed=frame_tokens)
    out = torch.full_like(args[0], float("nan"))
    assert_close(paged_attention_triton(*args, out=out), paged_attention_naive(*args), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton", "sdpa"])
def test_max_pages_narrows_reads_not_results(backend):
    """The host's page bound (the longest beam) gives the full-width result, and only slots below it are read."""
    dtype = torch.float32
    args = list(make_case(3, 5, 16, dtype, [[6, 7, 2, 3], [7, 1, 0, 4], [2, 3, 1, 5]], [2, 1, 0]))
    want = paged_attention(*args, backend=backend)
    args[5] = args[5].clone()
    args[5][:, 2:] = 9999  # columns past the longest beam: never dereferenced when max_pages says so
    assert_close(paged_attention(*args, backend=backend, max_pages=2), want, dtype)


def test_triton_d64_chunk_length_differs_and_scale():
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    dtype = torch.float32
    args = make_case(3, 21, 64, dtype, [[2, 5], [5], [1, 2]], [2, 1, 2], lc=11, h=1, frame_tokens=5,
                     chunk_frames=3)
    assert_close(paged_attention_triton(*args, scale=0.3), paged_attention_naive(*args, scale=0.3), dtype)


def test_triton_noncontiguous_q_and_chunk():
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    dtype = torch.float16
    args = list(make_case(3, 37, 32, dtype, [[6, 7, 0], [0, 1], [4]], [3, 2, 1], lc=37))
    gen = torch.Generator().manual_seed(1)
    # q/k/v as head-major views of one fused projection, the way a model may hand them over.
    qkv = torch.randn(3, 3, 2, 37, 32, generator=gen).to(dtype).to(DEVICE)
    args[0], args[1], args[2] = (qkv[:, i].transpose(1, 2) for i in range(3))
    assert not args[0].is_contiguous()
    assert_close(paged_attention_triton(*args), paged_attention_naive(*args), dtype)


def test_triton_allocates_and_fills_output():
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    args = make_case(1, 37, 16, torch.float32, [[1, 0]], [2])
    got = paged_attention_triton(*args)
    assert got.shape == args[0].shape and got.dtype == args[0].dtype and got.is_contiguous()
    assert_close(got, paged_attention_naive(*args), torch.float32)


def test_triton_rejects_bad_head_dim():
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    args = make_case(1, 5, 16, torch.float32, [[1]], [1])
    bad = [a[..., :12] if i < 5 else a for i, a in enumerate(args)]
    with pytest.raises(ValueError):
        paged_attention_triton(*bad)


@pytest.mark.parametrize("backend", ["torch", "triton", "sdpa"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_dispatch_backends_match_naive(backend, ragged):
    dtype = torch.float32
    counts = [2, 1, 0] if ragged else [2, 2, 2]
    args = make_case(3, 5, 16, dtype, [[6, 7], [7, 1], [2, 3]], counts)
    assert_close(paged_attention(*args, backend=backend), paged_attention_naive(*args), dtype)


def test_sdpa_backend_fp16():
    dtype = torch.float16
    args = make_case(3, 5, 32, dtype, [[6, 7], [7, 1], [2, 3]], [2, 1, 2])
    assert_close(paged_attention(*args, backend="sdpa"), paged_attention_naive(*args), dtype)


def test_dispatch_rejects_unknown_backend():
    args = make_case(1, 5, 16, torch.float32, [[1]], [1])
    with pytest.raises(ValueError, match="unknown backend"):
        paged_attention(*args, backend="cudnn")


@pytest.mark.parametrize("backend,module", [("flash_attn", "flash_attn"), ("xformers", "xformers")])
def test_missing_optional_backend_raises_clear_error(backend, module):
    try:
        __import__(module)
        pytest.skip(f"{module} is installed")
    except ImportError:
        pass
    args = make_case(1, 5, 16, torch.float16, [[1]], [1])
    with pytest.raises(BackendUnavailableError, match="pip install"):
        paged_attention(*args, backend=backend)
    with pytest.raises(RuntimeError):
        paged_attention(*args, backend=backend)


def test_package_imports_without_triton():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import streamt1_engine.kernels.paged_attention as p, streamt1_engine.kernels.sink_merge as s\n"
            "import streamt1_engine.kernels.qk_norm_rope as r\n"
            "from streamt1_engine.kernels.paged_attention import *\n"
            "try:\n    p.paged_attention_triton\nexcept RuntimeError as e:\n    print('OK', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "OK triton is not installed" in res.stdout


# --- realistic shapes on a GPU (bf16): Wan 1.3B heads, three-frame chunks, a sink + window of pages ---

def _realistic(n, dtype, pages, lq=1560 * 3, h=12, d=128):
    gen = torch.Generator().manual_seed(0)
    t = lq
    pool = 12

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", dtype)

    k_pool, v_pool = rnd(2, pool, t, h, d), rnd(2, pool, t, h, d)
    tables = torch.tensor([[(3 * i + j) % pool for j in range(pages)] for i in range(n)], dtype=torch.int32)
    counts = torch.tensor([pages - (i % 2) for i in range(n)], dtype=torch.int32)
    return (rnd(n, lq, h, d), rnd(n, lq, h, d), rnd(n, lq, h, d), k_pool[1], v_pool[1], tables.cuda(), counts.cuda())


def _relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("n,pages", [(1, 0), (2, 3), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_realistic(n, pages, dtype):
    """1.3B shapes against a float32 reference: no worse than stock SDPA on the same half-precision inputs.

    Queries are scaled up so attention is peaked (with unit logits the output of 40k keys is ~0 and any
    error hides under an absolute tolerance); the first and last 600 queries (the last tile is partial)
    are checked against the float32 reference, whose memory grows with the number of queries.
    """
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    args = list(_realistic(n, dtype, pages))
    args[0] = args[0] * 3
    lq = args[0].shape[1]
    out = torch.full_like(args[0], float("nan"))
    got = paged_attention_triton(*args, out=out)
    assert torch.isfinite(got).all(), "unwritten or non-finite output"
    rows = torch.cat([torch.arange(0, 600), torch.arange(lq - 600, lq)]).cuda()
    upcast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    upcast[0] = upcast[0][:, rows]
    reference = paged_attention_naive(*upcast)
    stock = paged_attention(*args, backend="sdpa")[:, rows]
    err, stock_err = _relative_error(got[:, rows], reference), _relative_error(stock, reference)
    assert err <= max(2 * stock_err, 2e-3), f"fused {err:.2e} vs stock SDPA {stock_err:.2e} (relative to fp32)"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_small_against_naive_bf16():
    from streamt1_engine.kernels.paged_attention.fused import paged_attention_triton

    args = make_case(3, 37, 128, torch.bfloat16, [[6, 7, 0, 1], [2, 7], [1, 3, 5]], [4, 2, 3], h=4,
                     frame_tokens=24, chunk_frames=3)
    assert_close(paged_attention_triton(*args), paged_attention_naive(*args), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_rope_kernel_small_against_its_naive_bf16():
    from streamt1_engine.kernels.paged_attention.fused_rope import paged_attention_triton_rope

    args = make_rope_case(3, 37, 128, torch.bfloat16, [[6, 7, 0, 1], [2, 7], [1, 3, 5]], [4, 2, 3], h=4,
                          frame_tokens=24, chunk_frames=3)
    assert_close(paged_attention_triton_rope(*args), paged_attention_rope_naive(*args), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["zero-pages", "wrapped-scrambled", "ragged-shared", "count-exceeds-width"])
def test_triton_rope_matches_rope_naive(case, dtype):
    """The previous kernel (kept for the A/B) still computes its own semantics."""
    from streamt1_engine.kernels.paged_attention.fused_rope import paged_attention_triton_rope

    n, lq, d, tables, counts = CASES[case]
    args = make_rope_case(n, lq, d, dtype, tables, counts)
    out = torch.full_like(args[0], float("nan"))
    assert_close(paged_attention_triton_rope(*args, out=out), paged_attention_rope_naive(*args), dtype)


def test_triton_rope_with_real_rope_tables():
    """The engine's own factorised tables (frame part and spatial parts in disjoint columns)."""
    from streamt1_engine.kernels.paged_attention.fused_rope import paged_attention_triton_rope
    from streamt1_engine.model.rope import Rope3D

    dtype = torch.float16
    args = list(make_rope_case(3, 18, 32, dtype, [[2, 3, 4], [2, 3, 5], [2, 6]], [3, 3, 2], frame_tokens=6,
                               chunk_frames=3))
    rope = Rope3D(32, max_frames=64, device=DEVICE)
    args[8], args[9] = rope.frame_cos, rope.frame_sin
    args[10], args[11] = rope.spatial_tables(2, 3)
    assert_close(paged_attention_triton_rope(*args), paged_attention_rope_naive(*args), dtype)


def test_pre_rope_reference_equals_post_rope_reference_on_rotated_pages():
    """Both references agree when the post-RoPE pool holds the pre-RoPE pool's keys rotated at the pages'
    positions: the two cache layouts describe the same attention."""
    from streamt1_engine.kernels.paged_attention.naive_rope import rotated_page_keys

    args = make_rope_case(3, 12, 32, torch.float32, [[2, 3, 4], [2, 5], [6]], [3, 2, 1], frame_tokens=6,
                          chunk_frames=2)
    q, kc, vc, k_pool, v_pool, table, counts, pos, fc, fs, sc, ss, ft = args
    every_page = torch.arange(k_pool.shape[0])[None]
    k_rotated = rotated_page_keys(k_pool, every_page, pos, fc, fs, sc, ss, ft)[0]
    torch.testing.assert_close(paged_attention_naive(q, kc, vc, k_rotated, v_pool, table, counts),
                               paged_attention_rope_naive(*args), atol=1e-5, rtol=1e-5)


def test_bench_script_tiny_runs(tmp_path):
    import json
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton", reason="bench_attention.py times the Triton kernel: needs the triton extra")
    script = pathlib.Path(__file__).resolve().parents[2] / "bench" / "bench_attention.py"
    res = subprocess.run([sys.executable, str(script), "--tiny", "--dtype", "fp32", "--n", "1", "3",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "bench_attention.json").read_text())
    rows = report["rows"]
    assert report["environment"]["tiny"] and "CPU smoke run" in (tmp_path / "bench_attention.md").read_text()
    assert {(r["n"], r["backend"]) for r in rows} >= {(n, b) for n in (1, 3) for b in ("triton", "triton_rope", "sdpa")}
    assert all(r["rel_err_vs_sdpa"] < 1e-5 and r["ms"] > 0 for r in rows)
