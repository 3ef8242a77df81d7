"""CUDA-graph replay of the chunk loop: same results as eager, graphs reused across chunks and prompts.

Without a GPU the capture itself cannot run; ``ReplayByRerun`` stands in for it (replay reruns the captured
work on the same static buffers and rewrites the same output tensor), which checks everything around the
graph: the static input copies, the static text K/V, the cache of graphs and the fallbacks.
"""
import gc
import warnings

import pytest
import torch

from helpers import brightness, smoothness, text_context, tiny_model
from streamt1_engine import SearchConfig, StreamT1Engine, StreamT1Error
from streamt1_engine import profiling
from streamt1_engine.cache import BeamPages, PagedKVCache
from streamt1_engine.config import SamplerConfig, StreamConfig
from streamt1_engine.cuda_graphs import GRAPHS_NEED_CUDA, GraphedDenoiser, NvtxEagerDenoiser, compile_blocks
from streamt1_engine.kernels.paged_attention import paged_attention
from streamt1_engine.model.wan import ChunkAttention
from streamt1_engine.sampler import make_schedule
from streamt1_engine.search.beam_search import BeamSearch, EagerDenoiser
from streamt1_engine.search.noise import draw_chunk_noise
from streamt1_engine.vae import SpaceToDepthVAE

STREAM = StreamConfig.tiny(local_attn_size=12, sink_size=3, max_sink_size=9)
SCHEDULE = make_schedule(SamplerConfig())
STREAM_T1 = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=3, short_threshold=-0.05,
                         long_threshold=0.0, ema_alpha=0.7)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ReplayByRerun:
    """CPU stand-in for ``CudaGraphCapture``: warm-up, then 'replay' = rerun on the captured buffers."""

    def capture(self, work, warmup_iters):
        for _ in range(warmup_iters):
            work()
        output = work()

        def replay():
            result = work()
            if output is not None:
                output.copy_(result)

        return replay, output


def run_search(model, text, cache, search, num_chunks, denoiser=None, seed=7, backend="torch"):
    cache.reset()
    runner = BeamSearch(model=model, vae=SpaceToDepthVAE(2), cache=cache, text=text, prompt="p", search=search,
                        schedule=SCHEDULE, num_chunks=num_chunks, seed=seed,
                        latent_shape=(12, 3, STREAM.latent_height, STREAM.latent_width),
                        short_reward=brightness, long_reward=smoothness, attention_backend=backend,
                        denoiser=denoiser)
    with torch.inference_mode():
        for _ in range(num_chunks):
            runner.step()
    videos = [torch.cat([n.frames for n in b.node.lineage()]) for b in runner.beams]
    return runner.records, videos, cache.pool.k.clone()


def new_cache(model, search):
    pages = PagedKVCache.pages_needed(STREAM, search.survivors, search.first_chunk_candidates)
    return PagedKVCache(model.config, STREAM, pages, torch.device("cpu"), torch.float32)


def assert_same_run(a, b):
    records_a, videos_a, pool_a = a
    records_b, videos_b, pool_b = b
    assert [r.to_dict() for r in records_a] == [r.to_dict() for r in records_b]
    assert all(torch.equal(x, y) for x, y in zip(videos_a, videos_b))
    assert torch.equal(pool_a, pool_b)


# -- CPU: the plumbing around the graphs ------------------------------------------------------------------
def assert_graphs_per_pages_read(graphed, captures, *, denoise_n, context_n, chunks):
    names = list(graphed.capture_seconds)
    assert captures == len(names) == graphed.num_graphs
    pages = {kind: {x.split("pages=")[1].split()[0] for x in names if x.startswith(kind)} for kind in
             ("denoise", "context")}
    assert pages["denoise"] == pages["context"] and 1 <= len(pages["denoise"]) <= chunks
    assert all(f" N={denoise_n} " in x for x in names if x.startswith("denoise"))
    assert all(f" N={context_n} " in x for x in names if x.startswith("context"))


def test_static_buffers_follow_every_chunk_and_prompt():
    model = tiny_model(in_channels=12, out_channels=12)
    texts = [text_context(model, seed=1), text_context(model, seed=2)]
    cache = new_cache(model, STREAM_T1)
    graphed = GraphedDenoiser(model, SCHEDULE, texts[0], cache.pool, capture=ReplayByRerun())
    runs = []
    for i, text in enumerate(texts):
        eager = run_search(model, text, cache, STREAM_T1, 5)
        if i:
            graphed.set_text(text)
        runs.append(run_search(model, text, cache, STREAM_T1, 5, denoiser=graphed))
        assert_same_run(eager, runs[-1])
        if i == 0:
            captures = graphed.captures
            # one denoise graph (N=4) and one context graph (N=2) per number of pages read, reused by the
            # chunks after the beams stop growing
            assert_graphs_per_pages_read(graphed, captures, denoise_n=4, context_n=2, chunks=5)
    # A new prompt reuses the graphs (its routing may add a graph for a page count not seen before).
    assert graphed.captures == graphed.num_graphs == len(graphed.capture_seconds) < 2 * captures
    assert graphed.replays == 2 * 2 * 5
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1])), "the prompt must matter"


def test_graph_cache_is_keyed_by_batch_size():
    model = tiny_model(in_channels=12, out_channels=12)
    text = text_context(model)
    none = SearchConfig(strategy="none")
    cache = new_cache(model, STREAM_T1)
    graphed = GraphedDenoiser(model, SCHEDULE, text, cache.pool, capture=ReplayByRerun())
    assert_same_run(run_search(model, text, cache, none, 3), run_search(model, text, cache, none, 3, graphed))
    first = graphed.captures
    assert_graphs_per_pages_read(graphed, first, denoise_n=1, context_n=1, chunks=3)
    assert_same_run(run_search(model, text, cache, STREAM_T1, 3), run_search(model, text, cache, STREAM_T1, 3, graphed))
    names = list(graphed.capture_seconds)[first:]
    assert graphed.captures == graphed.num_graphs == first + len(names) > first
    assert all(" N=4 " in x for x in names if x.startswith("denoise"))


def test_text_of_another_shape_drops_the_graphs():
    model = tiny_model(in_channels=12, out_channels=12)
    cache = new_cache(model, STREAM_T1)
    graphed = GraphedDenoiser(model, SCHEDULE, text_context(model), cache.pool, capture=ReplayByRerun())
    run_search(model, text_context(model), cache, SearchConfig(strategy="none"), 2, graphed)
    assert graphed.num_graphs == 4  # denoise and context, reading 0 and then 1 page
    graphed.set_text(text_context(model, batch=2))
    assert graphed.num_graphs == 0


def test_denoiser_does_not_keep_a_replaced_pool_alive():
    model = tiny_model(in_channels=12, out_channels=12)
    cache = new_cache(model, STREAM_T1)
    graphed = GraphedDenoiser(model, SCHEDULE, text_context(model), cache.pool, capture=ReplayByRerun())
    run_search(model, text_context(model), cache, SearchConfig(strategy="none"), 1, graphed)
    assert graphed.pool is cache.pool
    del cache
    gc.collect()
    assert graphed.pool is None  # the engine frees the old pool before allocating a new one


def test_uncapturable_backend_runs_eagerly_with_one_warning():
    model = tiny_model(in_channels=12, out_channels=12)
    text = text_context(model)
    cache = new_cache(model, STREAM_T1)
    graphed = GraphedDenoiser(model, SCHEDULE, text, cache.pool, capture=ReplayByRerun())
    eager = EagerDenoiser(model, SCHEDULE, text)
    noise = draw_chunk_noise([1, 2], 0, (12, 3, STREAM.latent_height, STREAM.latent_width), SCHEDULE.num_steps, "cpu")
    table, counts = cache.page_table([BeamPages(), BeamPages()])
    attn = ChunkAttention(cache.pool, table, counts, torch.zeros(2, dtype=torch.long), backend="sdpa")
    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        out = graphed.denoise(noise, attn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = graphed.denoise(noise, attn)  # warned once only
    with torch.inference_mode():
        assert torch.equal(out, eager.denoise(noise, attn)) and torch.equal(out, again)
    assert graphed.captures == 0


def test_graphed_denoiser_refuses_a_cpu_pool():
    model = tiny_model()
    cache = PagedKVCache(model.config, StreamConfig.tiny(), 4, torch.device("cpu"), torch.float32)
    with pytest.raises(StreamT1Error, match="CUDA graphs need a CUDA device"):
        GraphedDenoiser(model, SCHEDULE, text_context(model), cache.pool)


def test_engine_with_cuda_graphs_on_cpu_warns_once_and_runs_eagerly():
    eager = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    assert eager.cuda_graphs is False
    with pytest.warns(RuntimeWarning, match=GRAPHS_NEED_CUDA) as caught:
        engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", cuda_graphs=True)
    assert sum(GRAPHS_NEED_CUDA in str(w.message) for w in caught) == 1
    assert engine.cuda_graphs is False
    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning while generating
        got = engine.generate("a red circle", num_chunks=3, seed=4, search=search)
    want = eager.generate("a red circle", num_chunks=3, seed=4, search=search)
    assert torch.equal(got.frames, want.frames) and torch.equal(got.latents, want.latents)
    assert [c.to_dict() for c in got.chunks] == [c.to_dict() for c in want.chunks]
    assert got.info["cuda_graphs"] is False


class FakeNvtx:
    def __init__(self):
        self.events = []

    def push_range(self, message, domain=None, **kwargs):
        self.events.append(("push", message))

    def pop_range(self, domain=None):
        self.events.append(("pop", None))


def test_nvtx_ranges_per_stage_and_per_denoising_step(monkeypatch):
    fake = FakeNvtx()
    monkeypatch.setattr(profiling, "_nvtx", fake)
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", use_nvtx=True)
    engine.generate("a dot", num_chunks=2, seed=1)
    pushed = [m for kind, m in fake.events if kind == "push"]
    assert sum(kind == "pop" for kind, _ in fake.events) == len(pushed)
    steps = engine.config.sampler.denoising_steps
    assert [m for m in pushed if m.startswith("denoise_step")] == [f"denoise_step {i}" for i in range(len(steps))] * 2
    assert {"text_encode", "denoise", "vae_decode", "context_pass", "routing", "final_pick"} <= set(pushed)
    # a step range sits inside its chunk's denoise range
    first = pushed.index("denoise_step 0")
    assert pushed[first - 1] == "denoise"
    fake.events.clear()
    StreamT1Engine.from_pretrained("random-tiny", device="cpu", use_nvtx=False).generate("a dot", num_chunks=1)
    assert fake.events == []


def test_torch_nvtx_fallback_forwards_ranges(monkeypatch):
    """Without the nvtx package, CUDA machines still get ranges through torch's NVTX bindings."""
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda msg: calls.append(("push", msg)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop", None)))
    monkeypatch.setattr(profiling, "_nvtx", profiling.TorchNvtx())
    timer = profiling.StageTimer(use_nvtx=True)
    with timer.range("rewards"):
        pass
    assert calls == [("push", "rewards"), ("pop", None)] and timer.calls["rewards"] == 1


def test_nvtx_step_ranges_are_a_no_op_without_nvtx(monkeypatch):
    monkeypatch.setattr(profiling, "_nvtx", None)
    model = tiny_model(in_channels=12, out_channels=12)
    text = text_context(model)
    cache = new_cache(model, STREAM_T1)
    plain = run_search(model, text, cache, STREAM_T1, 2)
    ranged = run_search(model, text, cache, STREAM_T1, 2, NvtxEagerDenoiser(model, SCHEDULE, text))
    assert_same_run(plain, ranged)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_compiled_blocks_match_eager():
    model = tiny_model(in_channels=12, out_channels=12)
    text = text_context(model)
    cache = new_cache(model, SearchConfig(strategy="none"))
    want = run_search(model, text, cache, SearchConfig(strategy="none"), 2)
    assert compile_blocks(model, backend="eager") == len(model.blocks)  # dynamo tracing without codegen
    got = run_search(model, text, cache, SearchConfig(strategy="none"), 2)
    assert_same_run(want, got)


# -- GPU: real capture and replay ---------------------------------------------------------------------------
def _engines(backend, dtype):
    kwargs = dict(device="cuda", dtype=dtype, attention_backend=backend)
    return (StreamT1Engine.from_pretrained("random-tiny", **kwargs),
            StreamT1Engine.from_pretrained("random-tiny", cuda_graphs=True, **kwargs))


def _assert_close_results(a, b, dtype):
    assert [c.candidate_seeds for c in a.chunks] == [c.candidate_seeds for c in b.chunks]
    assert [c.survivors for c in a.chunks] == [c.survivors for c in b.chunks]
    assert [c.route_flags for c in a.chunks] == [c.route_flags for c in b.chunks]
    if not torch.equal(a.latents, b.latents):  # same kernels, so normally bit-identical
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.latents, b.latents, atol=tol, rtol=tol)
        assert (a.frames.int() - b.frames.int()).abs().max() <= 1


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("search", [SearchConfig(strategy="none"),
                                    SearchConfig(strategy="best_of_n", num_candidates=4)], ids=["n1", "n4"])
def test_gpu_graphed_engine_equals_eager_over_chunks_and_prompts(backend, dtype, search):
    eager, graphed = _engines(backend, dtype)
    captures = None
    for prompt in ("a red circle moving left", "a blue square falling"):
        want = eager.generate(prompt, num_chunks=5, seed=3, search=search, short_reward=brightness,
                              long_reward=smoothness)
        got = graphed.generate(prompt, num_chunks=5, seed=3, search=search, short_reward=brightness,
                               long_reward=smoothness)
        _assert_close_results(want, got, dtype)
        assert got.info["cuda_graphs"] is True
        if captures is None:
            captures = graphed._graphed.captures
            n = 1 if search.strategy == "none" else 4
            assert_graphs_per_pages_read(graphed._graphed, captures, denoise_n=n, context_n=1, chunks=5)
        assert graphed._graphed.captures == captures, "the second prompt must reuse the graphs"  # same routing
    assert graphed._graphed.replays == 2 * 2 * 5


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_stream_t1_end_to_end_graphed_equals_eager(backend):
    eager, graphed = _engines(backend, torch.float32)
    kwargs = dict(num_chunks=6, seed=11, search=STREAM_T1, short_reward=brightness, long_reward=smoothness)
    want, got = eager.generate("a green triangle", **kwargs), graphed.generate("a green triangle", **kwargs)
    _assert_close_results(want, got, torch.float32)
    assert want.info["chosen_beam"] == got.info["chosen_beam"]
    names = list(graphed._graphed.capture_seconds)
    assert graphed._graphed.captures == len(names) and len(names) < 2 * 6  # N=4 denoise, N=2 context per pages read
    assert all((" N=4 " if x.startswith("denoise") else " N=2 ") in x for x in names)


@cuda
@pytest.mark.gpu
def test_gpu_graphed_denoiser_bit_identical_to_eager_for_one_chunk():
    model = tiny_model(in_channels=12, out_channels=12)
    text = text_context(model, seed=1)
    model = model.cuda()
    text.kv = [(k.cuda(), v.cuda()) for k, v in text.kv]
    cache = PagedKVCache(model.config, STREAM, 8, torch.device("cuda"), torch.float32)
    beams = [BeamPages() for _ in range(4)]
    table, counts = cache.page_table(beams)
    attn = ChunkAttention(cache.pool, table, counts, torch.zeros(4, dtype=torch.long, device="cuda"), backend="triton")
    noise = draw_chunk_noise([1, 2, 3, 4], 0, (12, 3, STREAM.latent_height, STREAM.latent_width), SCHEDULE.num_steps,
                             "cuda")
    graphed = GraphedDenoiser(model, SCHEDULE, text, cache.pool)
    with torch.inference_mode():
        want = EagerDenoiser(model, SCHEDULE, text).denoise(noise, attn)
        first = graphed.denoise(noise, attn)
        second = graphed.denoise(noise, attn)
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(first, second) and graphed.captures == 1 and graphed.replays == 2


class FailingCapture:
    """A capture that fails the way Triton does on first GPU contact (an ``Exception``, not a RuntimeError)."""

    class OutOfResources(Exception):
        pass

    def __init__(self):
        self.calls = 0

    def capture(self, work, warmup_iters):
        self.calls += 1
        work()  # the warm-up ran (and would have compiled) before the capture failed
        raise self.OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448")


def test_any_capture_failure_falls_back_to_eager_with_one_warning():
    model = tiny_model(in_channels=12, out_channels=12)
    text = text_context(model)
    cache = new_cache(model, STREAM_T1)
    failing = FailingCapture()
    graphed = GraphedDenoiser(model, SCHEDULE, text, cache.pool, capture=failing)
    eager = EagerDenoiser(model, SCHEDULE, text)
    shape = (12, 3, STREAM.latent_height, STREAM.latent_width)
    table, counts = cache.page_table([BeamPages(), BeamPages()])
    attn = ChunkAttention(cache.pool, table, counts, torch.zeros(2, dtype=torch.long))
    noise = draw_chunk_noise([1, 2], 0, shape, SCHEDULE.num_steps, "cpu")
    with pytest.warns(RuntimeWarning, match="capture of denoise .*OutOfResources.*running eagerly"):
        out = graphed.denoise(noise, attn)
    table3, counts3 = cache.page_table([BeamPages()] * 3)
    attn3 = ChunkAttention(cache.pool, table3, counts3, torch.zeros(3, dtype=torch.long))
    noise3 = draw_chunk_noise([1, 2, 3], 0, shape, SCHEDULE.num_steps, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = graphed.denoise(noise, attn)  # the failed shape is not captured again
        other = graphed.denoise(noise3, attn3)  # a second shape fails too: no second warning
    with torch.inference_mode():
        assert torch.equal(out, eager.denoise(noise, attn)) and torch.equal(out, again)
        assert torch.equal(other, eager.denoise(noise3, attn3))
    assert failing.calls == 2 and graphed.captures == 0 and graphed.num_graphs == 0
    failed = [name for name in graphed.capture_seconds if name.endswith("(failed)")]
    assert len(failed) == 2 and all(graphed.capture_seconds[name] > 0 for name in failed)


def test_capture_time_is_recorded_once_per_shape():
    model = tiny_model(in_channels=12, out_channels=12)
    cache = new_cache(model, STREAM_T1)
    graphed = GraphedDenoiser(model, SCHEDULE, text_context(model), cache.pool, capture=ReplayByRerun())
    run_search(model, text_context(model), cache, SearchConfig(strategy="none"), 3, graphed)
    assert graphed.captures == 6 and graphed.replays == 6  # chunk c reads c pages: each shape captured once
    assert len(graphed.capture_seconds) == 6 and all(s > 0 for s in graphed.capture_seconds.values())
    assert {name.split()[0] for name in graphed.capture_seconds} == {"denoise", "context"}


# -- the page bound of a graph: one capture per stream, not one per page count ------------------------------
class PagedAttentionStub(torch.nn.Module):
    """The smallest model whose forward is one paged attention of the chunk (one layer, one head of 16): the
    real kernel at toy sizes, so Triton's interpreter runs a whole long stream in seconds."""

    def __init__(self):
        super().__init__()
        self.rope = object()  # GraphedDenoiser checks that the RoPE tables stay the same object

    def forward(self, x, timestep, text, attn):
        n, c, f, h, w = x.shape
        pooled = torch.nn.functional.avg_pool3d(x, (1, 2, 2))  # patch 1x2x2: the pool's page tokens
        q = pooled.flatten(2).transpose(1, 2)[:, :, None, :].contiguous()  # [N, tokens, 1 head, c]
        k = (0.5 * q + timestep[:, None, None, None] / 1000).contiguous()
        v = q.flip(-1).contiguous()
        pool = attn.pool
        if attn.write_pages is not None:
            pool.k[0].index_copy_(0, attn.write_pages, k)
            pool.v[0].index_copy_(0, attn.write_pages, v)
        out = paged_attention(q, k, v, pool.k[0], pool.v[0], attn.page_table, attn.num_pages, backend=attn.backend,
                              max_pages=attn.max_pages, row_pages=attn.row_pages)
        out = out[:, :, 0].transpose(1, 2).reshape(pooled.shape)
        return out.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)


def run_long_stream(backend, denoiser_for, chunks=8):
    """Two candidates whose beams grow by one page per chunk up to the table width, then slide (row 1 one
    page behind row 0): every page count from 0 to the width. Returns each chunk's x0 and the final pool."""
    from streamt1_engine.config import WanConfig

    cfg = WanConfig.tiny(dim=16, num_heads=1, num_layers=1, in_channels=16, out_channels=16)
    stream = StreamConfig.tiny()
    cache = PagedKVCache(cfg, stream, 2 * chunks, torch.device("cpu"), torch.float32)
    width = stream.max_pages_per_beam
    model, text = PagedAttentionStub(), text_context(tiny_model(in_channels=16, out_channels=16))
    denoiser = denoiser_for(model, cache.pool, text)
    written, outputs = [[], []], []
    with torch.inference_mode():
        for chunk in range(chunks):
            rows = [written[0][-width:], written[1][-width:][1:] if chunk > 1 else []]
            counts = tuple(len(r) for r in rows)
            table = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)
            start = torch.full((2,), 3 * chunk, dtype=torch.long)
            attn = ChunkAttention(cache.pool, table, torch.tensor(counts, dtype=torch.int32), start,
                                  backend=backend, max_pages=max(counts), row_pages=counts)
            noise = draw_chunk_noise([1, 2], chunk, (16, 3, stream.latent_height, stream.latent_width),
                                     SCHEDULE.num_steps, "cpu")
            x0 = denoiser.denoise(noise, attn)
            pages = [cache.alloc(), cache.alloc()]
            write = ChunkAttention(cache.pool, table, attn.num_pages, start, torch.tensor(pages), backend=backend,
                                   max_pages=max(counts), row_pages=counts)
            denoiser.context(x0, write)
            for row, page in zip(written, pages):
                row.append(page)
            outputs.append(x0.clone())
    return outputs, cache.pool.k.clone(), width, denoiser


def graphed_for(model, pool, text):
    return GraphedDenoiser(model, SCHEDULE, text, pool, capture=ReplayByRerun())


def eager_for(model, pool, text):
    return EagerDenoiser(model, SCHEDULE, text)


def test_triton_graphs_serve_every_page_count_of_a_long_stream():
    """The Triton kernel bounds its page loop by each row's device count, so graphs captured at the table
    width replay every chunk of the stream, whatever it reads, and give eager's results bit for bit."""
    want, want_pool, width, _ = run_long_stream("triton", eager_for)
    got, got_pool, _, graphed = run_long_stream("triton", graphed_for)
    assert all(torch.equal(a, b) for a, b in zip(want, got)) and torch.equal(want_pool, got_pool)
    assert graphed.captures == graphed.num_graphs == 2  # one denoise and one context graph for 8 chunks
    assert graphed.replays == 2 * 8
    assert sorted(graphed.capture_seconds) == [f"context N=2 latent=16x3x4x6 table={width} pages=<={width} triton",
                                               f"denoise N=2 latent=16x3x4x6 table={width} pages=<={width} triton"]


def test_torch_graphs_keep_one_graph_per_exact_row_counts():
    """The torch path slices exact per-row counts on the host (batch-invariant results), so its graphs stay
    keyed by the counts: bounded by the distinct counts a stream reads, and equal to eager bit for bit."""
    want, want_pool, width, _ = run_long_stream("torch", eager_for)
    got, got_pool, _, graphed = run_long_stream("torch", graphed_for)
    assert all(torch.equal(a, b) for a, b in zip(want, got)) and torch.equal(want_pool, got_pool)
    distinct_rows = width + 1  # (0, 0), (1, 0), (2, 1), ..., (width, width - 1), then it slides
    assert graphed.captures == 2 * distinct_rows
