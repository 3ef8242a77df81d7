"""Prompt switching mid-stream: LongLive's recache of the attended chunks with the new prompt, and schedules."""
import json

import pytest
import torch

from helpers import BeamPages, brightness, smoothness, text_context, tiny_model
from streamt1_engine import StreamT1Engine
from streamt1_engine.cache import PagedKVCache
from streamt1_engine.config import SamplerConfig, StreamConfig
from streamt1_engine.errors import StreamT1Error
from streamt1_engine.model import wan
from streamt1_engine.model.wan import ChunkAttention
from streamt1_engine.prompt_schedule import (load_prompt_schedule, parse_prompt_schedule, split_schedule,
                                             switch_before)
from streamt1_engine.sampler import make_schedule
from streamt1_engine.search.beam_search import BeamSearch, recache_span, to_float
from streamt1_engine.search.config import SearchConfig
from streamt1_engine.tiny import metrics
from streamt1_engine.tiny.procedural import parse_prompt
from streamt1_engine.vae import SpaceToDepthVAE

LOCAL = StreamConfig.tiny(local_attn_size=12, sink_size=3, max_sink_size=9)  # sink 1 page, window 2 pages
GLOBAL = StreamConfig.tiny(local_attn_size=-1, sink_size=0, max_sink_size=0)  # at most 7 chunks, no eviction
SCHEDULE = make_schedule(SamplerConfig())
BEAMS = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=2)


def make_runner(stream, search=BEAMS, num_chunks=8, seed=7, short=brightness, long=smoothness, context_timestep=0.0):
    model = tiny_model(seed=0, in_channels=12, out_channels=12)
    cache = PagedKVCache(model.config, stream, PagedKVCache.pages_needed(stream, search.survivors,
                                                                        search.first_chunk_candidates),
                         torch.device("cpu"), torch.float32)
    runner = BeamSearch(model=model, vae=SpaceToDepthVAE(2), cache=cache, text=text_context(model, seed=1),
                        prompt="first", search=search, schedule=SCHEDULE, num_chunks=num_chunks, seed=seed,
                        latent_shape=(12, 3, stream.latent_height, stream.latent_width), short_reward=short,
                        long_reward=long, attention_backend="torch", context_timestep=context_timestep)
    return runner, cache


def run(runner, switches: dict, emit: bool = False):
    """Drive the search as an engine does: switch before a chunk, then step; optionally hand out final chunks."""
    emitted = 0
    with torch.no_grad():
        for c in range(runner.num_chunks):
            if c in switches:
                runner.switch_prompt(*switches[c])
                runner.cache.check_consistency([b.pages for b in runner.beams])
            runner.step()
            runner.cache.check_consistency([b.pages for b in runner.beams])
            if emit:
                final = runner.final_chunks()
                for node in final[emitted:]:
                    runner.mark_emitted(node)
                emitted = max(emitted, len(final))
    return runner


def joint_pass_kv(model, latents, text, first_frame, timestep, sink=None):
    """Per layer (k, v) [F*tokens, H, D] of one bidirectional pass over ``latents`` [C, F, h, w] at frames
    ``first_frame``.., recorded from a forward that writes no pages: the dense path, or with ``sink`` (a private
    cache holding copies of the sink pages) the paged path reading just those pages."""
    if sink is None:
        attn = ChunkAttention.dense(1, "cpu", frame_start=first_frame)
    else:
        table, counts = sink.page_table([BeamPages(list(range(sink.pool.num_pages)))])
        attn = ChunkAttention(sink.pool, table, counts, torch.tensor([first_frame]))
    keys, values = [], []
    original = wan.qk_norm_rope

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        keys.append(out[2][0])
        return out

    hooks = [blk.self_attn.v.register_forward_hook(lambda m, i, o: values.append(o[0].unflatten(-1, (4, -1))))
             for blk in model.blocks]
    wan.qk_norm_rope = record
    try:
        with torch.no_grad():
            model(latents[None], torch.tensor([timestep]), text, attn)
    finally:
        wan.qk_norm_rope = original
        for h in hooks:
            h.remove()
    return keys, values


@pytest.mark.parametrize("stream,chunks,keep_sink", [(LOCAL, 6, False), (GLOBAL, 4, False), (LOCAL, 6, True)],
                         ids=["local", "global", "local-keep-sink"])
def test_recache_writes_the_new_prompts_kv_of_a_joint_pass_over_the_attended_chunks(stream, chunks, keep_sink):
    runner, cache = make_runner(stream, context_timestep=2.0)
    with torch.no_grad():
        for _ in range(chunks):
            runner.step()
    tails = [b.node.lineage() for b in runner.beams]
    old_sinks = []
    for beam in runner.beams:
        private = PagedKVCache(runner.model.config, stream, max(len(beam.pages.sink), 1), "cpu", torch.float32)
        private.pool.k[:, :len(beam.pages.sink)] = cache.pool.k[:, beam.pages.sink]
        private.pool.v[:, :len(beam.pages.sink)] = cache.pool.v[:, beam.pages.sink]
        old_sinks.append((list(beam.pages.sink), private))
    new_text = text_context(runner.model, seed=2)
    switch = runner.switch_prompt("second", new_text, keep_sink=keep_sink)
    cache.check_consistency([b.pages for b in runner.beams])

    span = min(chunks, 7 if stream.is_global else 12 // 3)  # LongLive: its attention span, 12 frames or all
    first = chunks - span + (1 if keep_sink else 0)  # global_sink: the span's first (sink-size) chunk is not used
    assert switch.recached_chunks == list(range(first, chunks)) and switch.pages_written == 2 * (chunks - first)
    tokens = cache.page_tokens
    for beam, lineage, (sink_pages, private) in zip(runner.beams, tails, old_sinks):
        latents = torch.cat([n.latents for n in lineage[first:]], dim=1)
        keys, values = joint_pass_kv(runner.model, latents, new_text, first * 3, 2.0, private if keep_sink else None)
        if stream.is_global:  # every chunk stays in the window
            expected = {page: j for j, page in enumerate(beam.pages.window)}
            assert beam.pages.sink == []
        elif keep_sink:  # the old sink pages stay, the span's last two chunks are the window
            assert beam.pages.sink == sink_pages and len(beam.pages.window) == 2
            expected = {beam.pages.window[0]: chunks - first - 2, beam.pages.window[1]: chunks - first - 1}
        else:  # LongLive: the span's first chunk becomes the sink, its last two the window, the one between goes
            assert len(beam.pages.sink) == 1 and len(beam.pages.window) == stream.window_pages == 2
            expected = {beam.pages.sink[0]: 0, beam.pages.window[0]: span - 2, beam.pages.window[1]: span - 1}
        for page, j in expected.items():
            assert cache.frame_pos[page] == (first + j) * 3 == int(cache.pool.page_frame_pos[page])
            for layer in range(len(keys)):
                torch.testing.assert_close(cache.pool.k[layer, page], keys[layer][j * tokens:(j + 1) * tokens],
                                           atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cache.pool.v[layer, page], values[layer][j * tokens:(j + 1) * tokens],
                                           atol=1e-5, rtol=1e-5)
    in_use = cache.pool.num_pages - cache.num_free
    held = {p for b in runner.beams for p in b.pages.all_pages()}
    assert in_use == len(held)  # the old window (and sink) and the evicted chunk are freed
    runner.release()
    assert cache.num_free == cache.pool.num_pages


def test_keep_sink_is_the_default_recache_while_the_span_starts_at_frame_0():
    """LongLive's global_sink protects the sink only in a recompute after frame 0 (``is_recompute``)."""
    runs = []
    for keep_sink in (False, True):
        runner, _ = make_runner(LOCAL, num_chunks=6)
        with torch.no_grad():
            for c in range(6):
                if c == 4:  # the span, chunks 0..3, starts at frame 0
                    switch = runner.switch_prompt("second", text_context(runner.model, seed=2), keep_sink=keep_sink)
                    assert switch.recached_chunks == [0, 1, 2, 3]
                runner.step()
        runs.append(runner)
    assert [r.to_dict() for r in runs[0].records] == [r.to_dict() for r in runs[1].records]
    assert all(torch.equal(a.node.latents, b.node.latents) for a, b in zip(runs[0].beams, runs[1].beams))


def test_a_same_prompt_switch_still_recomputes_the_cache_as_longlive_does():
    """LongLive recaches at every switch, whatever the prompt: the joint pass is not the causal one that wrote
    the pages, and the sink moves to the span's first chunk, so the stream is not the unswitched one."""
    runner, cache = make_runner(LOCAL, search=SearchConfig(strategy="none"))
    with torch.no_grad():
        for _ in range(6):
            runner.step()
    window_before = [cache.pool.k[:, p].clone() for p in runner.beams[0].pages.window]
    assert cache.frame_pos[runner.beams[0].pages.sink[0]] == 0
    runner.switch_prompt("first", runner.text)
    pages = runner.beams[0].pages
    assert cache.frame_pos[pages.sink[0]] == 2 * 3  # chunk 6 - 4
    for before, page in zip(window_before, pages.window):
        assert (cache.pool.k[:, page] - before).abs().max() > 1e-3


def test_a_switch_before_the_first_chunk_or_an_empty_schedule_changes_nothing():
    plain, _ = make_runner(LOCAL)
    run(plain, {})
    for switches in ({}, {0: ("first", plain.text)}):
        other, _ = make_runner(LOCAL)
        schedule = parse_prompt_schedule({c: p for c, (p, _) in switches.items()}, num_chunks=8)
        run(other, {c: (p, other.text) for c, p in schedule})
        assert [r.to_dict() for r in other.records] == [r.to_dict() for r in plain.records]
        for a, b in zip(other.beams, plain.beams):
            assert all(torch.equal(x.frames, y.frames) for x, y in zip(a.node.lineage(), b.node.lineage()))


def test_rewards_and_the_final_pick_score_against_the_new_prompt():
    seen = []

    def short(frames, prompt):
        seen.append(("short", prompt))
        return brightness(frames, prompt)

    def long(frames, prompt):
        seen.append(("long", prompt))
        return smoothness(frames, prompt)

    runner, _ = make_runner(LOCAL, num_chunks=5, short=short, long=long)
    run(runner, {3: ("second", text_context(runner.model, seed=2))})
    assert [p for kind, p in seen if kind == "short"] == ["first"] * 3 + ["second"] * 2
    assert [p for kind, p in seen if kind == "long"] == ["first"] * 3 + ["second"] * 2
    seen.clear()
    runner.choose_final(long)
    assert seen == [("long", "second")]
    assert [runner.prompt_of(c) for c in range(5)] == ["first"] * 3 + ["second"] * 2
    assert [s.to_dict()["chunk"] for s in runner.prompt_switches] == [3]


def test_refcounts_and_sink_stay_consistent_through_switches_with_memory_sinking():
    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=2, short_threshold=-1.0,
                          long_threshold=-1.0)  # every evicted chunk is APPENDed: the sink grows to its maximum
    runner, cache = make_runner(LOCAL, search=search, num_chunks=14)
    switches = {2: "a", 9: "b", 10: "c"}
    emitted = 0
    with torch.no_grad():
        for c in range(14):
            if c in switches:
                sinks = [len(b.pages.sink) for b in runner.beams]
                runner.switch_prompt(switches[c], text_context(runner.model, seed=c))
                cache.check_consistency([b.pages for b in runner.beams])
                assert [len(b.pages.sink) for b in runner.beams] == [LOCAL.sink_pages] * 2, sinks
                assert c != 9 or sinks == [LOCAL.max_sink_pages] * 2  # grown by APPEND, rebuilt from one chunk
            runner.step()
            cache.check_consistency([b.pages for b in runner.beams])
            final = runner.final_chunks()
            for node in final[emitted:]:
                runner.mark_emitted(node)
            emitted = max(emitted, len(final))
    assert [s.recached_chunks for s in runner.prompt_switches] == [[0, 1], [5, 6, 7, 8], [6, 7, 8, 9]]
    runner.release()
    assert cache.num_free == cache.pool.num_pages


def test_latents_a_switch_needs_survive_emission_and_older_ones_are_dropped():
    runner, _ = make_runner(LOCAL, search=SearchConfig(strategy="none", window_chunks=2), num_chunks=9)
    run(runner, {}, emit=True)
    lineage = runner.beams[0].node.lineage()
    span = recache_span(LOCAL)
    assert all(n.emitted for n in lineage[:-1])
    assert all(n.latents is None for n in lineage[:-span])  # device and host memory stay flat
    assert all(n.latents is not None for n in lineage[-span:])
    with pytest.raises(StreamT1Error, match="no chunk left"):
        runner.switch_prompt("late", runner.text)


def test_after_a_switch_the_trained_model_follows_the_new_prompt():
    engine = StreamT1Engine.from_pretrained("tiny")
    a = "a red circle moving right on a blue background"
    b = "a yellow square moving left on a green background"
    stream = engine.config.stream

    def encode(prompt):
        return engine.model.encode_text(engine.text_encoder.encode([prompt]).to(engine.device))

    def frames(switches):
        search = SearchConfig(strategy="none")
        cache = PagedKVCache(engine.config.model, stream, PagedKVCache.pages_needed(stream, 1, 1), engine.device,
                             engine.dtype)
        runner = BeamSearch(model=engine.model, vae=engine.vae, cache=cache, text=encode(a), prompt=a, search=search,
                            schedule=engine.schedule, num_chunks=8, seed=3,
                            latent_shape=(engine.config.model.in_channels, 3, stream.latent_height,
                                          stream.latent_width),
                            short_reward=None, long_reward=None, attention_backend="torch",
                            context_timestep=engine.config.sampler.context_timestep)
        run(runner, {c: (p, encode(p)) for c, p in switches.items()})
        return [n.frames for n in runner.beams[0].node.lineage()]

    plain, switched = frames({}), frames({6: b})  # 6 > the recache span (5 chunks): the sink moves too
    assert all(torch.equal(x, y) for x, y in zip(plain[:6], switched[:6]))
    for video, want, other in ((switched, b, a), (plain, a, b)):
        after = to_float(torch.cat(video[6:]))[None]
        assert metrics.background_fidelity(after, parse_prompt(want)).item() > 0.8
        assert metrics.background_fidelity(after, parse_prompt(other)).item() < 0.2


# ---- schedules ----------------------------------------------------------------------------------------

def test_schedule_forms_parse_to_sorted_switches(tmp_path):
    want = [(0, "a"), (2, "b"), (5, "c")]
    assert parse_prompt_schedule({5: "c", "2": "b", 0: "a"}, num_chunks=6) == want
    assert parse_prompt_schedule(json.dumps({"5": "c", "2": "b", "0": "a"}), num_chunks=6) == want
    assert parse_prompt_schedule([(0, "a"), (2, "b"), (5, "c")], num_chunks=6) == want
    line = {"prompts": ["a", "b", "c"], "switch_chunk_indices": [2, 5]}
    assert parse_prompt_schedule(line, num_chunks=6) == want
    # LongLive's latent-frame indices: the switch is at the first chunk starting at or after the frame
    frames = {"prompts": ["a", "b", "c"], "switch_frame_indices": "4, 15"}
    assert parse_prompt_schedule(frames, num_chunks=6, chunk_frames=3) == want
    assert parse_prompt_schedule(None, num_chunks=3) == [] and parse_prompt_schedule({}, num_chunks=3) == []
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompts": ["x"]}) + "\n\n" + json.dumps(line) + "\n")
    assert load_prompt_schedule(path, num_chunks=6, line=1) == want
    assert load_prompt_schedule(path, num_chunks=6) == [(0, "x")]
    assert split_schedule(want) == ("a", [(2, "b"), (5, "c")])
    assert split_schedule([(3, "b")], "a") == ("a", [(3, "b")])
    assert switch_before(want, 2) == "b" and switch_before(want, 3) is None


@pytest.mark.parametrize("spec,kwargs,message", [
    ({6: "x"}, {}, "out of range"),
    ({-1: "x"}, {}, "non-negative integer"),
    ({2: "  "}, {}, "empty"),
    ({2: 7}, {}, "empty or not text"),
    ([(3, "a"), (2, "b")], {}, "strictly increasing"),
    ({"2": "a", 2: "b"}, {}, "strictly increasing"),
    ({True: "a"}, {}, "non-negative integer"),
    ({"1.5": "a"}, {}, "non-negative integer"),
    ("{not json", {}, "not valid JSON"),
    (42, {}, "must be"),
    ([(1, "a", "b")], {}, "pairs"),
    ({"prompts": ["a", "b"], "switch_chunk_indices": [2, 3]}, {}, "need 1 switch indices"),
    ({"prompts": ["a", "b"], "switch_chunk_indices": [0]}, {}, "after chunk 0"),
    ({"prompts": ["a", "b", "c"], "switch_chunk_indices": [4, 3]}, {}, "strictly increasing"),
    ({"prompts": ["a", "b", "c"], "switch_frame_indices": [4, 5]}, {"chunk_frames": 3}, "increasing chunks"),
    ({"prompts": ["a", "b"], "switch_frame_indices": [4]}, {}, "frames per chunk"),
    ({"prompts": ["a", "b"], "switch_chunk_indices": [1], "switch_frame_indices": [3]}, {}, "not both"),
    ({"prompts": ["a"], "seed": 3}, {}, "unknown keys"),
    ({"prompts": []}, {}, "non-empty list"),
])
def test_schedule_errors_are_clear(spec, kwargs, message):
    with pytest.raises(StreamT1Error, match=message):
        parse_prompt_schedule(spec, num_chunks=6, **kwargs)


def test_split_schedule_refuses_two_starting_prompts():
    with pytest.raises(StreamT1Error, match="differ"):
        split_schedule([(0, "a")], "b")
    with pytest.raises(StreamT1Error, match="prompt is empty"):
        split_schedule([(2, "a")], None)
