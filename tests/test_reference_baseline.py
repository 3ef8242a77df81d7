"""The reference baseline of bench/bench_reference.py runs Stream-T1 the way the official code does.

Each expectation below is written out from the official rules (seed numbering, a 12-frame attention window
that includes the 3-frame sink, APPEND growing the sink to 15 frames, EMA blending into the newest sink
frames, cold decodes for the rewards), not taken from the code under test.
"""
import math

import pytest
import torch

from test_bench_smoke import load

SIGMA = -0.1  # the official noise fusion sigma


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is far too small for threads; on a busy machine they only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScriptedRewards:
    """Short score grows with every call (so every later chunk is "short high"); the long score of chunk c is
    ``long_by_chunk[c]`` plus a tiny per-candidate term, so the last candidate of each chunk scores best."""

    def __init__(self, long_by_chunk, candidates=4):
        self.long_by_chunk, self.candidates = long_by_chunk, candidates
        self.short_calls, self.long_calls = [], []

    def short(self, frames, prompt):
        self.short_calls.append(frames.clone())
        return torch.tensor([0.01 * len(self.short_calls)])

    def long(self, frames, prompt):
        self.long_calls.append(frames.clone())
        i = len(self.long_calls) - 1
        chunk = min(i // self.candidates, len(self.long_by_chunk) - 1)
        return torch.tensor([self.long_by_chunk[chunk] + 0.001 * (i % self.candidates)])


def reference(rewards, *, chunks, vae=None, latent=(4, 6), seed=42, **settings):
    from helpers import text_context, tiny_model

    ref = load("bench_reference")
    model = tiny_model(in_channels=4, out_channels=4)
    vae = vae or load("common").TiledSpaceToDepthVAE(4, 2)
    runner = ref.ReferenceStreamT1(model, vae, text_context(model), ref.UpstreamSettings(**settings), (4, *latent),
                                   rewards.short, rewards.long, device="cpu", dtype=torch.float32, files=False)
    with torch.inference_mode():
        return runner.run("a fox", chunks, seed), model


@pytest.fixture(scope="module")
def append_then_ema():
    """10 chunks; long drops by 1 per chunk up to chunk 5 (long low: APPEND), then stays (EMA); short is
    always high."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference(ScriptedRewards([0, -1, -2, -3, -4, -5]), chunks=10)[0]
    finally:
        torch.set_num_threads(threads)


def test_seeds_survivors_and_routes_follow_the_official_rules(append_then_ema):
    records = append_then_ema.records
    assert [r.survivors for r in records] == [[3, 2]] * 10  # the last candidate of each chunk scores best
    assert records[0].candidate_seeds == [42, 43, 44, 45]
    # chunk 1: beam 0 is candidate 3 (seed 45), beam 1 candidate 2 (seed 44); child 0 reuses its beam's seed
    assert records[1].candidate_seeds == [45, 1043, 44, 1143]
    assert records[1].candidate_parents == [0, 0, 1, 1]
    # chunk 2: beam 0 is chunk 1's candidate 3 (seed 1143), beam 1 its candidate 2 (seed 44)
    assert records[2].candidate_seeds == [1143, 2043, 44, 2143]
    for c in range(2, 10):  # beam 0 always descends from the previous chunk's new seed, beam 1 keeps 44
        assert records[c].candidate_seeds == [42 + 1000 * (c - 1) + 101, 42 + 1000 * c + 1, 44, 42 + 1000 * c + 101]
    assert [r.route_flags for r in records] == ([["DISCARD"] * 2] + [["APPEND"] * 2] * 5 + [["EMA"] * 2] * 4)
    hybrid_weights = [r.hybrid_weight for r in records]
    assert hybrid_weights == pytest.approx([min(0.4, 3 * c / 27) for c in range(10)])


def _span(first, last):
    return list(range(first, last + 1))


def test_attended_frames_append_then_ema(append_then_ema):
    attended = [r.attended_frames for r in append_then_ema.records]
    # sink 3 + 9 frames (own chunk included); APPENDs of chunks 1-4 grow the sink to 15 frames at chunks
    # 4-7; chunk 5 (APPEND) then meets a full sink at chunk 8 and is blended in like chunk 6 (EMA) at chunk 9
    want = [_span(0, 2), _span(0, 5), _span(0, 8), _span(0, 11), _span(0, 14), _span(0, 17), _span(0, 20),
            _span(0, 23), _span(0, 14) + _span(18, 26), _span(0, 14) + _span(21, 29)]
    for c in range(10):
        assert attended[c] == [want[c]] * 4, f"chunk {c}"


def test_attended_frames_without_sinking():
    rewards = ScriptedRewards([0] * 6)
    rewards.short = lambda frames, prompt: torch.tensor([-0.01 * len(rewards.long_calls)])  # never short high
    result, _ = reference(rewards, chunks=7)
    assert [r.route_flags for r in result.records] == [["DISCARD"] * 2] * 7
    sink = [0, 1, 2]
    want = {3: sink + _span(3, 11), 4: sink + _span(6, 14), 5: sink + _span(9, 17), 6: sink + _span(12, 20)}
    for c, frames in want.items():
        assert result.records[c].attended_frames == [frames] * 4, f"chunk {c}"


def test_noise_is_drawn_and_propagated_as_upstream():
    rewards = ScriptedRewards([0, -1])
    result, _ = reference(rewards, chunks=2)
    shape = (1, 3, 4, 4, 6)  # [1, F, C, h, w], the official noise layout

    def raw(seed):
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))

    scale = math.sqrt(1 - SIGMA ** 2)
    beam0, beam1 = result.beams  # chunk 1's candidates 3 (child 1 of beam 1) and 2 (child 0 of beam 1)
    assert beam0["seeds"] == [44, 1143] and beam1["seeds"] == [44, 44]
    torch.testing.assert_close(beam0["noise"], SIGMA * raw(44) + scale * raw(1143))
    torch.testing.assert_close(beam1["noise"], (SIGMA + scale) * raw(44))  # child 0 redraws its parent's noise


def test_rewards_see_cold_decodes_truncated():
    from diffusers import AutoencoderKLWan

    from streamt1_engine.vae import WanVAE

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True], latents_mean=[0.3, -0.2, 0.1, 0.5],
                             latents_std=[1.5, 0.7, 2.0, 1.1])
    vae = WanVAE(model)  # causal: the first latent frame of a cold decode gives one frame, later ones two
    rewards = ScriptedRewards([0, -1, -2, -3])
    result, _ = reference(rewards, chunks=4, vae=vae, sliding_window_size=2)
    beam = result.beams[0]
    last = result.records[-1].survivors[0]  # beam 0's last chunk is this candidate of chunk 3
    short_in, long_in = rewards.short_calls[12 + last], rewards.long_calls[12 + last]

    def cold(latents):  # [1, F, C, h, w] -> what the rewards get: uint8 by truncation, back to [0, 1]
        frames, _ = vae.decode_chunk(latents.permute(0, 2, 1, 3, 4), None)
        return (frames * 255).to(torch.uint8).float() / 255, (frames * 255).round() / 255

    output = beam["output"]
    short_want, short_rounded = cold(output[:, 9:12])
    assert short_in.shape[1] == 5  # 3 latent frames alone: 1 + 2 + 2 video frames
    torch.testing.assert_close(short_in, short_want, rtol=0, atol=0)
    assert not torch.equal(short_in, short_rounded)  # truncated, not rounded
    long_want, _ = cold(output[:, 6:12])  # the last 2 chunks' latents, decoded from a cold state
    assert long_in.shape[1] == 11  # not the 12 streamed frames of chunks 2-3
    torch.testing.assert_close(long_in, long_want, rtol=0, atol=0)
    # before chunk W the window starts at frame 0: beam 0's chunk-1 candidate saw its chunks 0-1, cold
    lineage, j = {}, last
    for c in range(3, -1, -1):
        lineage[c] = j
        if c:
            j = result.records[c - 1].survivors[result.records[c].candidate_parents[j]]
    at_chunk_1 = 4 + lineage[1]
    torch.testing.assert_close(rewards.long_calls[at_chunk_1], cold(output[:, 0:6])[0], rtol=0, atol=0)
    torch.testing.assert_close(rewards.short_calls[at_chunk_1], cold(output[:, 3:6])[0], rtol=0, atol=0)
    # the final pick scores every beam's whole video, cold-decoded
    final = rewards.long_calls[16:]
    assert len(final) == 2 and final[0].shape[1] == 1 + 2 * 11
    torch.testing.assert_close(final[0], cold(output)[0], rtol=0, atol=0)
    assert torch.equal(result.frames, (vae.decode_chunk(result.beams[result.chosen_beam]["output"].permute(
        0, 2, 1, 3, 4), None)[0][0] * 255).to(torch.uint8).permute(0, 2, 3, 1))


def test_layer_cache_append_and_ema_as_upstream():
    """One layer, one token per frame: chunk 4 evicts chunk 1 into the sink (APPEND) or blends it into the
    sink's newest frames (EMA, alpha 0.999), on pre-RoPE keys and values."""
    ref = load("bench_reference")
    s = ref.UpstreamSettings()
    table = ref.rope_table(8, 10000.0, 64, "cpu")
    gen = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(1, 3, 2, 8, generator=gen), torch.randn(1, 3, 2, 8, generator=gen)) for _ in range(5)]

    def run(routes):
        cache = ref.LayerCache(s, 1, 2, 8, "cpu", torch.float32)
        for c, (k, v) in enumerate(chunks):
            ctx = ref.CallContext(3 * c, 3, 1, 1, routes, s, table, attended=[])
            ref.cached_attention(cache, torch.randn(1, 3, 2, 8, generator=gen), k, v, ctx)
        return cache, ctx.attended

    k = [c[0][0] for c in chunks]
    v = [c[1][0] for c in chunks]
    cache, attended = run({3: "APPEND"})
    assert int(cache.sink_frames) == 6 and cache.appended.tolist() == [3] and int(cache.budget) == 15
    assert attended == list(range(15))
    torch.testing.assert_close(cache.k[0, :15], torch.cat([k[0], k[1], k[2], k[3], k[4]]))
    cache, attended = run({3: "EMA"})
    assert int(cache.sink_frames) == 3 and attended == [0, 1, 2] + list(range(6, 15))
    torch.testing.assert_close(cache.k[0, :3], 0.999 * k[0] + 0.001 * k[1])
    torch.testing.assert_close(cache.v[0, :3], 0.999 * v[0] + 0.001 * v[1])
    torch.testing.assert_close(cache.k[0, 3:12], torch.cat([k[2], k[3], k[4]]))
    cache, _ = run({})
    torch.testing.assert_close(cache.k[0, :3], k[0])  # DISCARD leaves the sink alone


def test_ema_blends_into_the_newest_sink_frames():
    """Chunk 1 appended to the sink at chunk 4; chunk 2 (EMA) evicted at chunk 5 blends into chunk 1's frames."""
    ref = load("bench_reference")
    s = ref.UpstreamSettings()
    table = ref.rope_table(8, 10000.0, 64, "cpu")
    gen = torch.Generator().manual_seed(1)
    k = [torch.randn(1, 3, 2, 8, generator=gen) for _ in range(6)]
    cache = ref.LayerCache(s, 1, 2, 8, "cpu", torch.float32)
    for c in range(6):
        ctx = ref.CallContext(3 * c, 3, 1, 1, {3: "APPEND", 6: "EMA"}, s, table, attended=[])
        ref.cached_attention(cache, torch.randn(1, 3, 2, 8, generator=gen), k[c], k[c] + 1, ctx)
    assert ctx.attended == list(range(6)) + list(range(9, 18))
    torch.testing.assert_close(cache.k[0, :3], k[0][0])
    torch.testing.assert_close(cache.k[0, 3:6], 0.999 * k[1][0] + 0.001 * k[2][0])
    torch.testing.assert_close(cache.v[0, 3:6], 0.999 * (k[1][0] + 1) + 0.001 * (k[2][0] + 1))
    torch.testing.assert_close(cache.k[0, 6:15], torch.cat([k[3][0], k[4][0], k[5][0]]))


def test_routing_uses_the_whole_lineage_and_the_previous_long_score():
    ref = load("bench_reference")
    s = ref.UpstreamSettings(sliding_window_size=2)

    def history(*shorts_longs):
        return {3 * i: {"short": a, "long": b} for i, (a, b) in enumerate(shorts_longs)}

    # mean short over all three earlier chunks is 10/3: a short of 3 is not high (over the last two it would be)
    assert ref.route_flag(history((10, 0), (0, 0), (0, 0), (3, 0)), 3, 0, s) == "DISCARD"
    assert ref.route_flag(history((1, 0), (0, 0), (0, 0), (3, 0)), 3, 0, s) == "EMA"
    # long low: the previous chunk's long score (1.0) minus this one (0.7) exceeds 0.2
    assert ref.route_flag(history((1, 0), (0, 5), (0, 1.0), (3, 0.7)), 3, 0.7, s) == "APPEND"
    assert ref.route_flag(history((1, 0), (0, 5), (0, 0.85), (3, 0.7)), 3, 0.7, s) == "EMA"
    assert ref.route_flag(history((9, 0), (0, 5), (0, 1.0), (3, 0.7)), 3, 0.7, s) == "DISCARD"
    assert ref.hybrid_weight(3, 21, s) == pytest.approx(3 / 18) and ref.hybrid_weight(9, 21, s) == 0.4


def test_reference_forward_equals_the_engine_model():
    """The reference's DiT pass (its own cache, complex float64 RoPE, SDPA) equals the engine model's dense
    block-causal pass over [clean chunk 0 at t=0, noisy chunk 1 at t] on the same weights."""
    from helpers import text_context, tiny_model

    from streamt1_engine.model.wan import ChunkAttention

    ref = load("bench_reference")
    model = tiny_model(in_channels=4, out_channels=4)
    text = text_context(model)
    s = ref.UpstreamSettings()
    gen = torch.Generator().manual_seed(3)
    clean, noisy = torch.randn(1, 3, 4, 4, 6, generator=gen), torch.randn(1, 3, 4, 4, 6, generator=gen)
    cfg = model.config
    grid_h, grid_w = 2, 3
    caches = [ref.LayerCache(s, grid_h * grid_w, cfg.num_heads, cfg.head_dim, "cpu", torch.float32)
              for _ in range(cfg.num_layers)]
    table = ref.rope_table(cfg.head_dim, cfg.rope_theta, 64, "cpu")
    with torch.inference_mode():
        ref.reference_forward(model, clean, 0.0, text, caches, ref.CallContext(0, 3, grid_h, grid_w, {}, s, table))
        got = ref.reference_forward(model, noisy, 750.0, text, caches, ref.CallContext(3, 3, grid_h, grid_w, {}, s,
                                                                                      table))
        frames = torch.arange(6).repeat_interleave(grid_h * grid_w)
        mask = (frames[None, :] // 3) <= (frames[:, None] // 3)
        both = torch.cat([clean, noisy], 1).permute(0, 2, 1, 3, 4)
        t = torch.tensor([[0.0] * 3 + [750.0] * 3])
        want = model(both, t, text, ChunkAttention.dense(1, "cpu", mask=mask))[:, :, 3:].permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, model(noisy.permute(0, 2, 1, 3, 4), torch.tensor([750.0]), text,
                                         ChunkAttention.dense(1, "cpu", frame_start=3)).permute(0, 2, 1, 3, 4),
                              atol=1e-3)  # guard: the cached chunk 0 matters


# -- which decisions the check compares ----------------------------------------------------------------------
def decisions(hybrid_by_chunk, survivors_by_chunk, routes_by_chunk, chosen, final_scores):
    """The same records as both runs keep them: (engine result stand-in, ReferenceResult)."""
    from types import SimpleNamespace

    ref = load("bench_reference")
    records = [ref.ReferenceChunk(index=c, candidate_seeds=[c, c + 1, c + 2, c + 3], candidate_parents=[0] * 4,
                                  short_scores=list(h), long_scores=list(h), hybrid_scores=list(h), hybrid_weight=0.5,
                                  survivors=list(s), route_flags=list(r), attended_frames=[[]] * 4,
                                  route_margins=[1.0, 1.0])
               for c, (h, s, r) in enumerate(zip(hybrid_by_chunk, survivors_by_chunk, routes_by_chunk))]
    frames = torch.zeros(3, 2, 2, 3, dtype=torch.uint8)
    engine = SimpleNamespace(chunks=records, info=dict(chosen_beam=chosen, final_beam_scores=final_scores),
                             frames=frames)
    return engine, ref.ReferenceResult(records, chosen, final_scores, frames)


def flip_chunk(engine, chunk, survivors):
    from types import SimpleNamespace

    engine.chunks = [SimpleNamespace(**{**r.to_dict(), "survivors": survivors}) if i == chunk else r
                     for i, r in enumerate(engine.chunks)]


def test_a_flipped_near_tie_is_not_compared_nor_what_follows_it():
    """bf16: survivors 0.50 / 0.49 / 0.48 are within twice the score tolerance of each other, so either run may
    keep either; the chunk and the later ones (other lineages) are reported, not counted as a mismatch."""
    ref = load("bench_reference")
    hybrid = [[0.9, 0.5, 0.2, 0.1], [0.50, 0.49, 0.48, 0.10], [0.9, 0.5, 0.2, 0.1]]
    engine, result = decisions(hybrid, [[0, 1], [0, 1], [0, 1]], [["D", "D"]] * 3, 0, [0.9, 0.1])
    flip_chunk(engine, 1, [0, 2])
    flip_chunk(engine, 2, [1, 0])
    check = ref.compare(engine, result, ref.score_tolerance(torch.bfloat16))
    assert check["all_match"] and check["near_ties"] == 1 and check["compared_chunks"] == 1
    assert check["chunk_status"][0] == "same" and check["chunk_status"][1].startswith("near-tie")
    assert check["chunk_status"][2] == "after a near-tie, not compared"
    assert check["max_frame_diff"] is None  # the videos of different lineages are not compared either


def test_a_flip_beyond_the_tolerance_is_a_mismatch():
    ref = load("bench_reference")
    hybrid = [[0.9, 0.5, 0.2, 0.1], [0.9, 0.6, 0.3, 0.1]]
    engine, result = decisions(hybrid, [[0, 1], [0, 1]], [["D", "D"]] * 2, 0, [0.9, 0.1])
    flip_chunk(engine, 1, [0, 2])
    check = ref.compare(engine, result, ref.score_tolerance(torch.bfloat16))
    assert not check["all_match"] and not check["survivors"] and check["near_ties"] == 0
    assert check["chunk_status"][1].startswith("DIFFERENT")
    # in float32 the same 0.01 gaps are far beyond the tolerance: a flip there is a mismatch
    engine, result = decisions([[0.50, 0.49, 0.48, 0.10]], [[0, 1]], [["D", "D"]], 0, [0.9, 0.1])
    flip_chunk(engine, 0, [0, 2])
    assert not ref.compare(engine, result, ref.score_tolerance(torch.float32))["all_match"]


def test_final_pick_near_tie_is_not_compared():
    ref = load("bench_reference")
    engine, result = decisions([[0.9, 0.5, 0.2, 0.1]], [[0, 1]], [["D", "D"]], 0, [0.50, 0.49])
    engine.info["chosen_beam"] = 1
    check = ref.compare(engine, result, ref.score_tolerance(torch.bfloat16))
    assert check["all_match"] and check["chosen_beam_status"] == "near-tie, not compared"
    result.final_scores = [0.9, 0.1]
    engine.info["final_beam_scores"] = [0.9, 0.1]
    assert ref.compare(engine, result, 5e-2)["chosen_beam_status"] == "DIFFERENT"


def test_require_match_failure_keeps_the_timings(tmp_path, monkeypatch):
    """A mismatch exits non-zero after the timing rows are written (as they were measured, and the report)."""
    ref = load("bench_reference")
    real = ref.compare

    def disagree(*args, **kwargs):
        return {**real(*args, **kwargs), "all_match": False}

    monkeypatch.setattr(ref, "compare", disagree)
    with pytest.raises(SystemExit, match="disagree where the decisions are deterministic"):
        ref.main(["--tiny", "--dtype", "fp32", "--chunks", "2", "--warmup", "0", "--vae", "light", "--no-files",
                  "--require-match", "--out", str(tmp_path)])
    lines = (tmp_path / "bench_reference.rows.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["run"] for line in lines] == ["engine", "reference"]
    assert "| engine |" in (tmp_path / "bench_reference.md").read_text()
