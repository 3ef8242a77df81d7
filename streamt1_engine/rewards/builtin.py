"""Rewards that need no downloaded weights (plain batched tensor math), plus CLIP text alignment.

They are cheap stand-ins for the paper's HPSv3 / VideoAlign rewards: good enough to rank obviously good vs
bad candidates, and a way to run the search end to end without multi-GB checkpoints. All return higher =
better; the range of each is in its docstring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import StreamT1Error
from ._loading import DeviceFollower, Normalizer, locate, read_json, resize
from .base import ImageReward, check_frames

_LUMA = (0.299, 0.587, 0.114)
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def _shrink(frames: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """Area-downsample [N, T, 3, H, W] so the longer side is at most ``max_side`` (temporal metrics need no
    full resolution, and long windows would otherwise double their memory in the difference tensors)."""
    h, w = frames.shape[-2:]
    if not max_side or max(h, w) <= max_side:
        return frames
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    n, t = frames.shape[:2]
    small = F.interpolate(frames.flatten(0, 1), size=size, mode="area")
    return small.reshape(n, t, *small.shape[1:])


def _reduce(diff: torch.Tensor, norm: str) -> torch.Tensor:
    """Mean absolute (l1) or root-mean-square (l2) value per sample of a [N, ...] difference tensor."""
    diff = diff.float().flatten(1)
    if norm == "l1":
        return diff.abs().mean(dim=1)
    return diff.pow(2).mean(dim=1).sqrt()


def _check_norm(norm: str) -> str:
    if norm not in ("l1", "l2"):
        raise StreamT1Error(f"norm must be 'l1' or 'l2', got {norm!r}")
    return norm


class TemporalConsistency:
    """Negative mean difference between consecutive frames: range [-1, 0], 0 for a still clip.

    Penalises flicker and sudden jumps; alone it also prefers static video, so pair it with a reward that
    values content or motion.
    """

    kind = "video"

    def __init__(self, norm: str = "l1", max_side: int | None = 256):
        self.norm, self.max_side = _check_norm(norm), max_side
        self.name = "temporal_consistency"

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        check_frames(frames, self.name)
        if frames.shape[1] < 2:
            return frames.new_zeros(frames.shape[0], dtype=torch.float32)
        frames = _shrink(frames, self.max_side)
        return -_reduce(frames[:, 1:] - frames[:, :-1], self.norm)


class MotionSmoothness:
    """Negative frame-interpolation error: how far frame t is from the average of frames t-1 and t+1.

    Range [-1, 0]; 0 for motion that is linear in time (and for still clips), strongly negative for jitter.
    Clips shorter than 3 frames score 0.
    """

    kind = "video"

    def __init__(self, norm: str = "l1", max_side: int | None = 256):
        self.norm, self.max_side = _check_norm(norm), max_side
        self.name = "motion_smoothness"

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        check_frames(frames, self.name)
        if frames.shape[1] < 3:
            return frames.new_zeros(frames.shape[0], dtype=torch.float32)
        frames = _shrink(frames, self.max_side)
        predicted = 0.5 * (frames[:, :-2] + frames[:, 2:])
        return -_reduce(frames[:, 1:-1] - predicted, self.norm)


class SharpnessExposure(ImageReward):
    """Per-frame image quality from four factors in [0, 1], multiplied (any flaw pulls the score down):

    - sharpness ``s / (s + sharp_ref)``, s = standard deviation of the luma Laplacian;
    - unclipped share of pixel values inside ``[clip_low, clip_high]``;
    - exposure ``1 - 2 |mean luma - 0.5|``;
    - contrast ``c / (c + contrast_ref)``, c = standard deviation of luma.

    Range [0, 1), averaged over frames.
    """

    def __init__(self, sharp_ref: float = 0.05, contrast_ref: float = 0.05, clip_low: float = 0.02,
                 clip_high: float = 0.98):
        self.sharp_ref, self.contrast_ref = sharp_ref, contrast_ref
        self.clip_low, self.clip_high = clip_low, clip_high
        self.name = "sharpness_exposure"
        self._kernels: dict = {}

    def _kernel(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (images.device, images.dtype)
        if key not in self._kernels:
            luma = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
            lap = torch.tensor(_LAPLACIAN, device=images.device, dtype=images.dtype).view(1, 1, 3, 3)
            self._kernels[key] = (luma, lap)
        return self._kernels[key]

    def score_images(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        images = images.float()
        luma_w, lap_k = self._kernel(images)
        luma = (images * luma_w).sum(dim=1, keepdim=True)  # [M, 1, H, W]
        sharp = F.conv2d(luma, lap_k).flatten(1).std(dim=1) if min(luma.shape[-2:]) >= 3 else luma.new_zeros(
            luma.shape[0])
        sharp_term = sharp / (sharp + self.sharp_ref)
        clipped = ((images < self.clip_low) | (images > self.clip_high)).float().flatten(1).mean(dim=1)
        flat = luma.flatten(1)
        exposure = (1.0 - 2.0 * (flat.mean(dim=1) - 0.5).abs()).clamp(min=0.0)
        contrast = flat.std(dim=1)
        contrast_term = contrast / (contrast + self.contrast_ref)
        return sharp_term * (1.0 - clipped) * exposure * contrast_term


# Only what loading a CLIP checkpoint needs; large alternative weight formats are skipped.
_CLIP_FILES = ["*.json", "*.txt", "*.safetensors"]
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size_from(value, default: int) -> int:
    """Side length from a preprocessor ``size`` / ``crop_size`` entry (int, or dict of edges)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if isinstance(value.get(key), int):
                return value[key]
    return default


class ClipTextAlignment(DeviceFollower, ImageReward):
    """CLIP cosine similarity between each frame and the prompt: range [-1, 1] (typically 0.1 to 0.4).

    ``model``: a local folder or hub id holding a transformers ``CLIPModel`` with its tokenizer (and usually a
    ``preprocessor_config.json``). Frames are resized (shortest edge, bicubic), centre-cropped and normalised
    on the device with the checkpoint's mean/std; the prompt's text embedding is computed once and cached.
    """

    def __init__(self, model: str = "openai/clip-vit-base-patch32", dtype: torch.dtype | None = None):
        from transformers import AutoTokenizer, CLIPModel

        directory = locate(model, "CLIP weights", allow_patterns=_CLIP_FILES)
        try:
            self.module = CLIPModel.from_pretrained(directory).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as exc:  # missing weight file, wrong architecture, broken tokenizer
            raise StreamT1Error(f"cannot load CLIP from {model!r}: {type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]}") from None
        image_size = self.module.config.vision_config.image_size
        pre_path = directory / "preprocessor_config.json"
        pre = read_json(pre_path, "CLIP") if pre_path.is_file() else {}
        self.resize_to = _size_from(pre.get("size"), image_size)
        self.crop = _size_from(pre.get("crop_size"), image_size)
        self.normalize = Normalizer(pre.get("image_mean", _OPENAI_CLIP_MEAN), pre.get("image_std", _OPENAI_CLIP_STD))
        self.max_text_len = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                                self.module.config.text_config.max_position_embeddings)
        self.dtype = dtype
        self.name = f"clip:{model}"
        self._text_cache: dict = {}

    def on_moved(self, device, dtype):
        self._text_cache.clear()

    def _preprocess(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.resize_to / min(h, w)
        images = resize(images.float(), max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        top, left = (images.shape[-2] - self.crop) // 2, (images.shape[-1] - self.crop) // 2
        images = images[..., top:top + self.crop, left:left + self.crop]
        return self.normalize(images).to(dtype)

    def _text_embedding(self, prompt: str, device: torch.device) -> torch.Tensor:
        if prompt not in self._text_cache:
            tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=self.max_text_len,
                                    return_tensors="pt").to(device)
            features = _features(self.module.get_text_features(input_ids=tokens["input_ids"],
                                                                attention_mask=tokens.get("attention_mask")))
            self._text_cache[prompt] = F.normalize(features.float(), dim=-1)
        return self._text_cache[prompt]

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        dtype = self.follow(images.device)
        text = self._text_embedding(prompt, images.device)
        image = F.normalize(_features(self.module.get_image_features(pixel_values=self._preprocess(images, dtype)))
                            .float(), dim=-1)
        return (image * text).sum(dim=-1)


def _features(output) -> torch.Tensor:
    """transformers >= 5 returns a model output whose ``pooler_output`` holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
