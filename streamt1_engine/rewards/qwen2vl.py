"""Qwen2-VL plumbing shared by the HPSv3 and VideoAlign rewards, done on the device with torch.

Pixels: frames become uint8 images as the official code makes them (``255 * frames`` truncated), are resized to
a multiple of ``patch_size * merge_size`` as its pipelines resize uint8 images (PIL for HPSv3, torchvision for
VideoAlign; uint8 in, uint8 out), normalised and cut into the flattened patch layout the Qwen2-VL vision tower
expects (``[patches, 3 * temporal_patch * patch * patch]``, patches ordered by time,
merge-window row/column, then position inside the window). Text: the chat template is rendered and tokenised
once per (prompt, grid) and cached with its positions, so repeated calls only upload pixels.

Positions: the official HPSv3 and VideoAlign forwards (written for transformers 4.45) call the language model
with ``position_ids=None``, and that model then counts 0..L-1 on all three rotary axes: no 3-D M-RoPE, although
Qwen2-VL itself would use it. The heads were trained that way, so ``positions="sequential"`` is the default;
``"mrope"`` gives Qwen2-VL's own layout for reward models trained with it.

Weights: a checkpoint state dict is remapped onto ``Qwen2VLModel`` (old and new transformers key layouts); the
model is built with its parameters on the meta device and the checkpoint's tensors are assigned in their place,
so the host never holds a second copy of the weights.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import StreamT1Error
from ._loading import DeviceFollower, Normalizer, pil_resize_levels, read_json, torchvision_resize_levels

# Files of a Qwen2-VL base repository needed for config, tokenizer and preprocessing (no weights).
BASE_FILES = ["*.json", "*.txt", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class VisionGeometry:
    """Patch sizes of the vision tower and the pixel budget / normalisation of its preprocessing."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple
    std: tuple

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def size_for(self, height: int, width: int, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
        """Height and width rounded to ``factor`` with the pixel count brought inside the budget, keeping the
        aspect ratio (the rule Qwen2-VL's preprocessing uses)."""
        low = self.min_pixels if min_pixels is None else min_pixels
        high = self.max_pixels if max_pixels is None else max_pixels
        f = self.factor
        h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
        if h * w > high:
            beta = math.sqrt(height * width / high)
            h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
        elif h * w < low:
            beta = math.sqrt(low / (height * width))
            h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return h, w


def read_geometry(base_dir: Path, config, what: str) -> VisionGeometry:
    """Patch sizes from the model config, pixel budget and mean/std from ``preprocessor_config.json``."""
    path = base_dir / "preprocessor_config.json"
    if not path.is_file():
        raise StreamT1Error(f"{what}: {base_dir} has no preprocessor_config.json (the Qwen2-VL base files)")
    pre = read_json(path, what)
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    vision = config.vision_config
    return VisionGeometry(
        patch_size=int(vision.patch_size), temporal_patch_size=int(vision.temporal_patch_size),
        merge_size=int(vision.spatial_merge_size),
        min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
        mean=tuple(pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(pre.get("image_std", (0.26862954, 0.26130258, 0.27577711))))


def patchify(clips: torch.Tensor, geometry: VisionGeometry) -> torch.Tensor:
    """Normalised clips [B, T, 3, H, W] (T a multiple of the temporal patch, H and W of ``factor``) ->
    pixel values [B * t * h * w, 3 * temporal_patch * patch * patch] with grid (t, h, w) in patches."""
    b, t, c, height, width = clips.shape
    p, tp, m = geometry.patch_size, geometry.temporal_patch_size, geometry.merge_size
    gt, gh, gw = t // tp, height // p, width // p
    x = clips.reshape(b, gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # b, t, h/m, w/m, m, m, c, tp, p, p
    return x.reshape(b * gt * gh * gw, c * tp * p * p)


POSITIONS = ("sequential", "mrope")
# How the official pipelines resize: HPSv3 resizes PIL images, VideoAlign uint8 tensors with torchvision.
RESIZE_FILTERS = {"pil": pil_resize_levels, "torchvision": torchvision_resize_levels}


def sequential_positions(length: int) -> torch.Tensor:
    """[3, length] positions 0..length-1 on every axis: what the language model computes for itself when called
    with ``position_ids=None``, as the official reward forwards do."""
    return torch.arange(length).expand(3, -1)


def mrope_positions(length: int, vision_start: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """3-D rotary positions [3, length] of a sequence with one vision block of ``t*h*w`` tokens (merged grid)
    at ``vision_start``: text counts up on all three axes; vision tokens take (frame, row, column) offsets from
    the block start; text after the block resumes at start + max(t, h, w) (as in the original Qwen2-VL)."""
    t, h, w = grid
    before = torch.arange(vision_start).expand(3, -1)
    tt = torch.arange(t).repeat_interleave(h * w)
    hh = torch.arange(h).repeat_interleave(w).repeat(t)
    ww = torch.arange(w).repeat(t * h)
    vision = torch.stack([tt, hh, ww]) + vision_start
    after_len = length - vision_start - t * h * w
    after = torch.arange(after_len).expand(3, -1) + vision_start + max(t, h, w)
    return torch.cat([before, vision, after], dim=1)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (no storage) while buffers stay real: the non-persistent ones (rotary
    inverse frequencies) are computed from the config in ``__init__`` and are not in any checkpoint."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextlib.contextmanager
def _skip_init():
    """Build modules without random initialisation (their weights are assigned from the checkpoint next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


def backbone_state(state: dict, what: str) -> tuple[dict, dict]:
    """Split a reward checkpoint into ``Qwen2VLModel`` weights and ``rm_head`` weights.

    Accepts the transformers < 4.52 layout (``model.layers``, ``visual``) and the newer one
    (``model.language_model``, ``model.visual``); ``lm_head`` is not needed for scoring and is dropped.
    """
    backbone, head = {}, {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key[len("rm_head."):]] = value
        elif key.startswith("lm_head."):
            continue
        elif key.startswith(("model.language_model.", "model.visual.")):
            backbone[key[len("model."):]] = value
        elif key.startswith("visual."):
            backbone[key] = value
        elif key.startswith("model."):
            backbone["language_model." + key[len("model."):]] = value
        else:
            raise StreamT1Error(f"{what}: unexpected checkpoint key {key!r} (not a Qwen2-VL reward model)")
    if not head:
        raise StreamT1Error(f"{what}: checkpoint has no rm_head weights (not a reward model checkpoint)")
    return backbone, head


def _check_transformers(what: str) -> None:
    """``Qwen2VLModel`` holds the vision tower only since transformers 4.52 (before, it was the text model)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    if (major, minor) < (4, 52):
        raise StreamT1Error(f"{what} needs transformers >= 4.52, found {transformers.__version__}")


def build_backbone(config, weights: dict, what: str) -> nn.Module:
    """``Qwen2VLModel`` with exactly the given weights (every parameter must be present, shapes must match),
    which become its parameters without a copy (built on the meta device, loaded with ``assign=True``)."""
    _check_transformers(what)
    from transformers import Qwen2VLModel

    embed = weights.get("language_model.embed_tokens.weight")
    if embed is None:
        raise StreamT1Error(f"{what}: checkpoint lacks the token embedding")
    config.text_config.vocab_size = int(embed.shape[0])  # reward tokens were added after the base vocabulary
    if hasattr(config, "vocab_size"):
        config.vocab_size = int(embed.shape[0])
    default = torch.get_default_dtype()
    torch.set_default_dtype(embed.dtype if embed.is_floating_point() else default)
    try:
        with _skip_init(), _parameters_on_meta():
            model = Qwen2VLModel(config)
    finally:
        torch.set_default_dtype(default)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise StreamT1Error(f"{what}: checkpoint does not match the Qwen2-VL config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise StreamT1Error(f"{what}: {key} has shape {tuple(value.shape)}, the config needs "
                                f"{tuple(expected[key].shape)}")
    model.load_state_dict(weights, strict=True, assign=True)
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise StreamT1Error(f"{what}: model tensors not covered by the checkpoint: {left_on_meta[:3]}")
    return model.eval().requires_grad_(False)


def build_head(weights: dict, what: str) -> nn.Module:
    """The reward head from its weights: one linear layer (``rm_head.weight``) or an MLP of numbered linear
    layers with ReLU between them (``rm_head.0``, ``rm_head.3``, ... ; dropout has no weights)."""
    if set(weights) <= {"weight", "bias"}:
        indices = [None]
    else:
        try:
            indices = sorted({int(key.split(".")[0]) for key in weights})
        except ValueError:
            raise StreamT1Error(f"{what}: unsupported reward head layout {sorted(weights)[:4]}") from None
    layers: list[nn.Module] = []
    for i, index in enumerate(indices):
        prefix = "" if index is None else f"{index}."
        weight, bias = weights.get(prefix + "weight"), weights.get(prefix + "bias")
        if weight is None or weight.ndim != 2:
            raise StreamT1Error(f"{what}: reward head layer {index} has no 2-D weight")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.float())
            if bias is not None:
                linear.bias.copy_(bias.float())
        layers.append(linear)
        if i < len(indices) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval().requires_grad_(False)


def load_tokenizer(base_dir: Path, tokenizer_dir: Path | None, special_tokens: list[str], what: str):
    """Tokenizer of the reward model: its own if shipped, else the base one with the reward tokens added
    (in the order the reward model added them, so their ids match the checkpoint's embedding rows)."""
    from transformers import AutoTokenizer

    source = tokenizer_dir if tokenizer_dir is not None and tokenizer_dir.is_dir() else base_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise StreamT1Error(f"{what}: cannot load the tokenizer from {source}: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from None
    vocab = tokenizer.get_vocab()
    new = [token for token in special_tokens if token not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)  # appended in order: ids = base vocabulary size + i
    if tokenizer.chat_template is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            path = base_dir / name
            if path.is_file():
                text = path.read_text(encoding="utf-8")
                tokenizer.chat_template = read_json(path, what)["chat_template"] if name.endswith(".json") else text
                break
    if tokenizer.chat_template is None:
        raise StreamT1Error(f"{what}: no chat template in {source} (expected the Qwen2-VL instruct tokenizer)")
    return tokenizer


@dataclass
class PromptLayout:
    """The tokenised prompt of one (text, grid) pair, kept on the device between calls."""

    input_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [3, L]: sequential, or M-RoPE
    reward_positions: torch.Tensor  # [K]


class Qwen2VLScorer(DeviceFollower):
    """A Qwen2-VL backbone plus reward head, reading the head's input at the reward tokens of the prompt.

    ``positions``: "sequential" (the official reward forwards) or "mrope" (Qwen2-VL's 3-D layout).
    ``head_in_float32``: HPSv3 keeps its head in float32; VideoAlign's runs in the model's dtype.
    ``resize_filter``: "pil" (HPSv3's PIL images) or "torchvision" (VideoAlign's uint8 video tensors).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, tokenizer, geometry: VisionGeometry,
                 reward_tokens: list[str], dtype: torch.dtype | None, what: str, positions: str = "sequential",
                 head_in_float32: bool = True, resize_filter: str = "torchvision"):
        if positions not in POSITIONS:
            raise StreamT1Error(f"{what}: positions must be one of {POSITIONS}, got {positions!r}")
        if resize_filter not in RESIZE_FILTERS:
            raise StreamT1Error(f"{what}: resize_filter must be one of {sorted(RESIZE_FILTERS)}, got {resize_filter!r}")
        self.resize_filter = resize_filter
        self.module, self.head, self.tokenizer, self.geometry = backbone, head, tokenizer, geometry
        self.dtype, self.what, self.positions, self.head_in_float32 = dtype, what, positions, head_in_float32
        config = backbone.config
        self.reward_ids = tokenizer.convert_tokens_to_ids(reward_tokens)
        if any(i is None or i >= config.text_config.vocab_size for i in self.reward_ids):
            raise StreamT1Error(f"{what}: reward tokens {reward_tokens} are outside the checkpoint vocabulary "
                                f"({config.text_config.vocab_size} rows); wrong tokenizer for this checkpoint?")
        self.pad_ids = {"image": config.image_token_id, "video": config.video_token_id}
        self.normalize = Normalizer(geometry.mean, geometry.std)
        self._layouts: dict = {}
        self._grids: dict = {}

    def on_moved(self, device, dtype):
        self.head.to(device=device, dtype=torch.float32 if self.head_in_float32 else dtype)
        self._layouts.clear()
        self._grids.clear()

    def layout(self, text: str, modality: str, grid: tuple[int, int, int], device) -> PromptLayout:
        """Render the chat for one image/video and ``text``; expand its placeholder to the grid's token count."""
        key = (text, modality, grid, device)
        if key in self._layouts:
            return self._layouts[key]
        m = self.geometry.merge_size
        merged = (grid[0], grid[1] // m, grid[2] // m)
        count = merged[0] * merged[1] * merged[2]
        pad_id = self.pad_ids[modality]
        pad = self.tokenizer.convert_ids_to_tokens(pad_id)
        messages = [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": text}]}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered.count(pad) != 1:
            raise StreamT1Error(f"{self.what}: the chat template must place exactly one {pad} for one {modality}")
        ids = self.tokenizer(rendered.replace(pad, pad * count), add_special_tokens=False)["input_ids"]
        start = ids.index(pad_id)
        if ids.count(pad_id) != count or ids[start:start + count] != [pad_id] * count:
            raise StreamT1Error(f"{self.what}: tokenizer does not keep {pad} as a single token")
        positions = []
        for token_id in self.reward_ids:
            if ids.count(token_id) != 1:
                raise StreamT1Error(f"{self.what}: the prompt template must contain reward token "
                                    f"{self.tokenizer.convert_ids_to_tokens(token_id)} exactly once")
            positions.append(ids.index(token_id))
        rope = sequential_positions(len(ids)) if self.positions == "sequential" else mrope_positions(
            len(ids), start, merged)
        layout = PromptLayout(torch.tensor(ids, device=device), rope.to(device), torch.tensor(positions, device=device))
        self._layouts[key] = layout
        return layout

    def _grid(self, grid: tuple[int, int, int], batch: int, device) -> torch.Tensor:
        key = (grid, batch, device)
        if key not in self._grids:
            self._grids[key] = torch.tensor([grid] * batch, device=device)
        return self._grids[key]

    @torch.no_grad()
    def reward_logits(self, clips: torch.Tensor, text: str, modality: str) -> torch.Tensor:
        """clips [B, T, 3, H, W] already resized to a multiple of ``factor`` (T a multiple of the temporal
        patch) -> head outputs at the reward tokens, float32 [B, K, head_out]."""
        dtype = self.follow(clips.device)
        b, t, _, height, width = clips.shape
        grid = (t // self.geometry.temporal_patch_size, height // self.geometry.patch_size,
                width // self.geometry.patch_size)
        layout = self.layout(text, modality, grid, clips.device)
        pixels = patchify(self.normalize(clips.flatten(0, 1).float()).reshape(clips.shape), self.geometry)
        pixel_key, grid_key = ("pixel_values", "image_grid_thw") if modality == "image" else (
            "pixel_values_videos", "video_grid_thw")
        length = layout.input_ids.shape[0]
        hidden = self.module(input_ids=layout.input_ids.expand(b, length),
                             position_ids=layout.position_ids[:, None, :].expand(3, b, length),
                             **{pixel_key: pixels.to(dtype), grid_key: self._grid(grid, b, clips.device)},
                             use_cache=False).last_hidden_state
        picked = hidden[:, layout.reward_positions]  # [B, K, D]
        return self.head(picked.to(next(self.head.parameters()).dtype)).float()

    def resize_clips(self, clips: torch.Tensor, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> torch.Tensor:
        """[B, T, 3, H, W] in [0, 1] -> the same at the Qwen2-VL size for this pixel budget, on uint8 levels:
        the frames become uint8 images as the official code makes them (``255 * frames`` truncated, which leaves
        frames already on the levels unchanged) and are resized as its pipeline does (``resize_filter``)."""
        b, t = clips.shape[:2]
        h, w = self.geometry.size_for(clips.shape[-2], clips.shape[-1], min_pixels, max_pixels)
        levels = clips.flatten(0, 1).float().clamp(0.0, 1.0).mul_(255.0).floor_()
        out = RESIZE_FILTERS[self.resize_filter](levels, h, w).div_(255.0)
        return out.reshape(b, t, 3, h, w)
