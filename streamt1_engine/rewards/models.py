"""The paper's model-based rewards: HPSv3 (image, short-term) and VideoAlign / VideoReward (video, long-term).

Both are Qwen2-VL models with a small reward head read at special tokens of a chat prompt. The layouts follow
the public checkpoints and their official loaders (``MizzenAI/HPSv3``: a full Qwen2-VL-7B state dict plus a
3-layer MLP head giving (mu, sigma) at ``<|Reward|>``, on the ``Qwen/Qwen2-VL-7B-Instruct`` base named by the
hpsv3 package's config; ``KlingTeam/VideoReward``: Qwen2-VL-2B with LoRA (merged here at load time) and a
bias-free linear head at ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``, its base and LoRA settings
in ``model_config.json``). They are verified only on tiny random configs of the same architecture, not against
the released weights.

What matches the official inference code: the prompt templates (read from the official sources, see
``templates``), sequential rotary positions (see ``qwen2vl``), the resize rule, uint8 frames resized as PIL
(HPSv3) or torchvision (VideoAlign) resize them, HPSv3's mu averaged over the frames, VideoAlign's frame
sampling, its "Overall" = VQ + MQ + TA of the normalised scores, and (by default) its input: an H.264 MP4 as
Stream-T1 writes one, decoded again. Not reproduced: flash-attention kernels (the engine uses transformers'
default attention), so bf16 scores agree to bf16 rounding, not bit for bit.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import StreamT1Error
from ..lora import merge_lora, peft_base_weights, peft_lora_entries
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
from .templates import HPSV3_FALLBACK, VIDEOALIGN_FALLBACK, hpsv3_template, videoalign_template, warn_fallback

# The engine's own templates, used only when no official one is found (with a warning).
HPSV3_TEMPLATE, VIDEOALIGN_TEMPLATE = HPSV3_FALLBACK, VIDEOALIGN_FALLBACK
# Base model of the HPSv3 release (``model_name_or_path`` of the hpsv3 package's config/HPSv3_7B.yaml). The
# release repository's own files are not a Qwen2-VL base: its official loader never reads them.
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
# VideoAlign's PEFTLoraConfig defaults, for a model_config.json that leaves them out.
VIDEOALIGN_LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "use_rslora": False}
# Stream-T1 writes reward videos with torchvision.io.write_video at 16 fps: libx264, yuv420p, no options, so
# PyAV's stream defaults of the version it pins (av 13.1) apply: 1024 kbit/s, tolerance 128 kbit/s.
MP4_BIT_RATE, MP4_BIT_RATE_TOLERANCE = 1024000, 128000

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


def _pick_template(template: str | None, found: tuple[str | None, str], fallback: str, tokens: list[str],
                   what: str) -> tuple[str, str]:
    """(template, origin): the caller's text, else the official one found, else the fallback (warned once)."""
    if template is not None:
        return _check_template(template, tokens, what), "given"
    text, origin = found
    if text is None:
        warn_fallback(what, origin)
        return _check_template(fallback, tokens, what), "engine fallback"
    return _check_template(text, tokens, what), origin


class HPSv3Reward(ImageReward):
    """HPSv3 human-preference score of each frame (its mu), averaged over frames; roughly 0 to 15, higher = better.

    ``checkpoint``: hub id or folder holding ``HPSv3.safetensors`` (or a path to that file); ``base``: the
    Qwen2-VL-7B-Instruct config/tokenizer/preprocessor files (no weights are read from it; the checkpoint holds
    them all), as the official loader takes them from its config's ``model_name_or_path``, never from the
    checkpoint's folder. Each frame is resized on the device to HPSv3's fixed budget of ``pixels``
    (256 * 28 * 28) keeping its aspect ratio, bit for bit as PIL resizes the PNG frames in the official code.

    Prompt: ``template_source`` (the hpsv3 package or repository, its ``dataset/data_collator_qwen.py``, or a
    text file), else the installed ``hpsv3`` package, else the engine's own text with a warning; ``template``
    (a text with ``{prompt}``) overrides all. ``positions``: "sequential" as the official forward, or "mrope".
    """

    def __init__(self, checkpoint: str = "MizzenAI/HPSv3", base: str | None = None, template: str | None = None,
                 template_source: str | None = None, pixels: int = 256 * 28 * 28, max_batch: int = 32,
                 dtype: torch.dtype | None = None, positions: str = "sequential"):
        what = "HPSv3"
        found = hpsv3_template(template_source) if template is None else (None, "")
        self.template, self.template_origin = _pick_template(template, found, HPSV3_TEMPLATE, ["<|Reward|>"], what)
        located = locate(checkpoint, what + " weights", allow_patterns=["HPSv3.safetensors"])
        weights = located if located.is_file() else _weights_in(located, ("HPSv3.safetensors",), what)
        base_dir = locate(base or HPSV3_BASE, what + " base files", allow_patterns=BASE_FILES)
        config = _qwen_config(base_dir, what)
        backbone_weights, head_weights = backbone_state(_load_state(weights, what), what)
        self.scorer = Qwen2VLScorer(build_backbone(config, backbone_weights, what), build_head(head_weights, what),
                                    load_tokenizer(base_dir, None, ["<|Reward|>"], what),
                                    read_geometry(base_dir, config, what), ["<|Reward|>"], dtype, what,
                                    positions=positions, head_in_float32=True, resize_filter="pil")
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


def _merge_lora(state: dict, peft: dict | None, what: str) -> dict:
    """The dense weights of a peft-wrapped checkpoint with its LoRA folded in by the engine's one merge path
    (``lora.merge_lora``: ``W = W0 + scale * B @ A`` with peft's scale), in the base weights' dtypes."""
    merged, lora = peft_base_weights(state), peft_lora_entries(state)
    if not lora:
        return merged
    if peft is None:
        raise StreamT1Error(f"{what}: checkpoint has LoRA weights but model_config.json has no peft_lora_config")
    settings = {**VIDEOALIGN_LORA_DEFAULTS, **peft}
    dtypes = {key: t.dtype for key, t in merged.items()}
    for module in merge_lora(merged, lora, alpha=settings["lora_alpha"], rslora=bool(settings["use_rslora"]),
                             rank=int(settings["lora_r"]), what=f"{what}: LoRA"):
        merged[module + ".weight"] = merged[module + ".weight"].to(dtypes[module + ".weight"])
    return merged


def reward_mp4(frames: torch.Tensor, fps: float) -> bytes:
    """float [T, 3, H, W] in [0, 1] -> MP4 bytes written as Stream-T1 writes its reward videos
    (``torchvision.io.write_video``): 255 * frames truncated to uint8, libx264, yuv420p, integer fps, no codec
    options, PyAV 13's default bit rate."""
    import av

    _, _, height, width = frames.shape
    if height % 2 or width % 2:
        raise StreamT1Error(f"VideoAlign: H.264 (yuv420p) needs even frame sizes, got {height}x{width}; "
                            "pass mp4_round_trip=False")
    if "libx264" not in av.codecs_available:
        raise StreamT1Error("VideoAlign: this PyAV build has no libx264 encoder; pass mp4_round_trip=False")
    pixels = (frames.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate, stream.bit_rate_tolerance = MP4_BIT_RATE, MP4_BIT_RATE_TOLERANCE
        for image in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def read_mp4(data: bytes) -> torch.Tensor:
    """MP4 bytes -> uint8 frames [T, 3, H, W] (RGB), every frame of the first video stream."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)


def mp4_round_trip(frames: torch.Tensor, fps: float) -> torch.Tensor:
    """float [T, 3, H, W] in [0, 1] -> the uint8 frames [T, 3, H, W] that VideoAlign reads back from the MP4
    upstream writes (on frames.device)."""
    decoded = read_mp4(reward_mp4(frames, fps))
    if decoded.shape[0] != frames.shape[0]:
        raise StreamT1Error(f"VideoAlign: the MP4 round trip returned {decoded.shape[0]} frames for {frames.shape[0]}")
    return decoded.to(frames.device)


def videoalign_frame_indices(total: int, source_fps: float, sample_fps: float, num_frames: float | None = None,
                             sample_type: str = "uniform", factor: int = 2) -> list[int]:
    """Which of a clip's ``total`` frames VideoAlign's reader keeps (its ``smart_nframes`` and sample types).

    "uniform": ``num_frames`` if the checkpoint's data_config sets it, else ``sample_fps`` of a ``source_fps``
    clip, at least 4 and at most 768, rounded to an even count, capped by the clip, spread evenly; a clip shorter
    than one temporal patch repeats its frames (upstream rejects it). "multi_pts": 6 consecutive frames of an
    8 fps resampling around each of 4 evenly spaced points.
    """
    if sample_type == "multi_pts":
        count = int(total * 8 // source_fps)
        if count < 6 + 1:
            raise StreamT1Error(f"VideoAlign: a {total}-frame clip is too short for multi_pts sampling")
        resampled = torch.linspace(0, total - 1, count).round().long().tolist()
        points = torch.linspace(3, count - 3 - 1, 4).round().long().tolist()
        return [i for point in points for i in resampled[point - 3:point + 3]]
    if sample_type != "uniform":
        raise StreamT1Error(f"VideoAlign: unknown sample_type {sample_type!r} (uniform or multi_pts)")
    if num_frames is not None:
        count = round(float(num_frames) / factor) * factor
    else:
        low, high = math.ceil(4 / factor) * factor, math.floor(min(768, total) / factor) * factor
        count = round(min(max(total / source_fps * sample_fps, low), high) / factor) * factor
    count = min(count, total) // factor * factor
    if count < factor:
        count = factor
    return torch.linspace(0, total - 1, count).round().long().tolist()


def _checkout_candidates(checkpoint_dir: Path) -> list[Path]:
    """Folders that may hold a VideoAlign checkout: the checkpoint's folder and three levels above it."""
    return [checkpoint_dir, *list(checkpoint_dir.resolve().parents)[:3]]


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
    weight file itself; its ``model_config.json`` names the base model and the LoRA settings, as for the official
    loader. ``normalize``: True uses the mean/std of ``inference_config`` in ``model_config.json`` (the official
    ``use_norm=True``, which Stream-T1 uses for the long-term and the final scores), False gives raw head outputs,
    a dict ``{"VQ_mean": .., "VQ_std": .., ...}`` supplies them. ``dims`` picks which dimensions are summed.

    Input: with ``mp4_round_trip`` (default, as upstream scores the MP4 file it wrote) each clip is truncated to
    uint8 and goes through an in-memory H.264 encode/decode first (CPU, PyAV); False scores the frames as given.
    Frames are picked as VideoAlign's reader picks them (``videoalign_frame_indices``: the checkpoint's
    ``fps`` / ``num_frames`` / ``sample_type``; ``sample_fps`` overrides the fps) from a clip playing at
    ``source_fps`` (Stream-T1 writes 16 fps), and resized within the pixel budget as its reader does.

    Prompt: ``template_source`` (a VideoAlign checkout, its ``prompt_template.py``, or a text file), else a
    checkout found next to the checkpoint (``VideoAlign/checkpoints/...`` as its README sets it up, or
    ``.../VideoAlign`` beside the checkpoint's folders as Stream-T1's does), else the engine's own text with a
    warning; ``template`` (a text with ``{prompt}``) overrides all. ``positions``: "sequential" as the
    official forward, or "mrope".
    """

    kind = "video"

    def __init__(self, checkpoint: str = "KlingTeam/VideoReward", base: str | None = None,
                 normalize: bool | dict = True, dims: tuple[str, ...] = VIDEOALIGN_DIMS, template: str | None = None,
                 template_source: str | None = None, source_fps: float = 16.0, sample_fps: float | None = None,
                 min_pixels: int = 128 * 28 * 28, max_pixels: int | None = None, max_batch: int = 4,
                 dtype: torch.dtype | None = None, positions: str = "sequential", mp4_round_trip: bool = True):
        what = "VideoAlign"
        if not dims or any(d not in VIDEOALIGN_DIMS for d in dims):
            raise StreamT1Error(f"{what}: dims must be a non-empty subset of {VIDEOALIGN_DIMS}, got {dims}")
        located = locate(checkpoint, what + " weights",
                         allow_patterns=["model_config.json", "checkpoint-*/model.pth", "checkpoint-*/tokenizer/*"])
        # model_config.json sits next to the checkpoint-N folders; a weight file may be given directly
        search = [located] if located.is_dir() else [located.parent, located.parent.parent]
        settings_file = next((d / "model_config.json" for d in search if (d / "model_config.json").is_file()), None)
        settings = read_json(settings_file, what) if settings_file else {}
        model_cfg, data_cfg = settings.get("model_config", {}), settings.get("data_config", {})
        found = (None, "") if template is not None else videoalign_template(
            template_source, data_cfg.get("prompt_template_type", "detailed_special"),
            _checkout_candidates(settings_file.parent if settings_file else search[0]))
        self.template, self.template_origin = _pick_template(template, found, VIDEOALIGN_TEMPLATE,
                                                             _VIDEOALIGN_TOKENS, what)
        weights = located if located.is_file() else _latest_checkpoint(located, what)
        base_id = base or model_cfg.get("model_name_or_path") or "Qwen/Qwen2-VL-2B-Instruct"
        base_dir = locate(base_id, what + " base files", allow_patterns=BASE_FILES)
        config = _qwen_config(base_dir, what)
        state = _merge_lora(_load_state(weights, what), settings.get("peft_lora_config"), what)
        backbone_weights, head_weights = backbone_state(state, what)
        self.scorer = Qwen2VLScorer(build_backbone(config, backbone_weights, what), build_head(head_weights, what),
                                    load_tokenizer(base_dir, weights.parent / "tokenizer", _VIDEOALIGN_TOKENS, what),
                                    read_geometry(base_dir, config, what), _VIDEOALIGN_TOKENS, dtype, what,
                                    positions=positions, head_in_float32=False, resize_filter="torchvision")
        self.stats = self._stats(normalize, settings.get("inference_config"), what)
        self.dims = tuple(dims)
        self.source_fps = float(source_fps)
        self.sample_fps = float(sample_fps or data_cfg.get("fps") or 2.0)
        self.num_frames = data_cfg.get("num_frames") if sample_fps is None else None
        self.sample_type = data_cfg.get("sample_type", "uniform")
        if self.sample_type not in ("uniform", "multi_pts"):
            raise StreamT1Error(f"{what}: unknown data_config sample_type {self.sample_type!r} (uniform or multi_pts)")
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels or data_cfg.get("max_frame_pixels") or 240 * 320)
        self.max_batch = max_batch
        self.mp4_round_trip = bool(mp4_round_trip)
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
        key = (total, device)
        if key not in self._index_cache:
            index = videoalign_frame_indices(total, self.source_fps, self.sample_fps, self.num_frames,
                                             self.sample_type, self.scorer.geometry.temporal_patch_size)
            self._index_cache[key] = torch.tensor(index, device=device)
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
        if self.mp4_round_trip:
            frames = torch.stack([mp4_round_trip(clip, self.source_fps) for clip in frames]).float().div_(255.0)
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
