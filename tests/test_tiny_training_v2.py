"""The v2 training options of the embedded model: long clips under the inference window, the model's own
chunks as context, the motion and seam losses, other sizes, and the named recipes."""
import json

import pytest
import torch

from streamt1_engine.errors import StreamT1Error
from streamt1_engine.tiny.model import build_tiny_model, teacher_forcing_mask, tiny_wan_config
from streamt1_engine.tiny.procedural import ProceduralVideos
from streamt1_engine.tiny.recipes import RECIPES, recipe_stage
from streamt1_engine.tiny.train import main, own_context_chunks, pass_through_init, training_loss


def test_window_mask_equals_the_full_mask_for_short_clips_and_cuts_long_ones():
    cf, tokens = 3, 2
    # 4 chunks: the last one sees the sink and the 3 before it anyway -> the v1 mask exactly
    assert torch.equal(teacher_forcing_mask(12, cf, tokens), teacher_forcing_mask(12, cf, tokens, window_chunks=3))
    mask = teacher_forcing_mask(24, cf, 1, window_chunks=3)
    noisy = lambda chunk: 24 + chunk * cf  # noqa: E731  (row of a noisy chunk's first frame)
    clean = lambda chunk: chunk * cf  # noqa: E731
    assert mask[noisy(6), clean(0)] and mask[noisy(6), clean(3)] and mask[noisy(6), clean(5)]
    assert not mask[noisy(6), clean(2)] and not mask[noisy(6), clean(6)]
    assert not mask[clean(7), clean(1)] and mask[clean(7), clean(0)]


def _fixed_batch(clip_chunks=8, batch=2):
    model = build_tiny_model(seed=0)
    pass_through_init(model.dit)
    frames, prompts, times = ProceduralVideos(seed=3, hold_out=True).streaming_batch(0, batch, clip_chunks, 3, 0.0)
    mask = teacher_forcing_mask(clip_chunks * 3, 3, model.frame_tokens, window_chunks=model.stream.window_pages)
    return model, frames, prompts, times, mask


def test_own_context_chunks_are_the_models_and_stay_near_the_truth():
    model, frames, prompts, times, mask = _fixed_batch(clip_chunks=4)
    x0 = model.vae.encode(frames)
    own = own_context_chunks(model, x0, prompts, times, mask, torch.Generator().manual_seed(0), start=3)
    assert own.shape == x0.shape and torch.isfinite(own).all()
    # from the truth noised to the last inference step, a pass-through model gives back a noisy truth:
    # different from it, but much closer to it than to another clip
    other = model.vae.encode(ProceduralVideos(seed=4).streaming_batch(0, 2, 4, 3, 0.0)[0])
    assert 0 < (own - x0).abs().mean() < (own - other).abs().mean()
    with pytest.raises(StreamT1Error, match="start"):
        own_context_chunks(model, x0, prompts, times, mask, torch.Generator(), start=4)


def test_rollout_loss_is_finite_and_decreases_on_a_fixed_batch():
    torch.set_num_threads(1)
    model, frames, prompts, times, mask = _fixed_batch()
    params = list(model.dit.parameters()) + list(model.text_encoder.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    own = torch.tensor([True, False])
    losses = []
    for _ in range(6):
        gen = torch.Generator().manual_seed(7)  # same timesteps, noise and own-context start every step
        loss = training_loss(model, frames, prompts, times, gen, mask, own_context=own, own_context_start=2,
                             motion_weight=2.0, temporal_weight=1.0)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_motion_and_seam_terms_change_the_loss_only_when_asked():
    model, frames, prompts, times, mask = _fixed_batch(clip_chunks=4)
    with torch.no_grad():
        loss = lambda **kw: training_loss(model, frames, prompts, times, torch.Generator().manual_seed(1),  # noqa
                                          mask, **kw).item()
        base = loss()
        assert loss(motion_weight=0.0, temporal_weight=0.0) == base
        assert loss(motion_weight=2.0) > base  # extra weight on the (imperfect) moving pixels
        assert loss(temporal_weight=1.0) > base


def test_other_sizes_build_and_train_a_step():
    model = build_tiny_model(tiny_wan_config(dim=128, ffn_dim=256, num_layers=2, vae_factor=8), frame_size=64)
    assert model.stream.latent_height == 8 and model.vae.spatial_factor == 8 and model.dit.config.in_channels == 192
    frames, prompts, times = ProceduralVideos(seed=0, width=64, height=64).streaming_batch(0, 1, 2, 3)
    assert frames.shape[-2:] == (64, 64)
    mask = teacher_forcing_mask(6, 3, model.frame_tokens, window_chunks=model.stream.window_pages)
    loss = training_loss(model, frames, prompts, times, torch.Generator().manual_seed(0), mask)
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(StreamT1Error, match="multiple"):
        build_tiny_model(frame_size=36)


def test_recipes_and_their_command_line(tmp_path, monkeypatch):
    assert recipe_stage("v1", 1) == {} and recipe_stage("v2", 1)["clip_chunks"] == 8
    assert recipe_stage("v2", 1)["context_rollout_prob"] > 0 and len(RECIPES["v2"]) == 3
    second = recipe_stage("v2", 2)  # teacher forcing on 4-chunk clips: own context made seams (recipes.py)
    assert second.get("context_rollout_prob", 0.0) == 0.0 and second["clip_chunks"] == 4 and second["hold_out"]
    with pytest.raises(StreamT1Error, match="unknown training recipe"):
        recipe_stage("v9", 1)
    with pytest.raises(StreamT1Error, match="stages"):
        recipe_stage("v2", 4)
    with pytest.raises(SystemExit):  # stage 2 continues stage 1
        main(["--out", str(tmp_path / "x"), "--recipe", "v2", "--stage", "2"])
    seen = {}
    monkeypatch.setattr("streamt1_engine.tiny.train.train", lambda out, **kw: seen.update(kw, out=out))
    main(["--out", str(tmp_path / "y"), "--recipe", "v2", "--steps", "5"])
    assert seen["steps"] == 5 and seen["clip_chunks"] == 8 and seen["hold_out"] is True  # flags beat the recipe
    assert seen["rewards"]["long"] == "procedural_video_motion"
    main(["--out", str(tmp_path / "z")])
    assert seen["clip_chunks"] == 4 and seen["context_rollout_prob"] == 0.0 and seen["rewards"] is None
    assert seen["sampler_shift"] is None  # the init dir's sampler, else the tiny one
    main(["--out", str(tmp_path / "z"), "--sampler-shift", "1.5"])
    assert seen["sampler_shift"] == 1.5


def test_a_v2_run_records_its_options_and_names_its_rewards(tmp_path):
    from streamt1_engine.engine import StreamT1Engine
    from streamt1_engine.tiny.train import train

    info = train(tmp_path / "m", steps=1, batch=2, threads=1, val_size=2, log_every=1, clip_chunks=5,
                 context_rollout_prob=1.0, rollout_after=0.0, motion_weight=1.0, temporal_weight=1.0,
                 hold_out=True, rewards={"short": "procedural_frame", "long": "procedural_video_motion"})
    assert info["clip_chunks"] == 5 and info["context_rollout_prob"] == 1.0 and info["hold_out"] is True
    config = json.loads((tmp_path / "m" / "streamt1.json").read_text())
    assert config["rewards"]["long"] == "procedural_video_motion"
    engine = StreamT1Engine.from_pretrained(str(tmp_path / "m"), device="cpu")
    result = engine.generate("a red circle moving left on a blue background", num_chunks=2, seed=0,
                             search="stream_t1")  # the model's own rewards, motion verifier included
    assert result.frames.shape[0] == 6


def test_a_v1_run_records_what_it_always_recorded(tmp_path):
    from streamt1_engine.tiny.train import train

    info = train(tmp_path / "m", steps=1, batch=2, threads=1, val_size=2, log_every=1)
    assert set(info) == {"steps", "seed", "batch", "lr", "ema_decay", "rollout_prob", "rollout_after", "train_loss",
                         "val_loss_at_inference_steps", "minutes", "threads", "stopped_by", "init"}
    config = json.loads((tmp_path / "m" / "streamt1.json").read_text())
    assert config["rewards"] == {"short": "procedural_frame", "long": "procedural_video"}
    assert config["vae"] == {"type": "space_to_depth", "factor": 4} and "32x32" in config["description"]


def test_temporal_loss_sees_a_jump_at_a_chunk_boundary_and_change_weight_the_moving_pixels():
    from streamt1_engine.tiny.train import change_weight, temporal_loss

    frames, _, times = ProceduralVideos(seed=5, two_object_prob=0.0).streaming_batch(0, 2, 4, 3, gap_prob=0.0)
    x0 = build_tiny_model().vae.encode(frames)
    weight = torch.ones(2, 12)
    assert temporal_loss(x0, x0, x0, times, 3, weight) == 0  # the truth continues its context exactly
    jumped = x0.clone()
    jumped[:, :, 6:9] = torch.roll(x0[:, :, 6:9], 1, dims=-1)  # chunk 2 shifted one latent pixel: a seam
    seam = temporal_loss(jumped, x0, x0, times, 3, weight)
    assert seam > 0
    # the first frame of a chunk is compared with the context, not with the prediction of the chunk before
    assert temporal_loss(x0, x0, jumped, times, 3, weight) > 0
    # after a jump in time the boundary is not a frame step and is not compared
    gap_times = times.clone()
    gap_times[:, 6:] += 30
    assert temporal_loss(jumped, x0, x0, gap_times, 3, weight) < seam
    moving = change_weight(frames, times, 4)
    assert moving.shape == (2, 12, 8, 8) and moving[:, 0].sum() == 0 and moving[:, 1:].sum() > 0
    assert change_weight(frames, gap_times, 4)[:, 6].sum() == 0


def test_the_sampler_shift_sets_the_training_timesteps_and_later_stages_keep_it(tmp_path):
    import dataclasses

    from streamt1_engine.engine_format import read_engine_spec
    from streamt1_engine.tiny.model import inference_timesteps, tiny_sampler_config
    from streamt1_engine.tiny.train import sample_timesteps, train

    low = dataclasses.replace(tiny_sampler_config(), shift=1.5)
    times = sample_timesteps(64, 4, torch.Generator().manual_seed(0), low).flatten()
    hits = lambda steps: [bool(((times - t).abs() < 1e-2).any()) for t in steps]  # noqa: E731
    assert all(hits(inference_timesteps(low)))  # the inference steps of this sampler are trained on...
    assert not any(hits(inference_timesteps(tiny_sampler_config())[1:]))  # ...not those of shift 5
    info = train(tmp_path / "a", steps=1, batch=2, threads=1, val_size=2, log_every=1, sampler_shift=2.0)
    assert info["sampler_shift"] == 2.0 and read_engine_spec(tmp_path / "a").sampler.shift == 2.0
    train(tmp_path / "b", steps=1, batch=2, threads=1, val_size=2, log_every=1, init=tmp_path / "a")
    assert read_engine_spec(tmp_path / "b").sampler.shift == 2.0  # from the init dir
    with pytest.raises(StreamT1Error, match="sampler_shift"):
        train(tmp_path / "c", steps=1, sampler_shift=0.0)
