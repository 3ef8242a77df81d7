"""Which frames every candidate attends to, chunk by chunk, for each model family's stream layout.

The expected frames are written from upstream's rule, not from the cache code: ``local_attn_size`` counts
the sink and the current chunk; a chunk leaves the window when it falls out of the last
``local_attn_size - sink_size`` frames; an APPEND-flagged chunk leaving the window joins the sink (at its
own frames) while the sink is below ``max_sink_size``; an EMA-flagged one, or an APPEND one with a full
sink, is blended into the newest sink chunk.
"""
import json

import pytest
import torch

from helpers import text_context, tiny_model
from streamt1_engine import StreamT1Engine
from streamt1_engine.cache import PagedKVCache
from streamt1_engine.config import SamplerConfig, StreamConfig
from streamt1_engine.errors import StreamT1Error
from streamt1_engine.loaders import BUILTIN_DIR, ENGINE_CONFIG_FILE
from streamt1_engine.sampler import make_schedule
from streamt1_engine.search.beam_search import BeamSearch, EagerDenoiser
from streamt1_engine.search.config import SearchConfig
from streamt1_engine.vae import SpaceToDepthVAE

CF = 3
NUM_CHUNKS = 40
SCHEDULE = make_schedule(SamplerConfig())


def flag_plan(num_chunks):
    """APPEND for chunks 1-8 (fills a sink of 3 to 15, then merges), DISCARD 9-14, then EMA and APPEND in turn."""
    plan = ["DISCARD"]
    for c in range(1, num_chunks):
        plan.append("APPEND" if c <= 8 else "DISCARD" if c <= 14 else ("EMA" if c % 2 else "APPEND"))
    return plan


def scores_for(plan):
    """Per-chunk (short, long) that make the routing produce ``plan`` (short threshold 0, long threshold 0.2)."""
    short, long, out = 0.0, 0.0, []
    for c, flag in enumerate(plan):
        if c > 0:
            short = -1e6 if flag == "DISCARD" else 1e3 * c  # above / below the mean of every earlier chunk
            long = long - 1.0 if flag == "APPEND" else long  # a drop of 1 > 0.2 is "long low"
        out.append((short, long))
    return out


def expected_by_rule(plan, local, sink, max_sink):
    """Per chunk c: (sorted frames it attends to, its own included; {(evicted frame, sink frame)} blended
    into the sink before it ran)."""
    keep = (local - sink) // CF  # non-sink chunks a chunk attends to, its own included
    sink_chunks = list(range(sink // CF))
    out = []
    for c in range(len(plan)):
        merges = set()
        leaving = c - keep  # the chunk that falls out of the window as chunk c arrives
        if leaving >= sink // CF:
            if plan[leaving] == "APPEND" and len(sink_chunks) * CF < max_sink:
                sink_chunks.append(leaving)
            elif plan[leaving] in ("EMA", "APPEND") and sink_chunks:
                merges.add((leaving * CF, sink_chunks[-1] * CF))
        visible = {ch for ch in sink_chunks if ch <= c} | set(range(max(sink // CF, leaving + 1), c + 1)) | {c}
        out.append((sorted(f for ch in visible for f in range(ch * CF, ch * CF + CF)), merges))
    return out


class RecordingDenoiser(EagerDenoiser):
    """Remembers, for every denoise and context call, the frames each row attends to."""

    def __init__(self, *args, cache):
        super().__init__(*args)
        self.cache, self.calls = cache, []

    def _frames(self, attn):
        rows = []
        for table, count, start in zip(attn.page_table.tolist(), attn.num_pages.tolist(), attn.frame_start.tolist()):
            pages = table[:count]
            for p in pages:  # the device positions the kernels rotate with agree with the host mirror
                assert int(self.cache.pool.page_frame_pos[p]) == self.cache.frame_pos[p]
            cached = [self.cache.frame_pos[p] + j for p in pages for j in range(CF)]
            rows.append(sorted(cached + [start + j for j in range(CF)]))
        return rows

    def denoise(self, noise, attn, text=None):
        self.calls.append(("denoise", self._frames(attn)))
        return super().denoise(noise, attn, text)

    def context(self, x0, attn, text=None):
        self.calls.append(("context", self._frames(attn)))
        return super().context(x0, attn, text)


def run_stream(stream: StreamConfig, plan, num_chunks):
    model = tiny_model(in_channels=12, out_channels=12, num_layers=1)
    vae, text = SpaceToDepthVAE(2), text_context(model)
    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=4)
    cache = PagedKVCache(model.config, stream, PagedKVCache.pages_needed(stream, 2, 4), torch.device("cpu"),
                         torch.float32)
    scores = scores_for(plan)
    state = {"chunk": 0}

    def short(frames, prompt):
        return torch.full((frames.shape[0],), scores[state["chunk"]][0])

    def long(frames, prompt):
        return torch.full((frames.shape[0],), scores[state["chunk"]][1])

    denoiser = RecordingDenoiser(model, SCHEDULE, text, cache=cache)
    runner = BeamSearch(model=model, vae=vae, cache=cache, text=text, prompt="p", search=search, schedule=SCHEDULE,
                        num_chunks=num_chunks, seed=0, latent_shape=(12, CF, stream.latent_height, stream.latent_width),
                        short_reward=short, long_reward=long, attention_backend="torch", denoiser=denoiser)
    merges = [set() for _ in range(num_chunks + 1)]  # by the chunk that first attends the blended sink
    flush = cache.flush

    def recording_flush(alpha):
        ops = flush(alpha)
        for kind, src, sink, _dst in ops:
            if kind == 1:  # EMA: evicted page src blended into sink page
                merges[state["chunk"] + 1].add((cache.frame_pos[src], cache.frame_pos[sink]))
        return ops

    cache.flush = recording_flush
    with torch.no_grad():
        for c in range(num_chunks):
            state["chunk"] = c
            record = runner.step()
            assert record.route_flags == [plan[c]] * 2, f"chunk {c}: the scores must route as planned"
            cache.check_consistency([b.pages for b in runner.beams])
    return denoiser.calls, merges, runner


LOCAL_PRESETS = [("stream-t1", 12, 3, 15), ("longlive", 12, 3, 3)]


@pytest.mark.parametrize("name,local,sink,max_sink", LOCAL_PRESETS)
def test_local_presets_attend_upstream_frames_over_40_chunks(name, local, sink, max_sink):
    stream = StreamConfig.preset(name, latent_height=2, latent_width=4)
    assert (stream.local_attn_size, stream.sink_size, stream.max_sink_size) == (local, sink, max_sink)
    plan = flag_plan(NUM_CHUNKS)
    calls, merges, runner = run_stream(stream, plan, NUM_CHUNKS)
    expected = expected_by_rule(plan, local, sink, max_sink)
    denoise = [rows for kind, rows in calls if kind == "denoise"]
    context = [rows for kind, rows in calls if kind == "context"]
    assert len(denoise) == len(context) == NUM_CHUNKS
    for c, (frames, merged) in enumerate(expected):
        assert denoise[c] == [frames] * 4, f"chunk {c}"  # B*K candidates at chunk 0, B per beam later
        assert context[c] == [frames] * 2, f"chunk {c} (context pass of the survivors)"
        assert merges[c] == merged, f"chunk {c}"
    # written out for a few chunks: 3 sink + 6 cached + own 3 = 12 frames once the window is full
    assert expected[3][0] == list(range(12))
    if name == "stream-t1":  # chunks 1-4 are appended as they leave the window (sink 15), 9 non-sink frames
        assert expected[4][0] == list(range(15))
        assert expected[8][0] == list(range(15)) + list(range(18, 27))
        assert runner.records[-1].sink_frames == [15, 15]
        assert (18, 12) in merges[9]  # chunk 6 (APPEND, full sink) blends into the newest sink chunk, frames 12-14
    else:
        assert expected[4][0] == [0, 1, 2] + list(range(6, 15))
        assert expected[8][0] == [0, 1, 2] + list(range(18, 27))
        assert (3, 0) in merges[4]  # chunk 1 (APPEND, sink full at 3 frames) blends into frames 0-2
    assert max(len(f) for f, _ in expected) == max_sink + local - sink


def test_tiny_model_layout_keeps_its_15_frames():
    """The embedded model attends to 3 sink + 9 cached + own 3 frames, as it was trained."""
    tiny = StreamConfig.from_dict(json.loads((BUILTIN_DIR / ENGINE_CONFIG_FILE).read_text())["stream"])
    assert (tiny.local_attn_size, tiny.sink_size, tiny.max_sink_size) == (15, 3, 9)
    stream = StreamConfig(num_frame_per_block=3, local_attn_size=15, sink_size=3, max_sink_size=9,
                          latent_height=2, latent_width=4)
    plan = ["DISCARD"] * 8
    calls, _, _ = run_stream(stream, plan, 8)
    denoise = [rows for kind, rows in calls if kind == "denoise"]
    assert denoise[5][0] == [0, 1, 2] + list(range(6, 18))
    for c, (frames, _) in enumerate(expected_by_rule(plan, 15, 3, 9)):
        assert denoise[c] == [frames] * 4


@pytest.mark.parametrize("name", ["self-forcing", "causvid"])
def test_global_presets_attend_everything_up_to_21_frames_then_stop(name):
    stream = StreamConfig.preset(name, latent_height=2, latent_width=4)
    assert stream.local_attn_size == -1 and stream.sink_size == 0 and stream.max_stream_frames == 21
    plan = flag_plan(7)
    calls, merges, runner = run_stream(stream, plan, 7)
    denoise = [rows for kind, rows in calls if kind == "denoise"]
    for c in range(7):  # global attention: every earlier frame, no sink, nothing merged or appended
        assert denoise[c] == [list(range((c + 1) * CF))] * 4
        assert not merges[c]
    with pytest.raises(StreamT1Error, match="global attention covers at most 21 latent frames"):
        runner.step()  # chunk 7 would need frame 21: upstream's 32760-token cache is full there
    engine = StreamT1Engine.from_pretrained("random-tiny", stream_preset=name)
    with pytest.raises(StreamT1Error, match="too long for global attention: at most 7 chunks"):
        engine.generate("a cat", num_chunks=NUM_CHUNKS)


def test_old_engine_json_keys_convert_with_one_warning():
    old = {"chunk_frames": 3, "window_frames": 12, "sink_frames": 3, "max_sink_frames": 9, "latent_height": 8,
           "latent_width": 8}
    with pytest.warns(UserWarning, match="old keys") as caught:
        converted = StreamConfig.from_dict(old)
    assert len(caught) == 1
    assert converted == StreamConfig(num_frame_per_block=3, local_attn_size=15, sink_size=3, max_sink_size=9,
                                     latent_height=8, latent_width=8)
    with pytest.raises(StreamT1Error, match="mixes old keys"):
        StreamConfig.from_dict({"window_frames": 12, "sink_size": 3})


@pytest.mark.parametrize("kwargs,match", [
    (dict(local_attn_size=3, sink_size=3), "leaves no room"),
    (dict(local_attn_size=13), "multiple of num_frame_per_block"),
    (dict(local_attn_size=-1), "global attention .* has no sink"),
    (dict(max_sink_size=2), "max_sink_size"),
])
def test_contradictory_stream_layouts_are_refused(kwargs, match):
    with pytest.raises(StreamT1Error, match=match):
        StreamConfig(**kwargs)
