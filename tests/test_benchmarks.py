"""pytest-benchmark timings of the hot paths at tiny sizes (no timed assertions; results are still checked).

Run ``python -m pytest tests/test_benchmarks.py --benchmark-only`` to see the table; skipped when
pytest-benchmark is not installed.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from helpers import BeamPages, make_cache, text_context, tiny_model  # noqa: E402
from streamt1_engine.cache import RouteFlag  # noqa: E402
from streamt1_engine.config import SamplerConfig, StreamConfig  # noqa: E402
from streamt1_engine.kernels.paged_attention import gather_kv, paged_attention  # noqa: E402
from streamt1_engine.kernels.sink_merge import EMA, sink_merge_  # noqa: E402
from streamt1_engine.model.wan import ChunkAttention  # noqa: E402
from streamt1_engine.sampler import denoise_chunk, make_schedule  # noqa: E402
from streamt1_engine.search.noise import draw_chunk_noise  # noqa: E402

STREAM = StreamConfig.tiny(local_attn_size=15, sink_size=3, max_sink_size=9)
ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


@pytest.fixture
def benchmark(request):
    """pytest-benchmark's fixture, or a skip when its plugin is installed but disabled (-p no:benchmark)."""
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("the pytest-benchmark plugin is disabled")
    return request.getfixturevalue("benchmark")


def filled_cache(model, beams: int):
    """Each beam: the shared sink page and its own full window, at the positions of chunk 10."""
    cache = make_cache(model, STREAM, num_pages=1 + beams * STREAM.window_pages + 4)
    torch.manual_seed(0)
    cache.pool.k.normal_()
    cache.pool.v.normal_()
    sink = cache.alloc()
    pages = []
    for _ in range(beams):
        window = [cache.alloc() for _ in range(STREAM.window_pages)]
        for j, page in enumerate(window):
            cache.pool.page_frame_pos[page] = (10 - STREAM.window_pages + j) * STREAM.chunk_frames
        pages.append(BeamPages([sink], window))
    return cache, pages


def test_bench_denoise_one_chunk_n4(benchmark):
    model = tiny_model()
    text = text_context(model)
    cache, beams = filled_cache(model, 2)
    schedule = make_schedule(SamplerConfig())
    table, counts = cache.page_table([beams[0], beams[0], beams[1], beams[1]])
    attn = ChunkAttention(cache.pool, table, counts, torch.full((4,), 30))
    noise = draw_chunk_noise([1, 2, 3, 4], 10, (4, 3, STREAM.latent_height, STREAM.latent_width),
                             schedule.num_steps, "cpu")
    with torch.inference_mode():
        x0 = benchmark.pedantic(denoise_chunk, (model, schedule, noise, text, attn), rounds=3, iterations=1)
        alone = denoise_chunk(model, schedule, noise.__class__(noise.initial[2:3], noise.renoise[:, 2:3]), text,
                              ChunkAttention(cache.pool, table[2:3], counts[2:3], torch.full((1,), 30)))
    assert x0.shape == (4, 4, 3, STREAM.latent_height, STREAM.latent_width)
    torch.testing.assert_close(x0[2:3], alone, atol=1e-5, rtol=1e-5)  # batching does not mix candidates


def test_bench_paged_attention_torch(benchmark):
    gen = torch.Generator().manual_seed(0)
    n, tokens, h, d, frame_tokens = 4, 48, 4, 16, 16
    pool_pages = 10
    q, kc, vc = (torch.randn(n, tokens, h, d, generator=gen) for _ in range(3))
    k_pool, v_pool = (torch.randn(pool_pages, tokens, h, d, generator=gen) for _ in range(2))
    table = torch.tensor([[0, 1, 2, 3], [0, 4, 5, -1], [0, 6, 7, 8], [0, 9, -1, -1]], dtype=torch.int32)
    counts = torch.tensor([4, 3, 4, 2], dtype=torch.int32)
    args = (q, kc, vc, k_pool, v_pool, table, counts)
    out = benchmark.pedantic(lambda: paged_attention(*args, backend="torch", max_pages=4), **ROUNDS)
    keys, values, valid = gather_kv(*args)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=valid[:, None, None, :])
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_bench_sink_merge_torch(benchmark):
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 12, 48, 4, 16, generator=gen) for _ in range(2))
    pos = torch.arange(12, dtype=torch.int32) * 3
    # frame offsets: sink frame - evicted frame; zero-angle tables (no rotation) keep the expected blend simple
    ops = torch.tensor([[EMA, 5, 0, 0, -15], [EMA, 6, 1, 7, -15], [int(RouteFlag.APPEND), 8, 8, 8, 0]],
                       dtype=torch.int32)
    fc, fs = torch.ones(64, 8), torch.zeros(64, 8)
    k0, v0 = k.clone(), v.clone()

    def setup():
        return (k0.clone(), v0.clone(), pos.clone(), ops, 0.9, fc, fs), {}

    benchmark.pedantic(sink_merge_, setup=setup, rounds=5, warmup_rounds=1)
    sink_merge_(k, v, pos, ops, 0.9, fc, fs)
    torch.testing.assert_close(k[:, 0], 0.9 * k0[:, 0] + 0.1 * k0[:, 5])
    torch.testing.assert_close(v[:, 7], 0.9 * v0[:, 1] + 0.1 * v0[:, 6])
    assert torch.equal(k[:, 8], k0[:, 8]) and int(pos[7]) == 3


def test_bench_page_table_for_eight_candidates(benchmark):
    model = tiny_model()
    cache, beams = filled_cache(model, 4)
    candidates = [beams[i // 2] for i in range(8)]
    out = torch.empty(8, cache.max_pages_per_beam, dtype=torch.int32)
    counts = torch.empty(8, dtype=torch.int32)
    table, num = benchmark.pedantic(cache.page_table, (candidates,), {"out": out, "counts": counts}, **ROUNDS)
    assert table is out and num is counts
    assert num.tolist() == [1 + STREAM.window_pages] * 8
    for row, beam in zip(table.tolist(), candidates):
        assert row[: 1 + STREAM.window_pages] == beam.all_pages()
        assert set(row[1 + STREAM.window_pages:]) <= {-1}
