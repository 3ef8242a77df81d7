"""Noise modes: "official" draws what the Stream-T1 reference draws (its generators, order, shapes, dtype and
seed numbering); "portable" is the engine's earlier hashed CPU noise, unchanged."""
import math
from pathlib import Path

import pytest
import torch

from helpers import brightness, smoothness, upstream_noise
from streamt1_engine.engine import StreamT1Engine
from streamt1_engine.errors import StreamT1Error
from streamt1_engine.search.beam_search import EagerDenoiser
from streamt1_engine.search.config import SearchConfig
from streamt1_engine.search.noise import draw_upstream_noise, upstream_seed_collision, upstream_seeds

FIXTURE = Path(__file__).parent / "fixtures" / "portable_run_v1.pt"
SIGMA = -0.1


@pytest.fixture(scope="module")
def engine():
    return StreamT1Engine.from_pretrained("random-tiny", device="cpu")


def recorded_run(engine, monkeypatch, search, num_chunks=3, seed=11):
    """Generate with recording of every chunk's noise (what the denoiser is handed)."""
    drawn = []
    original = EagerDenoiser.denoise

    def denoise(self, noise, attn, text=None):
        drawn.append((noise.initial.clone(), noise.renoise.clone()))
        return original(self, noise, attn, text)

    monkeypatch.setattr(EagerDenoiser, "denoise", denoise)
    result = engine.generate("a red circle", num_chunks=num_chunks, seed=seed, search=search,
                             short_reward=brightness, long_reward=smoothness, final_reward=smoothness)
    return result, drawn


@pytest.fixture(scope="module")
def official_run(engine):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return recorded_run(engine, monkeypatch, search())


def search(**kw):
    base = dict(strategy="stream_t1", beam_size=3, top_k=2, window_chunks=2, short_threshold=-0.05,
                long_threshold=0.0, noise_sigma=SIGMA)
    base.update(kw)
    return SearchConfig(**base)


def test_official_is_the_default():
    cfg = SearchConfig()
    assert cfg.noise_mode == "official" and cfg.reward_frames == "cold"
    with pytest.raises(StreamT1Error, match="noise_mode"):
        SearchConfig(noise_mode="cuda")
    with pytest.raises(StreamT1Error, match="reward_frames"):
        SearchConfig(reward_frames="warm")


def test_upstream_draw_order_shape_and_dtype():
    """The engine's draw equals torch.randn from torch.Generator(device).manual_seed(seed): initial noise
    [1, F, C, H, W] first, then each re-noise [F, C, H, W], in the requested dtype."""
    shape = (4, 3, 5, 6)
    for dtype in (torch.float32, torch.bfloat16):
        for steps in (1, 4):
            noise = draw_upstream_noise([7, 1007, 7], shape, steps, "cpu", dtype)
            assert noise.initial.shape == (3, *shape) and noise.renoise.shape == (steps - 1, 3, *shape)
            assert noise.initial.dtype == dtype and noise.renoise.dtype == dtype
            for n, seed in enumerate([7, 1007, 7]):
                initial, renoise = upstream_noise(seed, shape, steps, dtype=dtype)
                assert torch.equal(noise.initial[n], initial[0])
                assert torch.equal(noise.renoise[:, n], renoise[:, 0])
            assert torch.equal(noise.initial[0], noise.initial[2]) and not torch.equal(noise.initial[0],
                                                                                       noise.initial[1])
    # the layout matters: the same generator drawn in the engine's [1, C, F, H, W] gives other noise
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(torch.randn(1, 4, 3, 5, 6, generator=g)[0], upstream_noise(7, shape, 1)[0][0])


def test_seeds_follow_upstream_numbering(official_run):
    result, _ = official_run
    records = result.chunks
    assert records[0].candidate_seeds == [11 + i for i in range(6)]
    for c in range(1, len(records)):
        prev = records[c - 1]
        last = [prev.candidate_seeds[i] for i in prev.survivors]  # beams in survivor order
        expected = []
        for beam in range(2):
            expected += [last[beam]] + [11 + 1000 * c + 100 * beam + i for i in range(1, 3)]
        assert records[c].candidate_seeds == expected
        assert records[c].candidate_parents == [0, 0, 0, 1, 1, 1]
    assert upstream_seeds(5, 3, [40, 41], 2, 4) == [40, 3006, 41, 3106]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_official_draws_and_child_zero_redraws_its_parent(engine, official_run, monkeypatch, dtype):
    if dtype == "float32":
        eng, (result, drawn) = engine, official_run
    else:  # the engine's dtype is the dtype upstream draws in
        eng = StreamT1Engine.from_pretrained("random-tiny", device="cpu", dtype=dtype)
        result, drawn = recorded_run(eng, monkeypatch, search())
    dt = getattr(torch, dtype)
    c_, f_, h_, w_ = result.latents.shape[0], 3, *result.latents.shape[2:]
    shape = (c_, f_, h_, w_)
    steps = eng.schedule.num_steps
    records = result.chunks
    for c, ((initial, renoise), record) in enumerate(zip(drawn, records)):
        assert initial.dtype == dt and renoise.dtype == dt
        for n, seed in enumerate(record.candidate_seeds):
            raw, raw_renoise = upstream_noise(seed, shape, steps, dtype=dt)
            assert torch.equal(renoise[:, n], raw_renoise[:, 0])  # every re-noise: the candidate's own draws
            if c == 0:
                assert torch.equal(initial[n], raw[0])
                continue
            parent_slot = records[c - 1].survivors[record.candidate_parents[n]]
            parent = drawn[c - 1][0][parent_slot]  # the parent's fused initial noise propagates
            assert torch.equal(initial[n], SIGMA * parent + math.sqrt(1 - SIGMA**2) * raw[0])
            if n % 3 == 0:  # child 0 reuses the seed: it redraws its parent's raw noise and re-noise
                assert torch.equal(renoise[:, n], drawn[c - 1][1][:, parent_slot])
                if c == 1:
                    factor = SIGMA + math.sqrt(1 - SIGMA**2)
                    tol = 1e-6 if dt == torch.float32 else 2e-2
                    torch.testing.assert_close(initial[n].float(), factor * parent.float(), atol=tol, rtol=tol)


def test_numbering_collisions_are_refused_at_config_time():
    with pytest.raises(StreamT1Error, match="portable"):
        SearchConfig(top_k=11)  # beam 10 of chunk c takes the seeds of beam 0 of chunk c+1
    with pytest.raises(StreamT1Error, match="same seed"):
        SearchConfig(beam_size=102, top_k=2)  # beam 0's child 101 takes beam 1's child 1 seed
    SearchConfig(top_k=11, noise_mode="portable")
    SearchConfig(top_k=10, beam_size=100)
    with pytest.raises(StreamT1Error, match="chunk 0"):
        SearchConfig(top_k=10, beam_size=101)  # 1010 candidates at chunk 0 reach chunk 1's seeds
    SearchConfig(strategy="best_of_n", num_candidates=500)  # one beam: no overlap


def fresh_seeds(children, beams, chunks=4):
    """Every seed upstream draws from a new number (child 0 reuses its parent's and is left out)."""
    seeds = list(range(children * beams))
    for c in range(1, chunks):
        seeds += [1000 * c + 100 * k + i for k in range(beams) for i in range(1, children)]
    return seeds


@pytest.mark.parametrize("children", [1, 2, 3, 99, 100, 101, 102, 1001, 1002])
@pytest.mark.parametrize("beams", [1, 2, 9, 10, 11, 12])
def test_collision_check_is_exact(children, beams):
    seeds = fresh_seeds(children, beams)
    assert (len(set(seeds)) != len(seeds)) == (upstream_seed_collision(children, beams, children * beams)
                                               is not None)


# ---- portable: the engine's earlier noise, bit for bit ---------------------------------------------------
def old_chunk_seed(seed, chunk):
    """The hash the engine used before noise modes existed, written out again."""
    m = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + chunk * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & m
    x = ((x ^ (x >> 31)) * 0xBF58476D1CE4E5B9) & m
    return (x ^ (x >> 29)) & ((1 << 63) - 1)


def test_portable_noise_and_numbering_are_unchanged(engine, monkeypatch):
    cfg = search(noise_mode="portable", reward_frames="streamed")
    result, drawn = recorded_run(engine, monkeypatch, cfg)
    records = result.chunks
    shape = (result.latents.shape[0], 3, *result.latents.shape[2:])
    next_seed = 11 + 6
    for c, ((initial, renoise), record) in enumerate(zip(drawn, records)):
        if c == 0:
            assert record.candidate_seeds == list(range(11, 17))
        else:
            prev = records[c - 1]
            expected = []
            for slot in prev.survivors:
                expected.append(prev.candidate_seeds[slot])
                expected += list(range(next_seed, next_seed + 2))
                next_seed += 2
            assert record.candidate_seeds == expected
        for n, seed in enumerate(record.candidate_seeds):
            g = torch.Generator().manual_seed(old_chunk_seed(seed, c))
            raw = torch.randn(shape, generator=g)
            assert torch.equal(renoise[:, n], torch.randn((engine.schedule.num_steps - 1, *shape), generator=g))
            if c > 0:
                parent = drawn[c - 1][0][records[c - 1].survivors[record.candidate_parents[n]]]
                raw = SIGMA * parent + math.sqrt(1.0 - SIGMA * SIGMA) * raw
            assert torch.equal(initial[n], raw)


def test_portable_run_matches_the_recording_made_before_noise_modes(engine):
    """The fixture was written by this same run on the engine before noise_mode / reward_frames existed."""
    cfg = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=2, short_threshold=-0.05,
                       long_threshold=0.0, noise_mode="portable", reward_frames="streamed")
    result = engine.generate("a red circle", num_chunks=5, seed=11, search=cfg, short_reward=brightness,
                             long_reward=smoothness, final_reward=smoothness)
    old = torch.load(FIXTURE)
    assert result.info["chunk_seeds"] == old["chunk_seeds"] and result.info["chosen_beam"] == old["chosen_beam"]
    for record, ref in zip(result.chunks, old["records"], strict=True):
        assert record.candidate_seeds == ref["candidate_seeds"]
        assert record.candidate_parents == ref["candidate_parents"]
        assert record.survivors == ref["survivors"] and record.route_flags == ref["route_flags"]
        assert record.short_scores == pytest.approx(ref["short_scores"], abs=1e-4)
        assert record.long_scores == pytest.approx(ref["long_scores"], abs=1e-4)
    assert result.frames.shape == old["frames"].shape
    assert (result.frames.int() - old["frames"].int()).abs().max() <= 1  # float noise of later kernels only
    assert (result.frames == old["frames"]).float().mean() > 0.99


def test_cli_flags_reach_the_search_config():
    from streamt1_engine.cli import build_parser, search_config

    parser = build_parser()
    default = search_config(parser.parse_args(["generate", "p", "--search", "stream_t1"]))
    assert (default.noise_mode, default.reward_frames) == ("official", "cold")
    chosen = search_config(parser.parse_args(["generate", "p", "--noise-mode", "portable",
                                              "--reward-frames", "streamed"]))
    assert (chosen.noise_mode, chosen.reward_frames) == ("portable", "streamed")
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "p", "--noise-mode", "hashed"])


def test_plain_streaming_draws_as_the_base_inference_scripts():
    """``none`` in official mode: one generator for the stream, the whole video's initial noise drawn first,
    then every chunk's re-noise in order (Self-Forcing / LongLive inference), not one seed redrawn per chunk."""
    from streamt1_engine.search import beam_search as bs

    engine = StreamT1Engine.from_pretrained("random-tiny")
    drawn = []
    original = bs.BeamSearch._noise

    def spy(self, seeds, parents):
        noise = original(self, seeds, parents)
        drawn.append((noise.initial.clone(), noise.renoise.clone()))
        return noise

    num_chunks, seed = 3, 5
    try:
        bs.BeamSearch._noise = spy
        engine.generate("a red circle", num_chunks=num_chunks, seed=seed, search=SearchConfig(strategy="none"))
    finally:
        bs.BeamSearch._noise = original
    c, f, h, w = drawn[0][0].shape[1:]
    steps = drawn[0][1].shape[0] + 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    whole = torch.randn((1, num_chunks * f, c, h, w), generator=gen)
    for k, (initial, renoise) in enumerate(drawn):
        assert torch.equal(initial[0], whole[0, k * f:(k + 1) * f].transpose(0, 1))
        for i in range(steps - 1):
            expected = torch.randn((f, c, h, w), generator=gen).transpose(0, 1)
            assert torch.equal(renoise[i, 0], expected)
    assert not torch.equal(drawn[0][0], drawn[1][0])  # chunks get different noise
