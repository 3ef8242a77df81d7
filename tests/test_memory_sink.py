"""Memory sinking on the paged cache against a plain list-of-tensors model of the same rules.

Keys are stored rotated at their page's frames, so an EMA merge first moves the evicted keys onto the
sink's frames; the list model does that rotation on its own, with complex numbers.
"""
import random

import torch

from helpers import BeamPages, RouteFlag, make_cache, move_frames, tiny_model
from streamt1_engine.config import StreamConfig

ALPHA = 0.9


class ListCache:
    """Reference: a beam's sink and window as lists of (k, v, frame position) copies."""

    def __init__(self, stream: StreamConfig):
        self.stream = stream
        self.sink, self.window = [], []

    def copy(self):
        other = ListCache(self.stream)
        other.sink, other.window = list(self.sink), list(self.window)
        return other

    def commit(self, entry, flag):
        if len(self.sink) < self.stream.sink_pages and not self.window:
            self.sink.append(entry)
            return
        self.window.append((entry, flag))
        if len(self.window) > self.stream.window_pages:
            (k, v, pos), flag = self.window.pop(0)
            if flag == RouteFlag.APPEND and len(self.sink) < self.stream.max_sink_pages:
                self.sink.append((k, v, pos))
            elif flag in (RouteFlag.EMA, RouteFlag.APPEND) and self.sink:
                sk, sv, spos = self.sink[-1]
                self.sink[-1] = (ALPHA * sk + (1 - ALPHA) * move_frames(k, spos - pos), ALPHA * sv + (1 - ALPHA) * v,
                                 spos)

    def entries(self):
        return self.sink + [e for e, _ in self.window]


def write_random_page(cache, frame_start, gen):
    page = int(cache.new_chunk_pages(1, frame_start)[0])
    cache.pool.k[:, page] = torch.randn(cache.pool.k[:, page].shape, generator=gen)
    cache.pool.v[:, page] = torch.randn(cache.pool.v[:, page].shape, generator=gen)
    return page, (cache.pool.k[:, page].clone(), cache.pool.v[:, page].clone(), frame_start)


def assert_beam_matches(cache, beam: BeamPages, ref: ListCache):
    pages = beam.all_pages()
    assert len(pages) == len(ref.entries())
    assert len(beam.sink) == len(ref.sink)
    for page, (k, v, pos) in zip(pages, ref.entries()):
        torch.testing.assert_close(cache.pool.k[:, page], k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.pool.v[:, page], v, atol=1e-6, rtol=1e-6)
        assert int(cache.pool.page_frame_pos[page]) == pos == cache.frame_pos[page]


def test_long_stream_two_beams_with_forks():
    """Two beams forked from one parent every few chunks, random flags, more chunks than window + sink."""
    model = tiny_model(num_layers=2)
    stream = StreamConfig.tiny(local_attn_size=15, sink_size=3, max_sink_size=9)
    cache = make_cache(model, stream, num_pages=cache_pages(stream))
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    beams, refs = [BeamPages()], [ListCache(stream)]
    free_after = []
    for chunk in range(30):
        new_beams, new_refs = [], []
        for slot in range(2):  # each chunk: two survivors, parents chosen at random (siblings share pages)
            parent = rng.randrange(len(beams))
            new_beams.append(cache.fork(beams[parent]))
            new_refs.append(refs[parent].copy())
        for b in beams:
            cache.drop(b)
        for beam, ref in zip(new_beams, new_refs):
            page, entry = write_random_page(cache, chunk * 3, gen)
            flag = rng.choice(list(RouteFlag)) if chunk > 0 else RouteFlag.DISCARD
            cache.commit(beam, page, flag)
            ref.commit(entry, flag)
        cache.flush(ALPHA)
        beams, refs = new_beams, new_refs
        cache.check_consistency(beams)
        for beam, ref in zip(beams, refs):
            assert_beam_matches(cache, beam, ref)
            assert len(beam.sink) <= stream.max_sink_pages
        free_after.append(cache.num_free)
    # memory is flat: the pool never grows, and pages in use stay bounded by the worst case
    assert min(free_after) >= 0
    used = [cache.pool.num_pages - f for f in free_after]
    assert max(used) <= 2 * stream.max_pages_per_beam


def cache_pages(stream):
    from streamt1_engine.cache import PagedKVCache
    return PagedKVCache.pages_needed(stream, num_beams=2, num_candidates=4)


def test_each_route_alone():
    model = tiny_model(num_layers=1)
    stream = StreamConfig.tiny(local_attn_size=9, sink_size=3, max_sink_size=6)  # window: 1 cached page
    for flag, sink_len in [(RouteFlag.DISCARD, 1), (RouteFlag.EMA, 1), (RouteFlag.APPEND, 2)]:
        cache = make_cache(model, stream, num_pages=8)
        gen = torch.Generator().manual_seed(1)
        beam = BeamPages()
        entries = []
        for chunk in range(3):
            page, entry = write_random_page(cache, chunk * 3, gen)
            entries.append(entry)
            cache.commit(beam, page, flag if chunk else RouteFlag.DISCARD)
            cache.flush(ALPHA)
        assert len(beam.sink) == sink_len
        sink_k = cache.pool.k[:, beam.sink[0]]
        if flag == RouteFlag.EMA:
            # the evicted page (frames 3-5) moves 3 frames back onto the sink's frames 0-2, then blends
            torch.testing.assert_close(sink_k, ALPHA * entries[0][0] + (1 - ALPHA) * move_frames(entries[1][0], -3))
            assert not torch.allclose(sink_k, ALPHA * entries[0][0] + (1 - ALPHA) * entries[1][0])
        else:
            torch.testing.assert_close(sink_k, entries[0][0])
        if flag == RouteFlag.APPEND:
            torch.testing.assert_close(cache.pool.k[:, beam.sink[1]], entries[1][0])
            assert int(cache.pool.page_frame_pos[beam.sink[1]]) == 3  # keeps its own positions
        assert cache.num_free == 8 - len(beam.all_pages())


def test_ema_into_shared_sink_copies_on_write():
    model = tiny_model(num_layers=1)
    stream = StreamConfig.tiny(local_attn_size=9, sink_size=3, max_sink_size=3)
    cache = make_cache(model, stream, num_pages=8)
    gen = torch.Generator().manual_seed(2)
    parent = BeamPages()
    page, sink_entry = write_random_page(cache, 0, gen)
    cache.commit(parent, page, RouteFlag.DISCARD)
    page, _ = write_random_page(cache, 3, gen)
    cache.commit(parent, page, RouteFlag.EMA)
    shared_sink = parent.sink[0]
    a, b = cache.fork(parent), cache.fork(parent)
    cache.drop(parent)
    for beam, flag in [(a, RouteFlag.DISCARD), (b, RouteFlag.DISCARD)]:
        page, _ = write_random_page(cache, 6, gen)
        cache.commit(beam, page, flag)  # evicts the shared EMA-flagged page from both
    cache.flush(ALPHA)
    # both merges copy: the shared sink page must stay intact until every merge of the launch has read it
    assert len({a.sink[0], b.sink[0], shared_sink}) == 3
    assert cache.refcount[shared_sink] == 0
    for beam in (a, b):
        assert not torch.equal(cache.pool.k[:, beam.sink[0]], sink_entry[0])
    torch.testing.assert_close(cache.pool.k[:, a.sink[0]], cache.pool.k[:, b.sink[0]])
    cache.check_consistency([a, b])
