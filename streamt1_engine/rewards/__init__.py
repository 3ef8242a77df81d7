"""Reward plug-ins that score all candidates of a chunk in one batched call on the device.

``HPSv3Reward`` and ``VideoAlignReward`` (the paper's rewards) live in ``rewards.models`` and are imported
lazily by ``build_reward`` so that the weight-free rewards need nothing beyond torch.
"""
from .base import CallableReward, ImageReward, Reward, WeightedSum, check_frames, hybrid_score, hybrid_weight, score
from .builtin import ClipTextAlignment, MotionSmoothness, SharpnessExposure, TemporalConsistency
from .registry import build_reward, default_long_reward, default_short_reward, known_rewards, register_reward

__all__ = ["CallableReward", "ClipTextAlignment", "ImageReward", "MotionSmoothness", "Reward", "SharpnessExposure",
           "TemporalConsistency", "WeightedSum", "build_reward", "check_frames", "default_long_reward",
           "default_short_reward", "hybrid_score", "hybrid_weight", "known_rewards", "register_reward", "score"]
