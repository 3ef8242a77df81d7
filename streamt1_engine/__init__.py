"""streamt1-engine: Stream-T1 test-time scaling for streaming video diffusion, on a shared paged KV cache."""
from .config import EngineConfig, SamplerConfig, StreamConfig, WanConfig
from .engine import GenerationResult, StreamChunk, StreamT1Engine
from .errors import StreamT1Error
from .search.config import SearchConfig

__version__ = "0.1.0"

__all__ = ["EngineConfig", "GenerationResult", "SamplerConfig", "SearchConfig", "StreamChunk", "StreamConfig",
           "StreamT1Engine", "StreamT1Error", "WanConfig", "__version__"]
