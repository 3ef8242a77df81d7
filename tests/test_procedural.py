"""Procedural data of the tiny model and the metrics/rewards computed from it."""
import random

import pytest
import torch

from streamt1_engine.errors import StreamT1Error
from streamt1_engine.tiny import metrics
from streamt1_engine.tiny.procedural import (
    PALETTE,
    ProceduralVideos,
    contiguous_chunks,
    make_sample,
    parse_prompt,
    streaming_times,
)
from streamt1_engine.tiny.rewards import ProceduralFrameReward, ProceduralPromptReward, ProceduralVideoReward


def test_samples_are_deterministic_and_well_formed():
    a, b = make_sample(3, 11), make_sample(3, 11)
    assert torch.equal(a.frames, b.frames) and a.prompt == b.prompt
    assert a.frames.shape == (12, 3, 32, 32) and a.frames.dtype == torch.float32
    assert 0.0 <= a.frames.min() and a.frames.max() <= 1.0
    assert a.positions.shape == (len(a.scene.objects), 12, 2)
    other = [make_sample(3, i).prompt for i in range(12, 30)] + [make_sample(4, 11).prompt]
    assert any(p != a.prompt for p in other)


def test_prompt_describes_the_frames():
    sample = make_sample(0, 5)
    spec = parse_prompt(sample.prompt)
    assert spec.background == sample.scene.background
    assert [o[:3] for o in spec.objects] == [(o.colour, o.shape, o.direction) for o in sample.scene.objects]
    corner = sample.frames[0, :, 0, 0]  # objects start away from the corners
    assert torch.allclose(corner, torch.tensor(PALETTE[spec.background]))
    obj = sample.scene.objects[-1]  # drawn last, so never occluded
    x, y = sample.positions[-1, 0].round().long().tolist()
    assert torch.allclose(sample.frames[0, :, y, x], torch.tensor(PALETTE[obj.colour]))


def test_objects_move_the_named_way_at_first():
    for index in range(20):
        sample = make_sample(1, index)
        for obj, pos in zip(sample.scene.objects, sample.positions):
            step = pos[1] - pos[0]
            axis = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[obj.direction]
            assert step[axis[0]] * axis[1] > 0.4


def test_streaming_clips_jump_in_time_only_after_the_sink():
    rng = random.Random(0)
    clips = [streaming_times(rng, 4, 3) for _ in range(50)]
    follows = torch.stack([contiguous_chunks(t, 3) for t in clips])
    assert follows[:, 0].all() and follows[:, 3].all()  # the generated chunk always follows its window
    assert (~follows[:, 1]).any()  # some clips keep a sink from long ago
    frames, prompts, times = ProceduralVideos(seed=2).streaming_batch(0, 3, 4, 3)
    assert frames.shape == (3, 12, 3, 32, 32) and len(prompts) == 3 and times.shape == (3, 12)


def test_parse_prompt_tolerates_unknown_words():
    spec = parse_prompt("A Red circle, moving LEFT and a green square moving up on a purple background!")
    assert spec.background == "purple"
    assert spec.objects == [("red", "circle", "left"), ("green", "square", "up")]
    assert parse_prompt("a cat playing piano").objects == []


def _corruptions(frames: torch.Tensor, gen: torch.Generator) -> dict:
    return {
        "wrong colour": frames[:, [1, 2, 0]],
        "shuffled": frames[torch.randperm(frames.shape[0], generator=gen)],
        "noise": torch.rand(frames.shape, generator=gen),
    }


def test_metrics_rank_ground_truth_above_corruptions():
    gen = torch.Generator().manual_seed(0)
    videos = ProceduralVideos(seed=7)
    wins = {name: 0 for name in ("wrong colour", "shuffled", "noise")}
    trials = 8
    for index in range(trials):
        sample = videos[index]
        corrupted = _corruptions(sample.frames, gen)
        batch = torch.stack([sample.frames, *corrupted.values()])
        m = metrics.video_metrics(batch, sample.prompt)
        truth = {k: v[0].item() for k, v in m.items()}
        assert truth["background"] > 0.95 and truth["colour"] > 0.9 and truth["flicker"] < 1e-6
        for j, name in enumerate(corrupted, start=1):
            if name == "wrong colour":
                better = truth["colour"] > m["colour"][j] + 0.5
            elif name == "shuffled":
                better = truth["smoothness"] > m["smoothness"][j] + 0.2
            else:
                better = all(truth[k] > m[k][j] + 0.5 for k in ("colour", "shape", "persistence"))
            wins[name] += int(better)
    assert all(count >= trials - 1 for count in wins.values()), wins


def test_rewards_follow_the_protocol_and_prefer_the_truth():
    gen = torch.Generator().manual_seed(1)
    sample = make_sample(9, 3)
    bad = _corruptions(sample.frames, gen)
    batch = torch.stack([sample.frames, bad["wrong colour"], bad["noise"]])
    frame_reward, video_reward = ProceduralFrameReward(), ProceduralVideoReward()
    assert frame_reward.kind == "image" and video_reward.kind == "video"
    for reward in (frame_reward, video_reward):
        scores = reward(batch, sample.prompt)
        assert scores.shape == (3,) and scores.dtype == torch.float32
        assert scores[0] > scores[1] + 0.3 and scores[0] > scores[2] + 0.3
    shuffled = torch.stack([sample.frames, bad["shuffled"]])
    assert video_reward(shuffled, sample.prompt)[0] > video_reward(shuffled, sample.prompt)[1]
    # a prompt outside the grammar still gets finite (prompt-free) scores
    assert torch.isfinite(video_reward(batch, "a cat playing piano")).all()


def test_procedural_reward_rejects_bad_terms_and_frames():
    with pytest.raises(StreamT1Error, match="unknown procedural reward terms"):
        ProceduralPromptReward(terms=("colour", "beauty"))
    with pytest.raises(StreamT1Error, match="expects frames"):
        ProceduralVideoReward()(torch.zeros(2, 3, 32, 32), "a red circle moving left on a blue background")


def test_rewards_are_buildable_by_name():
    import streamt1_engine.rewards as registry
    import streamt1_engine.tiny  # noqa: F401  (registers the procedural rewards)

    reward = registry.build_reward("procedural_video")
    assert isinstance(reward, ProceduralVideoReward)
