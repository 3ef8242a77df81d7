"""The paper's model-based rewards: HPSv3 (image, short-term) and VideoAlign / VideoReward (video, long-term).

Both are Qwen2-VL models with a small reward head read at special tokens of a chat prompt. The layouts follow
the public checkpoints as documented (``MizzenAI/HPSv3``: a full Qwen2-VL-7B state dict plus a 3-layer MLP head
giving (mu, sigma) at ``<|Reward|>``; ``KlingTeam/VideoReward``: Qwen2-VL-2B with LoRA (merged here at load
time) and a bias-free linear head at ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``). They are verified
only on tiny random configs of the same architecture, not against the released weights.

Prompt templates: the checkpoints were trained with their authors' instruction texts. The defaults here are
short templates of our own with the same reward tokens; pass the training-time text as ``template`` (with a
``{prompt}`` placeholder) to reproduce the published scores exactly.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import StreamT1Error
from ._loading import locate, read_json
from .base import ImageReward, check_frames
from .qwen2vl import (
    BASE_FILES,
    Qwen2VLScorer,
    backbone_state,
    build_backbone,
    build_head,
    load_tokenizer,
    read_geometry,
)

HPSV3_TEMPLATE = (
    "You are rating an AI-generated image for human preference. Consider its visual quality (plausible content, "
    "clarity, detail, composition, colour) and how well it follows the text prompt; 0 is the worst, 10 the best.\n"
    "Text prompt: {prompt}\n"
    "Overall rating of this image: <|Reward|>")

VIDEOALIGN_TEMPLATE = (
    "You are rating an AI-generated video on three separate criteria, each from 0 (worst) to 10 (best).\n"
    "Visual quality (clarity, detail, plausibility and aesthetics of the frames): <|VQ_reward|>\n"
    "Motion quality (stable, natural, smooth and sufficiently large movement): <|MQ_reward|>\n"
    "Text prompt: {prompt}\n"
    "Alignment with the text prompt (subjects, actions, scene, style, camera): <|TA_reward|>")

VIDEOALIGN_DIMS = ("VQ", "MQ", "TA")
_VIDEOALIGN_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _load_state(path: Path, what: str) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise StreamT1Error(f"{what}: cannot read {path.name}: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StreamT1Error(f"{what}: {path.name} is not a tensor state dict")
    return state


def _weights_in(directory: Path, preferred: tuple[str, ...], what: str) -> Path:
    for name in preferred:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) != 1:
        raise StreamT1Error(f"{what}: expected one weight file in {directory}, found "
                            f"{[p.name for p in candidates] or 'none'}")
    return candidates[0]


def _qwen_config(base_dir: Path, what: str):
    from transformers import Qwen2VLConfig

    try:
        return Qwen2VLConfig.from_pretrained(base_dir)
    except Exception as exc:
        raise StreamT1Error(f"{what}: cannot read the Qwen2-VL config in {base_dir}: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from None


def _check_template(template: str, tokens: list[str], what: str) -> str:
    missing = [t for t in ["{prompt}", *tokens] if template.count(t) != 1]
    if missing:
        raise StreamT1Error(f"{what}: the prompt template must contain each of {missing} exactly once")
    return template


class HPSv3Reward(ImageReward):
    """HPSv3 human-preference score of each frame (its mu), averaged over frames; roughly 0 to 15, higher = better.

    ``checkpoint``: hub id or folder holding ``HPSv3.safetensors`` (or a path to that file); ``base``: the
    Qwen2-VL-7B-Instruct config/tokenizer/preprocessor files (no weights are read from it; the checkpoint holds
    them all). A checkpoint folder that has its own ``config.json`` serves as its own base. Each frame is resized
    on the device to HPSv3's fixed budget of ``pixels`` (256 * 28 * 28) keeping its aspect ratio.
    """

    def __init__(self, checkpoint: str = "MizzenAI/HPSv3", base: str | None = None, template: str | None = None,
                 pixels: int = 256 * 28 * 28, max_batch: int = 32, dtype: torch.dtype | None = None):
        what = "HPSv3"
        self.template = _check_template(template or HPSV3_TEMPLATE, ["<|Reward|>"], what)
        located = locate(checkpoint, what + " weights", allow_patterns=["HPSv3.safetensors", "*.json"])
        weights = located if located.is_file() else _weights_in(located, ("HPSv3.safetensors",), what)
        own_base = located.is_dir() and (located / "config.json").is_file() and base is None
        base_dir = located if own_base else locate(base or "Qwen/Qwen2-VL-7B-Instruct",
                                                   what + " base files", allow_patterns=BASE_FILES)
        config = _qwen_config(base_dir, what)
        backbone_weights, head_weights = backbone_state(_load_state(weights, what), what)
        self.scorer = Qwen2VLScorer(build_backbone(config, backbone_weights, what), build_head(head_weights, what),
                                    load_tokenizer(base_dir, None, ["<|Reward|>"], what),
                                    read_geometry(base_dir, config, what), ["<|Reward|>"], dtype, what)
        self.pixels, self.max_batch = pixels, max_batch
        self.name = f"hpsv3:{checkpoint}"

    def score_images(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        text = self.template.replace("{prompt}", prompt)
        tp = self.scorer.geometry.temporal_patch_size
        scores = []
        for chunk in images.split(self.max_batch):
            clips = self.scorer.resize_clips(chunk[:, None], self.pixels, self.pixels)
            clips = clips.expand(-1, tp, -1, -1, -1)  # a still image fills the temporal patch with itself
            scores.append(self.scorer.reward_logits(clips, text, "image")[:, 0, 0])  # (mu, sigma) -> mu
        return torch.cat(scores)


def _merge_lora(state: dict, scale: float | None, what: str) -> dict:
    """Fold PEFT LoRA pairs into their base weights: ``W = W0 + scale * B @ A``; strip the PEFT prefixes."""
    state = {key.removeprefix("base_model.model."): value for key, value in state.items()}
    merged, lora = {}, {}
    for key, value in state.items():
        match = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if match:
            lora.setdefault(match.group(1), {})[match.group(2)] = value
        else:
            merged[key.replace(".base_layer.", ".")] = value
    if lora and scale is None:
        raise StreamT1Error(f"{what}: checkpoint has LoRA weights but no peft_lora_config (lora_r, lora_alpha)")
    for module, pair in lora.items():
        base_key = module + ".weight"
        if set(pair) != {"A", "B"} or base_key not in merged:
            raise StreamT1Error(f"{what}: incomplete LoRA weights for {module}")
        base = merged[base_key]
        merged[base_key] = (base.float() + scale * (pair["B"].float() @ pair["A"].float())).to(base.dtype)
    return merged


def _latest_checkpoint(root: Path, what: str) -> Path:
    steps = [(int(p.name.split("-")[1]), p) for p in root.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    for _, directory in sorted(steps, reverse=True):
        for name in ("model.pth", "model.safetensors"):
            if (directory / name).is_file():
                return directory / name
    return _weights_in(root, ("model.pth", "model.safetensors"), what)


class VideoAlignReward:
    """VideoAlign (VideoReward) score of a clip: the sum of its VQ / MQ / TA scores ("Overall").

    ``checkpoint``: hub id or folder of the release (``model_config.json`` + ``checkpoint-N/model.pth``), or the
    weight file itself. ``normalize``: True uses the mean/std of ``inference_config`` in ``model_config.json``
    (then the scores are roughly zero-mean, unit-std per dimension), False gives raw head outputs, a dict
    ``{"VQ_mean": .., "VQ_std": .., ...}`` supplies them. ``dims`` picks which dimensions are summed.
    Frames are taken at ``sample_fps`` (the release's 2 fps) from a clip assumed to play at ``source_fps``,
    in an even count of at least 4 (repeating frames of very short clips), and resized within the pixel budget.
    """

    kind = "video"

    def __init__(self, checkpoint: str = "KlingTeam/VideoReward", base: str | None = None,
                 normalize: bool | dict = True, dims: tuple[str, ...] = VIDEOALIGN_DIMS, template: str | None = None,
                 source_fps: float = 16.0, sample_fps: float | None = None, min_pixels: int = 128 * 28 * 28,
                 max_pixels: int | None = None, max_batch: int = 4, dtype: torch.dtype | None = None):
        what = "VideoAlign"
        self.template = _check_template(template or VIDEOALIGN_TEMPLATE, _VIDEOALIGN_TOKENS, what)
        if not dims or any(d not in VIDEOALIGN_DIMS for d in dims):
            raise StreamT1Error(f"{what}: dims must be a non-empty subset of {VIDEOALIGN_DIMS}, got {dims}")
        located = locate(checkpoint, what + " weights",
                         allow_patterns=["model_config.json", "checkpoint-*/model.pth", "checkpoint-*/tokenizer/*"])
        # model_config.json sits next to the checkpoint-N folders; a weight file may be given directly
        search = [located] if located.is_dir() else [located.parent, located.parent.parent]
        settings_file = next((d / "model_config.json" for d in search if (d / "model_config.json").is_file()), None)
        settings = read_json(settings_file, what) if settings_file else {}
        weights = located if located.is_file() else _latest_checkpoint(located, what)
        model_cfg, data_cfg = settings.get("model_config", {}), settings.get("data_config", {})
        peft = settings.get("peft_lora_config", {})
        base_id = base or model_cfg.get("model_name_or_path") or "Qwen/Qwen2-VL-2B-Instruct"
        base_dir = locate(base_id, what + " base files", allow_patterns=BASE_FILES)
        config = _qwen_config(base_dir, what)
        scale = None
        if peft.get("lora_r") and peft.get("lora_alpha"):
            r = float(peft["lora_r"])
            scale = float(peft["lora_alpha"]) / (r ** 0.5 if peft.get("use_rslora") else r)
        state = _merge_lora(_load_state(weights, what), scale, what)
        backbone_weights, head_weights = backbone_state(state, what)
        self.scorer = Qwen2VLScorer(build_backbone(config, backbone_weights, what), build_head(head_weights, what),
                                    load_tokenizer(base_dir, weights.parent / "tokenizer", _VIDEOALIGN_TOKENS, what),
                                    read_geometry(base_dir, config, what), _VIDEOALIGN_TOKENS, dtype, what)
        self.stats = self._stats(normalize, settings.get("inference_config"), what)
        self.dims = tuple(dims)
        self.source_fps = float(source_fps)
        self.sample_fps = float(sample_fps or data_cfg.get("fps") or 2.0)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels or data_cfg.get("max_frame_pixels") or 240 * 320)
        self.max_batch = max_batch
        self.name = f"videoalign:{checkpoint}"
        self._index_cache: dict = {}
        self._const_cache: dict = {}

    @staticmethod
    def _stats(normalize, inference_config, what: str):
        if normalize is False:
            return None
        stats = normalize if isinstance(normalize, dict) else inference_config
        if not isinstance(stats, dict):
            raise StreamT1Error(f"{what}: normalize=True needs inference_config mean/std in model_config.json; "
                                "pass normalize=False or a dict of them")
        try:
            mean = [float(stats[f"{d}_mean"]) for d in VIDEOALIGN_DIMS]
            std = [float(stats[f"{d}_std"]) for d in VIDEOALIGN_DIMS]
        except (KeyError, TypeError, ValueError):
            raise StreamT1Error(f"{what}: normalisation needs VQ/MQ/TA _mean and _std numbers") from None
        if any(s <= 0 for s in std):
            raise StreamT1Error(f"{what}: normalisation std must be positive, got {std}")
        return torch.tensor(mean), torch.tensor(std)

    def _frame_index(self, total: int, device) -> torch.Tensor:
        """Indices of the frames the model sees: ``sample_fps`` of a ``source_fps`` clip, an even count >= 4
        (capped by the clip; clips shorter than one temporal patch repeat their frames)."""
        key = (total, device)
        if key not in self._index_cache:
            factor = self.scorer.geometry.temporal_patch_size
            wanted = round(total / self.source_fps * self.sample_fps / factor) * factor
            count = factor if total < factor else min(max(wanted, 4), total // factor * factor)
            self._index_cache[key] = torch.linspace(0, total - 1, count).round().long().to(device)
        return self._index_cache[key]

    def _constants(self, device) -> tuple:
        """(mean, std, dims mask) on ``device``, uploaded once."""
        if device not in self._const_cache:
            mean, std = self.stats if self.stats is not None else (torch.zeros(3), torch.ones(3))
            mask = torch.tensor([float(d in self.dims) for d in VIDEOALIGN_DIMS])
            self._const_cache[device] = tuple(t.to(device) for t in (mean, std, mask))
        return self._const_cache[device]

    def dimension_scores(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        """Float32 [N, 3]: VQ, MQ, TA (normalised if configured)."""
        check_frames(frames, self.name)
        frames = frames.index_select(1, self._frame_index(frames.shape[1], frames.device))
        text = self.template.replace("{prompt}", prompt)
        out = []
        for chunk in frames.split(self.max_batch):
            clips = self.scorer.resize_clips(chunk, self.min_pixels, self.max_pixels)
            logits = self.scorer.reward_logits(clips, text, "video")  # [B, 3, out_dim]
            out.append(logits[..., 0] if logits.shape[-1] == 1 else logits.diagonal(dim1=1, dim2=2))
        mean, std, _ = self._constants(frames.device)
        return (torch.cat(out) - mean) / std

    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        _, _, mask = self._constants(frames.device)
        return (self.dimension_scores(frames, prompt) * mask).sum(dim=1)
