"""The embedded tiny model: procedural training data, its metrics and rewards, the tiny text encoder,
the trainer and the loader of the weights shipped in ``streamt1_engine/assets/tiny``.

Importing this package registers the "tiny" text encoder type and the "procedural_frame",
"procedural_video", "procedural_motion" and "procedural_video_motion" rewards with the engine's registries.
"""
from . import rewards as _rewards  # noqa: F401  (registers the rewards)
from . import text_encoder as _text_encoder  # noqa: F401  (registers the text encoder type)
from .metrics import METRIC_NAMES, video_metrics
from .model import ASSET_DIR, TinyModel, build_tiny_model, load_tiny_model, sample_video
from .motion_reward import ProceduralMotionReward
from .procedural import ProceduralVideos, make_sample, parse_prompt
from .rewards import ProceduralFrameReward, ProceduralPromptReward, ProceduralVideoReward
from .text_encoder import TinyTextEncoder

__all__ = ["ASSET_DIR", "METRIC_NAMES", "ProceduralFrameReward", "ProceduralMotionReward", "ProceduralPromptReward",
           "ProceduralVideoReward",
           "ProceduralVideos", "TinyModel", "TinyTextEncoder", "build_tiny_model", "load_tiny_model", "make_sample",
           "parse_prompt", "sample_video", "video_metrics"]
