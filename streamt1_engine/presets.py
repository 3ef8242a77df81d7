"""Named run presets: every setting of a published configuration in one name.

``stream-t1-paper`` is the Stream-T1 paper's setup as its official code runs it: the LongLive base with its
rank-256 LoRA (alpha 256), the ``stream-t1`` attention layout (local 12 frames including a 3-frame sink that
may grow to 15), beam search B=2 K=2 over a 10-chunk window with the reference's thresholds, its noise
(``noise_mode="official"``), its reward inputs (``reward_frames="cold"``) and routing history (``lineage``),
HPSv3 as the short-term reward and VideoAlign for the long-term reward and the final pick, 21 latent frames
(5 s at 16 fps), seed 42, bf16. Model locations default to where the official README downloads them
(relative to the working directory) and the diffusers-format Wan2.1 text encoder and VAE on the hub; pass
your own paths to override any of them.

``tiny-stream-t1`` is Stream-T1 on the embedded tiny model with memory-routing values measured for it
(bench/results/quality-sweep-2026-12-01-v2-weights*.md): with the paper's long threshold 0.2 its long-term
score never drops enough for APPEND, so a long threshold of 0 lets APPEND fire, and an EMA alpha of 0.9
lets a merge move the sink. On 50-chunk streams with the procedural frame and video rewards, against the
same search without memory sinking, this brought the seam ratio closer to 1 and raised the composite, on
the prompts it was chosen on and on prompts it was not; so the preset names those rewards. With the
model's own long-term reward (the video score with the motion verifier, which makes objects follow the
prompted direction) the same routing fires but moved no metric outside its interval. The paper's values
stay the default everywhere else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import require
from .search.config import SearchConfig


@dataclass(frozen=True)
class RunPreset:
    """Defaults for ``from_pretrained`` and ``generate``; anything passed explicitly wins."""

    name: str
    description: str
    model: str
    lora: str | None = None
    lora_alpha: float | None = None
    text_encoder: str | None = None
    vae: str | None = None
    stream_preset: str | None = None
    dtype: str = "auto"
    search: SearchConfig = field(default_factory=SearchConfig)
    short_reward: str | None = None
    long_reward: str | None = None
    final_reward: str | None = None
    num_chunks: int = 7
    seed: int = 42

    def engine_kwargs(self) -> dict:
        """Keyword arguments for ``StreamT1Engine.from_pretrained`` (``source`` included)."""
        return dict(source=self.model, lora=self.lora, lora_alpha=self.lora_alpha, text_encoder=self.text_encoder,
                    vae=self.vae, stream_preset=self.stream_preset, dtype=self.dtype)

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``StreamT1Engine.generate`` / ``stream`` besides the prompt."""
        return dict(num_chunks=self.num_chunks, seed=self.seed, search=self.search, short_reward=self.short_reward,
                    long_reward=self.long_reward, final_reward=self.final_reward)

    def cli_defaults(self) -> dict:
        """The ``streamt1 generate`` defaults this preset implies (flag destinations -> values)."""
        from .flags import flag_defaults

        return dict(model=self.model, lora=self.lora, lora_alpha=self.lora_alpha, text_encoder=self.text_encoder,
                    vae=self.vae, stream_preset=self.stream_preset, dtype=self.dtype, chunks=self.num_chunks,
                    seed=self.seed, **flag_defaults(SearchConfig, self.search),
                    short_reward=self.short_reward, long_reward=self.long_reward, final_reward=self.final_reward)


WAN_DIFFUSERS = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

RUN_PRESETS: dict[str, RunPreset] = {
    "stream-t1-paper": RunPreset(
        name="stream-t1-paper",
        description="Stream-T1 paper: LongLive + LoRA, stream-t1 layout, B=2 K=2 W=10, HPSv3 short, VideoAlign "
                    "long and final, official noise and cold reward frames, 21 latent frames, seed 42",
        model="longlive_models/models/longlive_base.pt",
        lora="longlive_models/models/lora.pt",
        lora_alpha=256.0,
        text_encoder=WAN_DIFFUSERS,
        vae=WAN_DIFFUSERS,
        stream_preset="stream-t1",
        dtype="bfloat16",
        search=SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=10, noise_sigma=-0.1,
                            short_threshold=0.0, long_threshold=0.2, fusion_cap=0.4, ema_alpha=0.999,
                            noise_mode="official", reward_frames="cold", short_history="lineage"),
        short_reward="hpsv3",
        long_reward="videoalign",
        final_reward="videoalign",
        num_chunks=7,
        seed=42,
    ),
    "tiny-stream-t1": RunPreset(
        name="tiny-stream-t1",
        description="embedded tiny model: Stream-T1 B=2 K=2 with memory routing measured for it (short "
                    "threshold 0, long threshold 0, EMA alpha 0.9), procedural frame and video rewards (no "
                    "motion verifier), 50 chunks, seed 42",
        model="tiny",
        search=SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, short_threshold=0.0, long_threshold=0.0,
                            ema_alpha=0.9),
        short_reward="procedural_frame",
        long_reward="procedural_video",
        num_chunks=50,
        seed=42,
    ),
}


def run_preset(name: str, **overrides) -> RunPreset:
    """The named preset, with fields replaced by ``overrides`` (e.g. ``model=`` a local path)."""
    require(name in RUN_PRESETS, f"unknown preset {name!r} (known: {', '.join(sorted(RUN_PRESETS))})")
    return dataclasses.replace(RUN_PRESETS[name], **overrides)
