"""Several streams in one engine: each equals itself alone (fp32, bit for bit), pages come back, queues bound.

The streams' candidates run in one forward per chunk step (checked by counting the batched calls), so these
tests fail if batching made a stream depend on the others (padding, per-batch kernels) or if pages leaked.
"""
import asyncio
import threading
import time

import pytest
import torch

from helpers import brightness, smoothness
from streamt1_engine import SearchConfig, StreamT1Engine, StreamT1Error
from streamt1_engine import engine as engine_module
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
    blocks = engine._blocks
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
    assert max(batch_sizes) == 4, "the streams must have shared forwards"
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


def test_full_queue_refuses_with_one_clear_error():
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", max_streams=1, max_queue=1)
    try:
        running = engine.submit("a", num_chunks=4, max_buffered_chunks=1)  # pauses after its first chunk
        deadline = time.monotonic() + 60
        while running.status != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = engine.submit("b", num_chunks=2)
        assert queued.status == "queued" and engine.stats()["queued"] == 1
        with pytest.raises(StreamT1Error, match="queue is full") as e:
            engine.submit("c", num_chunks=2)
        assert "\n" not in str(e.value)
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

    monkeypatch.delattr(BeamSearch, "switch_prompt", raising=False)
    with pytest.raises(StreamT1Error, match="prompt switching is not available"):
        engine.submit("a", num_chunks=3, prompt_schedule={1: "b"})
    monkeypatch.setattr(BeamSearch, "switch_prompt", switch_prompt, raising=False)
    with pytest.raises(StreamT1Error, match="prompt_schedule keys"):
        engine.submit("a", num_chunks=3, prompt_schedule={3: "b"})
    handle = engine.submit("a", num_chunks=4, prompt_schedule={2: "b"}, max_buffered_chunks=1)
    next(handle.chunks(timeout=300))
    handle.switch_prompt("c")
    list(handle.chunks(timeout=300))
    assert (2, "b") in calls and any(p == "c" for _, p in calls) and all(i >= 1 for i, _ in calls)


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
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.astream("a blue square", num_chunks=6, seed=2):
                started.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
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
    with pytest.raises(StreamT1Error, match="closed"):
        engine.submit("c")
