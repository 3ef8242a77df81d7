"""The embedded model's direction-aware motion verifier, on procedural clips whose motion is known."""
import pytest
import torch

from streamt1_engine.errors import StreamT1Error
from streamt1_engine.rewards import build_reward
from streamt1_engine.tiny.motion_reward import ProceduralMotionReward
from streamt1_engine.tiny.procedural import make_sample

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _clips(n=24, frames=24):
    return [make_sample(11, i, num_frames=frames, two_object_prob=0.0) for i in range(n)]


def test_right_direction_scores_above_wrong_and_still():
    reward = ProceduralMotionReward()
    for sample in _clips():
        video = sample.frames[None]
        direction = sample.scene.objects[0].direction
        wrong = sample.prompt.replace(f"moving {direction}", f"moving {OPPOSITE[direction]}")
        still = video[:, :1].expand_as(video)
        right_score = reward(video, sample.prompt).item()
        assert right_score > 0.85, sample.prompt  # clips of 24 frames bounce; the heading follows
        assert reward(video, wrong).item() < 0.25, wrong
        assert reward(still, sample.prompt).item() == pytest.approx(0.5)


def test_sideways_motion_and_time_reversal():
    reward = ProceduralMotionReward()
    sample = next(s for s in _clips() if s.scene.objects[0].direction in ("left", "right"))
    video = sample.frames[None]
    sideways = sample.prompt.replace(f"moving {sample.scene.objects[0].direction}", "moving up")
    assert reward(video, sideways).item() == pytest.approx(0.5, abs=0.1)  # no vertical motion at all
    start = video[:, :5]  # the scenes leave room for 4 steps before the first bounce
    assert reward(start.flip(1), sample.prompt).item() < 0.25 < 0.75 < reward(start, sample.prompt).item()


def test_batched_two_objects_and_undefined_prompts():
    reward = ProceduralMotionReward()
    two = next(make_sample(2, i, num_frames=12, two_object_prob=1.0) for i in range(5))
    batch = torch.stack([two.frames, two.frames[:1].expand_as(two.frames)])
    scores = reward(batch, two.prompt)
    assert scores.shape == (2,) and scores[0] > 0.7 and scores[1] == pytest.approx(0.5)
    assert reward(batch, "a red circle on a blue background").tolist() == [0.5, 0.5]  # no direction named
    with pytest.raises(StreamT1Error, match="expects frames"):
        reward(two.frames, two.prompt)
    with pytest.raises(StreamT1Error, match="speed"):
        ProceduralMotionReward(speed=0)


def test_registered_among_the_embedded_models_rewards():
    import streamt1_engine.tiny  # noqa: F401  (registers the procedural rewards)

    motion = build_reward("procedural_motion")
    combined = build_reward("procedural_video_motion")
    assert motion.kind == "video" and combined.kind == "video" and combined.name == "procedural_video_motion"
    sample = _clips(1)[0]
    video = sample.frames[None]
    still = video[:, :1].expand_as(video)
    assert combined(video, sample.prompt).item() > combined(still, sample.prompt).item()
    assert 0.0 <= combined(video, sample.prompt).item() <= 1.0
