"""Several streams in one engine: each equals itself alone (fp32, bit for bit), pages come back, queues bound.

The streams' candidates run in one forward per chunk step (checked by counting the batched calls), so these
tests fail if batching made a stream depend on the others (padding, per-batch kernels) or if pages leaked.
"""
import asyncio
import math
import threading
import time
import weakref

import pytest
import torch

from helpers import brightness, smoothness
from streamt1_engine import SearchConfig, StreamT1Engine, StreamT1Error
from streamt1_engine import engine as engine_module
from streamt1_engine.errors import EngineBusy
from streamt1_engine.cache import PagedKVCache
from streamt1_engine.search.beam_search import BeamSearch

STREAM_T1 = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=2)
BEST_OF_3 = SearchConfig(strategy="best_of_n", num_candidates=3)
REWARDS = dict(short_reward=brightness, long_reward=smoothness)
REQUESTS = [
    dict(prompt="a red circle moving left", num_chunks=5, seed=1, search="none"),
    dict(prompt="a blue square falling", num_chunks=3, seed=2, search=BEST_OF_3, **REWARDS),
    dict(prompt="a green triangle", num_chunks=6, seed=3, search=STREAM_T1, **REWARDS),
]


@pytest.fixture(scope="module")
def engine():
    eng = StreamT1Engine.from_pretrained("random-tiny", device="cpu", max_streams=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def alone(engine):
    """Each request run by itself (one stream in the engine at a time)."""
    return [engine.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in REQUESTS]


def assert_pool_empty(engine):
    assert engine._pools
    for pool in engine._pools.values():
        blocks = pool.blocks
        assert all(r == 0 for r in blocks.refcount) and blocks.num_free == blocks.num_pages
    assert engine.stats()["pages_in_use"] == 0


def assert_same(a, b):
    assert torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)
    assert [r.to_dict() for r in a.chunks] == [r.to_dict() for r in b.chunks]
    assert a.info["chunk_seeds"] == b.info["chunk_seeds"] and a.info["chosen_beam"] == b.info["chosen_beam"]


@pytest.fixture()
def batch_sizes(monkeypatch):
    """Streams per batched DiT call, in order."""
    sizes = []
    original = engine_module.run_batched

    def spy(denoiser, works, **kwargs):
        sizes.append(len(works))
        return original(denoiser, works, **kwargs)

    monkeypatch.setattr(engine_module, "run_batched", spy)
    return sizes


def test_concurrent_streams_equal_each_alone_and_a_cancel_frees_its_pages(engine, alone, batch_sizes):
    def cancel_after_two(handle, index, record):
        if index == 1:
            handle.cancel()  # from the worker: takes effect at the end of this chunk step

    extra = engine.submit("a cancelled stream", num_chunks=8, seed=9, search=STREAM_T1,
                          callback_on_chunk_end=cancel_after_two, **REWARDS)
    handles = [engine.submit(**r) for r in REQUESTS]
    results = [h.result(timeout=300) for h in handles]
    for want, got in zip(alone, results):
        assert_same(want, got)
    assert max(batch_sizes) >= 3, "the streams must have shared forwards"
    assert extra.status == "cancelled" and list(extra.chunks()) == []
    assert [h.status for h in handles] == ["finished"] * 3
    assert_pool_empty(engine)


def test_streams_joining_and_leaving_keep_memory_flat_over_40_chunks(batch_sizes):
    """Short streams join as others leave; the pool stops growing after the first two and ends empty."""
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    totals, in_use = [], []

    def watch(handle, index, record):
        stats = engine.stats()
        totals.append(stats["pages_total"])
        in_use.append(stats["pages_in_use"])

    lengths = [3, 5, 4, 6, 2, 5, 3, 4, 3, 5]  # 40 chunks
    handles = []
    for i, n in enumerate(lengths):
        if i >= 2:  # two at a time: each new stream joins while the one before it still runs
            handles[i - 2].result(timeout=300)
        handles.append(engine.submit(f"prompt {i}", num_chunks=n, seed=i, callback_on_chunk_end=watch))
    for h in handles[-2:]:
        h.result(timeout=300)
    assert sum(len(h.records) for h in handles) == 40 and len(in_use) == 40
    assert max(batch_sizes) == 2
    need = PagedKVCache.pages_needed(engine.config.stream, 1, 1)
    peak = max(totals)
    assert peak <= 2 * need, "the pool holds at most the two running streams' reservations"
    assert all(t == peak for t in totals[totals.index(peak):]), "once grown, the pool stays the same size"
    assert max(in_use) <= peak
    assert_pool_empty(engine)
    engine.close()


def test_the_pool_grows_mid_stream_without_changing_the_running_stream(alone):
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    joined, totals, old_pool = [], [], []

    def join_at_chunk_two(handle, index, record):
        totals.append(engine.stats()["pages_total"])
        if index == 1:  # a second stream arrives while this one is mid-way: the pool grows at the boundary
            old_pool.append(weakref.ref(engine._blocks.kv.k))
            joined.append(engine.submit(**REQUESTS[0]))

    try:
        first = engine.submit(**REQUESTS[2], callback_on_chunk_end=join_at_chunk_two)
        assert_same(alone[2], first.result(timeout=300))
        assert_same(alone[0], joined[0].result(timeout=300))
        assert totals[-1] > totals[0], "the pool must have grown while the first stream ran"
        # nothing but the block pool held the old pages (what lets a CUDA growth free them before allocating)
        assert old_pool[0]() is None
        assert_pool_empty(engine)
    finally:
        engine.close()


def test_full_queue_refuses_with_one_clear_error():
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", max_streams=1, max_queue=1)
    try:
        running = engine.submit("a", num_chunks=4, max_buffered_chunks=1)  # pauses after its first chunk
        deadline = time.monotonic() + 60
        while running.status != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = engine.submit("b", num_chunks=2)
        assert queued.status == "queued" and engine.stats()["queued"] == 1
        with pytest.raises(EngineBusy, match="queue is full") as e:  # a StreamT1Error a server answers 503
            engine.submit("c", num_chunks=2)
        assert "\n" not in str(e.value) and isinstance(e.value, StreamT1Error)
        queued.cancel()  # a queued request leaves the queue at once
        assert queued.status == "cancelled" and engine.stats()["queued"] == 0
        engine.submit("c", num_chunks=1).cancel()
        running.cancel()
        assert engine.stats()["pages_in_use"] == 0 and engine.stats()["running"] == 0
    finally:
        engine.close()


def test_fixed_pool_makes_the_next_stream_wait_not_fail(alone):
    stream = StreamT1Engine.from_pretrained("random-tiny").config.stream
    pages = PagedKVCache.pages_needed(stream, STREAM_T1.survivors, STREAM_T1.first_chunk_candidates)
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", kv_pages=pages)
    try:
        r = REQUESTS[2]
        handles = [engine.submit(**r), engine.submit(**r)]
        assert handles[1].status == "queued"
        for h in handles:
            assert_same(alone[2], h.result(timeout=300))
        assert engine.stats()["pages_total"] == pages
        with pytest.raises(StreamT1Error, match="kv_pages"):
            engine.submit("too big", search=SearchConfig(strategy="stream_t1", beam_size=3, top_k=3), **REWARDS)
    finally:
        engine.close()


def test_a_memory_limit_for_one_stream_makes_the_second_wait_not_fail(alone):
    first, second = REQUESTS[2], REQUESTS[0]
    probe = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    need = [probe.estimate_memory(num_chunks=r["num_chunks"], search=r["search"]).run for r in (first, second)]
    probe.close()
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", max_streams=4,
                                            memory_limit=max(need) + min(need) // 2)  # each alone, not both
    try:
        a = engine.submit(first["prompt"], max_buffered_chunks=1, **{k: v for k, v in first.items() if k != "prompt"})
        deadline = time.monotonic() + 60
        while a.status != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        b = engine.submit(second["prompt"], **{k: v for k, v in second.items() if k != "prompt"})
        time.sleep(0.2)
        assert b.status == "queued" and engine.stats()["running"] == 1
        assert_same(a.result(timeout=300), alone[2])
        assert_same(b.result(timeout=300), alone[0])
        assert engine.stats()["pages_in_use"] == 0
    finally:
        engine.close()


def test_streams_of_another_frame_size_run_beside_a_long_one_taking_turns_per_chunk(engine):
    """A small request of another frame size does not wait for the large stream to end: it is admitted at the
    next chunk boundary, and the two layouts alternate chunk by chunk (they cannot share a forward)."""
    small_alone = engine.generate("a wide stream", num_chunks=2, seed=4, height=16, width=48)
    large_alone = engine.generate("the first stream", num_chunks=6, seed=1)
    order, small = [], []

    def record(handle, index, rec):
        order.append((handle.request.prompt, index))
        if handle.request.prompt == "the first stream" and index == 1:  # arrives while the large one runs
            small.append(engine.submit("a wide stream", num_chunks=2, seed=4, height=16, width=48,
                                       callback_on_chunk_end=record))

    large = engine.submit("the first stream", num_chunks=6, seed=1, callback_on_chunk_end=record)
    got_large = large.result(timeout=300)
    got_small = small[0].result(timeout=300)
    assert order[:6] == [("the first stream", 0), ("the first stream", 1), ("a wide stream", 0),
                         ("the first stream", 2), ("a wide stream", 1), ("the first stream", 3)]
    assert torch.equal(got_small.frames, small_alone.frames) and got_small.frames.shape[1:3] == (16, 48)
    assert_same(large_alone, got_large)
    assert_pool_empty(engine)


def test_a_failing_stream_fails_alone(engine, alone):
    def broken(frames, prompt):
        raise ValueError("reward model crashed")

    bad = engine.submit("a broken reward", num_chunks=4, seed=5, search=STREAM_T1, short_reward=broken,
                        long_reward=smoothness)
    good = engine.submit(**REQUESTS[0])
    with pytest.raises(ValueError, match="reward model crashed"):
        bad.result(timeout=300)
    assert bad.status == "failed"
    assert_same(alone[0], good.result(timeout=300))
    assert_pool_empty(engine)


def test_an_error_in_the_batched_forward_fails_the_streams_in_it(engine, alone, monkeypatch):
    original = engine_module.run_batched

    def faulty(denoiser, works, **kwargs):
        if len(works) > 1:
            raise RuntimeError("device fault")
        return original(denoiser, works, **kwargs)

    monkeypatch.setattr(engine_module, "run_batched", faulty)
    handles = [engine.submit("first", num_chunks=6, seed=1), engine.submit("second", num_chunks=6, seed=2)]
    for h in handles:
        with pytest.raises(RuntimeError, match="device fault"):
            h.result(timeout=300)
    assert [h.status for h in handles] == ["failed", "failed"]
    assert_pool_empty(engine)
    monkeypatch.setattr(engine_module, "run_batched", original)
    assert_same(alone[0], engine.submit(**REQUESTS[0]).result(timeout=300))  # the engine goes on


def test_callback_on_chunk_end_stops_and_stop_emits_a_complete_video(engine, alone):
    seen = []

    def stop_at_two(handle, index, record):
        seen.append((index, record.index))
        return index < 1

    r = REQUESTS[0]
    stopped = engine.submit(**r, callback_on_chunk_end=stop_at_two)
    got = stopped.result(timeout=300)
    assert stopped.status == "stopped" and seen == [(0, 0), (1, 1)]
    assert torch.equal(got.frames, alone[0].frames[:got.frames.shape[0]]) and len(got.chunks) == 2

    handle = engine.submit(**REQUESTS[2])
    first = next(handle.chunks(timeout=300))
    handle.stop()
    rest = list(handle.chunks(timeout=300))
    chunks = [first] + rest
    assert handle.status == "stopped"
    assert [c.index for c in chunks] == list(range(len(handle.records)))  # every generated chunk, in order
    assert handle.info["chosen_beam"] in (0, 1)
    assert_pool_empty(engine)


def test_prompt_switches_reach_the_search_at_their_chunk(engine, monkeypatch):
    calls = []

    def switch_prompt(self, prompt, text):
        calls.append((self.chunk_index, prompt))
        self.prompt, self.text = prompt, text

    monkeypatch.setattr(BeamSearch, "switch_prompt", switch_prompt)
    with pytest.raises(StreamT1Error, match="out of range"):
        engine.submit("a", num_chunks=3, prompt_schedule={3: "b"})
    with pytest.raises(StreamT1Error, match="chunk-0 prompt"):
        engine.submit("a", num_chunks=3, prompt_schedule={0: "z", 1: "b"})
    handle = engine.submit("a", num_chunks=4, prompt_schedule={2: "b"}, max_buffered_chunks=1)
    next(handle.chunks(timeout=300))
    handle.switch_prompt("c")
    list(handle.chunks(timeout=300))
    assert (2, "b") in calls and any(p == "c" for _, p in calls) and all(i >= 1 for i, _ in calls)


def test_a_longlive_schedule_line_equals_the_same_switches_as_a_dict(engine):
    line = {"prompts": ["a red circle", "a blue square"], "switch_chunk_indices": [2]}
    a = engine.generate("a red circle", num_chunks=3, seed=5, prompt_schedule=line)
    b = engine.generate("a red circle", num_chunks=3, seed=5, prompt_schedule={2: "a blue square"})
    assert_same(a, b)
    assert [s["chunk"] for s in a.info["prompt_switches"]] == [2]


def test_streams_of_different_stream_presets_share_the_pool_and_equal_each_alone(engine, batch_sizes):
    """A global-attention stream beside the engine's local one: same latent size, so the same pages."""
    requests = [dict(prompt="a red circle", num_chunks=6, seed=7, search=BEST_OF_3, **REWARDS),
                dict(prompt="a blue square", num_chunks=5, seed=8, stream_preset="self-forcing")]
    alone = [engine.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    assert alone[1].info["stream"]["local_attn_size"] == -1 != alone[0].info["stream"]["local_attn_size"]
    batch_sizes.clear()
    handles = [engine.submit(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    for handle, expected in zip(handles, alone):
        assert_same(handle.result(timeout=300), expected)
    assert max(batch_sizes) == 2
    assert_pool_empty(engine)
    with pytest.raises(StreamT1Error, match="unknown stream preset"):
        engine.submit("a", stream_preset="nope")


# -- astream ------------------------------------------------------------------------------------------------
def test_astream_cancelled_consumer_frees_the_pages_at_once(engine):
    async def take_one():
        gen = engine.astream("a red circle", num_chunks=20, seed=1, max_buffered_chunks=1)
        async for chunk in gen:
            break
        assert engine.stats()["pages_in_use"] > 0  # paused at its bound, mid-stream
        await gen.aclose()
        return chunk

    before = engine.stats()["streams_cancelled"]
    chunk = asyncio.run(take_one())
    assert chunk.index == 0
    stats = engine.stats()
    assert stats["pages_in_use"] == 0 and stats["running"] == 0 and stats["streams_cancelled"] == before + 1


def test_astream_task_cancel_frees_the_pages(engine):
    """A cancelled consumer task: with ``aclosing`` the pages are free when the task ends; a generator just
    dropped is closed by the event loop's finaliser and its stream cancelled at the worker's next boundary."""
    import contextlib

    async def main(closing: bool):
        started = asyncio.Event()

        async def consume():
            stream = engine.astream("a blue square", num_chunks=20, seed=2, max_buffered_chunks=1)
            async with (contextlib.aclosing(stream) if closing else contextlib.nullcontext(stream)) as chunks:
                async for _ in chunks:
                    started.set()
                    await asyncio.sleep(60)

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.stats()["pages_in_use"] > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine.stats()["pages_in_use"]

    assert asyncio.run(main(closing=True)) == 0
    asyncio.run(main(closing=False))
    deadline = time.monotonic() + 60
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["pages_in_use"] == 0 and engine.stats()["running"] == 0


def test_a_slow_consumer_pauses_only_its_own_stream(engine):
    bound = 2

    async def main():
        slow = engine.submit("slow", num_chunks=8, seed=3, max_buffered_chunks=bound)
        fast = [c async for c in engine.astream("fast", num_chunks=6, seed=4)]
        # the fast stream ran to its end while nobody read the slow one: that one waits at its bound
        paused = len(slow.records)
        await asyncio.sleep(0.3)
        assert len(slow.records) == paused <= bound + 1 and slow.status == "running"
        rest = await asyncio.get_running_loop().run_in_executor(None, lambda: list(slow.chunks(timeout=300)))
        return fast, rest

    fast, rest = asyncio.run(main())
    assert [c.index for c in fast] == list(range(6)) and [c.index for c in rest] == list(range(8))


def test_submit_from_threads_is_safe(engine, alone):
    results = [None] * 3

    def run(i):
        results[i] = engine.submit(**REQUESTS[i]).result(timeout=300)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for want, got in zip(alone, results):
        assert_same(want, got)


def test_close_cancels_everything():
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", max_streams=1)
    running = engine.submit("a", num_chunks=5, max_buffered_chunks=1)
    waiting = engine.submit("b", num_chunks=5)
    engine.close()
    assert running.status == "cancelled" and waiting.status == "cancelled"
    with pytest.raises(EngineBusy, match="closed"):
        engine.submit("c")


# -- the building blocks ------------------------------------------------------------------------------------
def test_exact_rows_attention_does_not_depend_on_the_other_rows():
    from streamt1_engine.kernels.paged_attention import paged_attention

    g = torch.Generator().manual_seed(0)
    pages, tokens, h, d, lq = 9, 6, 2, 8, 6
    k_pool, v_pool = (torch.randn(pages, tokens, h, d, generator=g) for _ in range(2))
    counts = [0, 3, 1, 3, 2]  # ragged, two rows of equal count, one with none
    table = torch.full((5, 4), -1, dtype=torch.int32)
    for row, c in enumerate(counts):
        table[row, :c] = torch.randperm(pages, generator=g)[:c].int()
    q, kc, vc = (torch.randn(5, lq, h, d, generator=g) for _ in range(3))
    num = torch.tensor(counts, dtype=torch.int32)
    batched = paged_attention(q, kc, vc, k_pool, v_pool, table, num, row_pages=tuple(counts))
    for row, c in enumerate(counts):
        alone = paged_attention(q[row:row + 1], kc[row:row + 1], vc[row:row + 1], k_pool, v_pool,
                                table[row:row + 1, :max(c, 1)], num[row:row + 1], row_pages=(c,))
        assert torch.equal(batched[row:row + 1], alone), f"row {row}"
    masked = paged_attention(q, kc, vc, k_pool, v_pool, table, num)  # the padded, masked path: same up to rounding
    torch.testing.assert_close(batched, masked, rtol=1e-5, atol=1e-6)


def test_block_pool_grows_in_place_and_streams_share_it():
    from streamt1_engine.cache import BeamPages, BlockPool
    from streamt1_engine.config import StreamConfig, WanConfig

    cfg, stream = WanConfig.tiny(), StreamConfig.tiny()
    blocks = BlockPool.allocate(cfg, 3, PagedKVCache(cfg, stream, 1, "cpu", torch.float32).page_tokens, "cpu",
                                torch.float32)
    a = PagedKVCache.shared(blocks, cfg, stream)
    b = PagedKVCache.shared(blocks, cfg, stream)
    pa = a.new_chunk_pages(2, 6).tolist()
    blocks.kv.k[:, pa[0]] = 1.5
    assert pa == [0, 1] and blocks.num_free == 1
    blocks.grow(6)
    assert blocks.num_pages == 6 and float(blocks.kv.k[0, pa[0]].mean()) == 1.5 and blocks.frame_pos[pa[1]] == 6
    pb = [b.alloc() for _ in range(3)]
    assert pb == [2, 3, 4]  # lowest free id first, the old free page before the new ones
    beam = BeamPages(sink=[pa[0]], window=[pa[1]])
    shared = a.fork(beam)
    b.retain(pa[0])  # another stream referencing a page does not count as this stream's reference
    a.check_consistency([beam, shared])
    a.release_all()
    assert blocks.refcount[pa[0]] == 1 and blocks.refcount[pa[1]] == 0
    b.release_all()
    assert blocks.num_free == blocks.num_pages and all(r == 0 for r in blocks.refcount)
    with pytest.raises(StreamT1Error, match="not held by this stream"):
        a.release(pb[0])


def test_batch_buckets():
    from streamt1_engine.search.executor import batch_bucket

    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 33, 64, 65, 130)] == [1, 2, 4, 8, 8, 16, 64, 64, 128, 192]
    with pytest.raises(StreamT1Error):
        batch_bucket(0)


def test_padded_bucket_batches_replay_graphs_and_equal_the_eager_rows():
    """CPU check of the CUDA path's padding: dummy rows attend no page, write only the scratch page, and the
    real rows equal the unpadded eager batch; graphs are keyed by the bucket (replayed by rerunning them here,
    as in test_cuda_graphs; the capture itself needs a GPU and is not run)."""
    from test_cuda_graphs import ReplayByRerun

    from helpers import text_context, tiny_model
    from streamt1_engine.cache import BlockPool
    from streamt1_engine.config import SamplerConfig, StreamConfig
    from streamt1_engine.cuda_graphs import GraphedDenoiser
    from streamt1_engine.model.wan import ChunkAttention
    from streamt1_engine.sampler import ChunkNoise, EagerDenoiser, make_schedule
    from streamt1_engine.search.executor import ContextWork, DenoiseWork, run_batched

    model = tiny_model(in_channels=12, out_channels=12)
    model.batch_invariant = True  # as the engine sets it: dummy rows must not change the real rows' bits
    stream = StreamConfig.tiny()
    schedule = make_schedule(SamplerConfig())
    page_tokens = PagedKVCache(model.config, stream, 1, "cpu", torch.float32).page_tokens
    blocks = BlockPool.allocate(model.config, 8, page_tokens, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    blocks.kv.k.normal_(generator=g)
    blocks.kv.v.normal_(generator=g)
    scratch = blocks.alloc()
    texts = [text_context(model, seed=1), text_context(model, seed=2)]
    shape = (12, stream.chunk_frames, stream.latent_height, stream.latent_width)

    def work(rows, pages, start, text, write=None):
        n = len(rows)
        table = torch.tensor([p + [-1] * (4 - len(p)) for p in rows], dtype=torch.int32)
        attn = ChunkAttention(blocks.kv, table, torch.tensor(pages, dtype=torch.int32),
                              torch.full((n,), start, dtype=torch.long), write, max_pages=max(pages),
                              row_pages=tuple(pages))
        if write is not None:
            return ContextWork(torch.randn(n, *shape, generator=g), attn, text)
        noise = ChunkNoise(torch.randn(n, *shape, generator=g), torch.randn(3, n, *shape, generator=g))
        return DenoiseWork(noise, attn, text)

    works = [work([[1, 2], [1]], [2, 1], 6, texts[0]), work([[3, 4, 5]], [3], 9, texts[1])]
    eager = EagerDenoiser(model, schedule, texts[0])
    graphed = GraphedDenoiser(model, schedule, texts[0], blocks.kv, capture=ReplayByRerun())
    with torch.inference_mode():
        want = run_batched(eager, works)
        for _ in range(2):
            got = run_batched(graphed, works, pad_to=4, scratch_page=scratch)
            assert all(torch.equal(a, b) for a, b in zip(want, got))
        assert graphed.captures == 1 and graphed.replays == 2
        assert all(" N=4 " in name for name in graphed.capture_seconds)
        before = blocks.kv.k.clone()
        writes = [work([[1]], [1], 12, texts[0], torch.tensor([6])), work([[3]], [1], 12, texts[1], torch.tensor([7]))]
        run_batched(graphed, writes, pad_to=4, scratch_page=scratch)
        changed = sorted({int(p) for p in (blocks.kv.k != before).any(dim=(0, 2, 3, 4)).nonzero().flatten()})
        assert changed == sorted([6, 7, scratch])


def test_engine_graph_path_pads_batches_to_buckets_and_equals_eager(alone, monkeypatch):
    """The engine's CUDA-graph path on CPU (capture replaced by rerunning, as in test_cuda_graphs): several
    streams' batches are padded to a bucket with dummy rows writing the scratch page, and every stream still
    equals its eager run alone. What needs a GPU (the capture, the Triton kernels in graphs) is not run here."""
    from functools import partial

    from test_cuda_graphs import ReplayByRerun

    from streamt1_engine.cuda_graphs import GraphedDenoiser

    monkeypatch.setattr(engine_module, "GraphedDenoiser", partial(GraphedDenoiser, capture=ReplayByRerun(),
                                                                  warmup_iters=1))
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    engine.cuda_graphs = True  # on CPU the constructor turns it off; the path itself is device-independent
    padded = []
    original = engine_module.run_batched

    def spy(denoiser, works, **kwargs):
        padded.append((sum(w.rows for w in works), kwargs.get("pad_to")))
        return original(denoiser, works, **kwargs)

    monkeypatch.setattr(engine_module, "run_batched", spy)
    try:
        handles = [engine.submit(**REQUESTS[0]), engine.submit(**REQUESTS[2])]
        for want, h in zip([alone[0], alone[2]], handles):
            assert_same(want, h.result(timeout=300))
        assert (5, 8) in padded and (3, 4) in padded  # 1 + 4 candidates in a bucket of 8; 1 + 2 survivors in 4
        assert all(pad is None for rows, pad in padded if rows == 1)  # one stream alone: not padded
        assert engine._graphed.replays > 0 and engine._scratch_page is not None
        assert engine.stats()["pages_in_use"] == 0
    finally:
        engine.close()


def test_batch_invariant_model_rows_equal_each_row_alone():
    from helpers import text_context, tiny_model
    from streamt1_engine.model.wan import ChunkAttention, TextContext

    model = tiny_model(in_channels=12, out_channels=12)
    model.batch_invariant = True
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, 3, 4, 6, generator=g)
    t = torch.tensor([900.0, 700.0, 700.0, 300.0, 50.0])
    texts = [text_context(model, seed=s) for s in range(5)]
    batch_text = TextContext([(torch.cat([tx.kv[i][0] for tx in texts]), torch.cat([tx.kv[i][1] for tx in texts]))
                              for i in range(len(texts[0].kv))])
    with torch.inference_mode():
        batched = model(x, t, batch_text, ChunkAttention.dense(5, "cpu"))
        for row in range(5):
            alone = model(x[row:row + 1], t[row:row + 1], texts[row], ChunkAttention.dense(1, "cpu"))
            assert torch.equal(batched[row:row + 1], alone), f"row {row}"


def test_interpreter_exit_waits_for_a_worker_that_is_freeing_its_engine():
    """An idle worker that exits drops the last reference to its engine and frees its tensors in its own
    thread; an interpreter exit during that free used to abort the process (about one exit in six here). The
    exit must wait for it: the slow free below prints only if the process waited."""
    import subprocess
    import sys

    script = ("import time\nimport streamt1_engine.engine as m\nfrom streamt1_engine import StreamT1Engine\n"
              "class SlowToFree:\n    def __del__(self):\n        time.sleep(0.5)\n        print('freed', flush=True)\n"
              "m.WORKER_IDLE_EXIT_S = 0.2\n"
              "engine = StreamT1Engine.from_pretrained('random-tiny', device='cpu')\n"
              "engine.generate('a short stream', num_chunks=1)\n"
              "engine.slow_to_free = SlowToFree()\n"
              "del engine  # the idle worker holds the last reference now\n"
              "time.sleep(0.45)  # the worker has gone idle, exited, and is inside the slow free\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "freed"


def test_interpreter_exit_with_a_running_stream_is_clean():
    """A worker thread left inside a forward at interpreter exit used to abort the process (C++ terminate)."""
    import subprocess
    import sys

    script = ("import time\nfrom streamt1_engine import StreamT1Engine\n"
              "engine = StreamT1Engine.from_pretrained('random-tiny', device='cpu')\n"
              "handle = engine.submit('a stream nobody reads', num_chunks=50, max_buffered_chunks=60)\n"
              "time.sleep(0.3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_concurrent_arrivals_take_every_free_slot_and_queue_place_then_get_one_line_full():
    """Arrivals while the worker is busy mid-chunk (it admits only at chunk boundaries): with max_streams=2,
    max_queue=2 and one stream running, exactly three of six simultaneous submits are accepted (one slot, two
    queue places), the others refused with the queue-full line; repeated."""
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", max_streams=2, max_queue=2)
    try:
        for repeat in range(4):
            gate, inside = threading.Event(), threading.Event()

            def hold(handle, index, record):
                inside.set()
                assert gate.wait(60)

            holder = engine.submit("the running stream", num_chunks=1, callback_on_chunk_end=hold)
            assert inside.wait(60)  # the worker is inside a chunk step: nothing is admitted until the gate opens
            arrivals = 6
            barrier = threading.Barrier(arrivals)
            answers = [None] * arrivals

            def arrive(i):
                barrier.wait()
                try:
                    answers[i] = engine.submit(f"arrival {repeat} {i}", num_chunks=1)
                except EngineBusy as exc:
                    answers[i] = exc

            threads = [threading.Thread(target=arrive, args=(i,)) for i in range(arrivals)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            accepted = [a for a in answers if not isinstance(a, EngineBusy)]
            refused = [a for a in answers if isinstance(a, EngineBusy)]
            assert len(accepted) + 1 == engine._scheduler.max_streams + engine._scheduler.max_queue
            assert len(refused) == arrivals - len(accepted)
            assert all("queue is full" in str(e) and "\n" not in str(e) for e in refused)
            gate.set()
            for h in [holder, *accepted]:
                h.result(timeout=300)
            assert engine.stats()["pages_in_use"] == 0 and engine.stats()["queued"] == 0
    finally:
        engine.close()


def test_a_cancel_mid_chunk_runs_no_further_forward_and_frees_the_pages(engine):
    """Cancelled from inside a denoising step (a forward hook after chunk 0): the chunk in progress stops
    before its next step; no VAE decode, context pass or later chunk runs, and every page is back."""
    assert engine.schedule.num_steps >= 2
    armed, forwards_after = [], []

    def arm(handle, index, record):
        armed.append(handle)

    def count_forward(module, args):
        if armed:
            forwards_after.append(1)
            if len(forwards_after) == 1:  # chunk 1, first denoising step
                armed[0].cancel()  # from the worker thread: takes effect before the next forward

    hook = engine.model.register_forward_pre_hook(count_forward)
    try:
        handle = engine.submit("cancelled mid-chunk", num_chunks=4, seed=5, callback_on_chunk_end=arm,
                               search=BEST_OF_3, **REWARDS)
        assert [c.index for c in handle.chunks(timeout=300)] in ([], [0])  # chunk 0 only, if taken in time
        handle._wait_released()
    finally:
        hook.remove()
    assert handle.status == "cancelled"
    assert len(forwards_after) == 1, f"{len(forwards_after) - 1} forwards ran after the cancel"
    assert len(handle.records) == 1  # chunk 1 never completed
    assert_pool_empty(engine)


def test_a_cancelled_stream_leaves_a_shared_batch_after_the_denoise_call(engine, alone):
    """Two streams share each forward; one is cancelled mid-step: the call finishes for the other (its rows
    need it), the cancelled one gets no decode/context pass, and the other equals itself alone."""
    armed, context_rows = [], []

    def arm(handle, index, record):
        if handle.request.prompt == "to cancel" and index == 0:
            armed.append(handle)

    def on_forward(module, args):
        x, attn = args[0], args[3]
        if attn.write_pages is not None and armed and armed[0].cancel_requested:
            context_rows.append(x.shape[0])
        if armed and not armed[0].cancel_requested:
            armed[0].cancel()

    hook = engine.model.register_forward_pre_hook(on_forward)
    try:
        other = engine.submit(**REQUESTS[0])
        cancelled = engine.submit("to cancel", num_chunks=5, seed=7, callback_on_chunk_end=arm)
        got = other.result(timeout=300)
        cancelled._wait_released()
    finally:
        hook.remove()
    assert cancelled.status == "cancelled" and len(cancelled.records) == 1
    assert_same(alone[0], got)
    assert context_rows and all(n == 1 for n in context_rows), "only the other stream's survivor is written"
    assert_pool_empty(engine)


def test_block_pool_growth_staged_on_the_host_frees_the_old_pages_before_allocating_the_new():
    """What a CUDA pool's growth does (``stage_on``), checked on CPU: the only device allocations are the new
    pool's K and V, made after the old pool's storage is gone (no moment holds both), with pages kept."""
    from streamt1_engine.cache import BlockPool
    from streamt1_engine.cache import block_pool as block_pool_module
    from streamt1_engine.config import StreamConfig, WanConfig

    cfg, stream = WanConfig.tiny(), StreamConfig.tiny()
    tokens = PagedKVCache(cfg, stream, 1, "cpu", torch.float32).page_tokens
    blocks = BlockPool.allocate(cfg, 4, tokens, "cpu", torch.float32)
    cache = PagedKVCache.shared(blocks, cfg, stream)
    pages = cache.new_chunk_pages(3, 6).tolist()
    torch.manual_seed(0)
    blocks.kv.k.normal_()
    blocks.kv.v.normal_()
    want_k, want_v = blocks.kv.k.clone(), blocks.kv.v.clone()
    old_k, old_v = weakref.ref(blocks.kv.k), weakref.ref(blocks.kv.v)
    allocations = []
    original = block_pool_module._new_pages

    def spy(shape, device, dtype):
        allocations.append((math.prod(shape) * torch.empty((), dtype=dtype).element_size(),
                            old_k() is None and old_v() is None))
        return original(shape, device, dtype)

    block_pool_module._new_pages = spy
    try:
        blocks.grow(10, stage_on="cpu")
    finally:
        block_pool_module._new_pages = original
    new_bytes = blocks.kv.nbytes() // 2
    assert allocations == [(new_bytes, True), (new_bytes, True)], "only the new K and V, after the old ones died"
    assert torch.equal(blocks.kv.k[:, :4], want_k) and torch.equal(blocks.kv.v[:, :4], want_v)
    assert blocks.num_pages == 10 and blocks.frame_pos[pages[2]] == 6 and int(blocks.kv.page_frame_pos[pages[0]]) == 6
    assert [cache.alloc() for _ in range(2)] == [3, 4] and blocks.num_free == 5

    def no_memory(shape, device, dtype):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    kept_k = blocks.kv.k.clone()
    block_pool_module._new_pages = no_memory
    try:
        with pytest.raises(StreamT1Error, match="ran out of memory .* keeps its 10 pages"):
            blocks.grow(20, stage_on="cpu")
    finally:
        block_pool_module._new_pages = original
    assert blocks.num_pages == 10 and torch.equal(blocks.kv.k, kept_k) and blocks.num_free == 5


def test_a_pool_growth_past_the_free_memory_fails_the_new_stream_in_one_line_not_the_running_one(alone):
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    try:
        first = engine.submit(**REQUESTS[2], max_buffered_chunks=1)
        next(first.chunks(timeout=300))  # running, its pool allocated
        engine._pool_room = lambda: (0, "free on the test device")  # the device is full now
        second = engine.submit(**REQUESTS[0])
        with pytest.raises(StreamT1Error, match="KV pool .* would grow to") as e:
            second.result(timeout=300)
        assert "\n" not in str(e.value) and second.status == "failed"
        rest = list(first.chunks(timeout=300))
        assert len(rest) + 1 == REQUESTS[2]["num_chunks"] and first.status == "finished"
        assert engine.stats()["pages_in_use"] == 0 and engine.stats()["streams_failed"] == 1
    finally:
        engine.close()
