"""Rewards: contract and adapters, built-in heuristics, hybrid weighting, registry, and the model wrappers on tiny
random checkpoints built here in the real formats (CLIP, HPSv3, VideoAlign), checked against forwards written here
the way the official reward code runs them (sequential positions, uint8 pixels, official template files)."""
from __future__ import annotations

import inspect
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamt1_engine.errors import StreamT1Error
from streamt1_engine.rewards import (
    CallableReward,
    ClipTextAlignment,
    MotionSmoothness,
    SharpnessExposure,
    TemporalConsistency,
    WeightedSum,
    build_reward,
    default_long_reward,
    default_short_reward,
    hybrid_score,
    hybrid_weight,
    known_rewards,
    score,
)
from streamt1_engine.rewards import templates
from streamt1_engine.rewards.qwen2vl import VisionGeometry, mrope_positions, patchify

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------------------------- test videos

def textured(h: int = 32, w: int = 48, shift: float = 0.0) -> torch.Tensor:
    """A smooth, well-exposed colour pattern [3, H, W] in [0.15, 0.85], shifted right by ``shift`` pixels."""
    y = torch.arange(h).view(-1, 1).float()
    x = torch.arange(w).view(1, -1).float() - shift
    base = 0.5 + 0.35 * torch.sin(x / 3.0) * torch.cos(y / 4.0)
    return torch.stack([base, 0.5 + 0.3 * torch.cos(x / 5.0 + y / 6.0), 1.0 - base]).clamp(0, 1)


def moving(t: int = 8, speed: float = 1.0) -> torch.Tensor:
    return torch.stack([textured(shift=speed * i) for i in range(t)])


def jittery(t: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (moving(t) + 0.25 * torch.randn(t, 3, 32, 48, generator=g)).clamp(0, 1)


def flickering(t: int = 8) -> torch.Tensor:
    gains = torch.tensor([1.0 if i % 2 == 0 else 0.4 for i in range(t)]).view(t, 1, 1, 1)
    return moving(t, speed=0.0) * gains


def blurred(frames: torch.Tensor, k: int = 7) -> torch.Tensor:
    flat = frames.flatten(0, -4) if frames.ndim > 3 else frames[None]
    out = F.avg_pool2d(F.pad(flat, (k // 2,) * 4, mode="replicate"), k, stride=1)
    return out.reshape(frames.shape)


# ------------------------------------------------------------------------------------------ contract helpers

def test_hybrid_weight_formula_cap_and_zero_denominator():
    assert hybrid_weight(0, 21, 3) == 0.0
    assert hybrid_weight(3, 21, 3) == pytest.approx(3 / 18)
    assert hybrid_weight(6, 21, 3) == pytest.approx(6 / 18)
    assert hybrid_weight(9, 21, 3) == pytest.approx(0.4)  # 0.5 capped
    assert hybrid_weight(9, 21, 3, cap=1.0) == pytest.approx(0.5)
    assert hybrid_weight(0, 3, 3) == 0.0 and hybrid_weight(5, 2, 3) == 0.0
    assert hybrid_score(2.0, 10.0, 0.25) == pytest.approx(8.0)
    short, long = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(hybrid_score(short, long, 0.4), torch.tensor([0.4, 0.6]))


def test_callable_reward_video_and_image_kinds():
    frames = torch.rand(2, 3, 3, 8, 8)
    seen = {}

    def per_image(images, prompt):
        seen["shape"], seen["prompt"] = tuple(images.shape), prompt
        return images.mean(dim=(1, 2, 3))

    image = CallableReward(per_image, kind="image")
    assert image.name == "per_image" and image.kind == "image"
    out = image(frames, "hello")
    assert seen == {"shape": (6, 3, 8, 8), "prompt": "hello"}
    assert torch.allclose(out, frames.mean(dim=(2, 3, 4)).mean(dim=1))
    video = CallableReward(lambda f, p: f.mean(dim=(1, 2, 3, 4)), name="brightness")
    assert video.kind == "video" and torch.allclose(video(frames, ""), frames.mean(dim=(1, 2, 3, 4)))
    with pytest.raises(StreamT1Error, match="kind"):
        CallableReward(per_image, kind="audio")
    with pytest.raises(StreamT1Error, match="callable"):
        CallableReward(3)


def test_score_validates_shape_finiteness_and_input():
    frames = torch.rand(3, 2, 3, 4, 4)
    good = score(CallableReward(lambda f, p: f.sum(dim=(1, 2, 3, 4)).double(), name="ok"), frames, "p")
    assert good.dtype == torch.float32 and good.shape == (3,)
    with pytest.raises(StreamT1Error, match="'wrong_shape'.*shape \\[3\\]"):
        score(CallableReward(lambda f, p: torch.zeros(2), name="wrong_shape"), frames, "p")
    with pytest.raises(StreamT1Error, match="'not_a_tensor'"):
        score(CallableReward(lambda f, p: [0.0, 0.0, 0.0], name="not_a_tensor"), frames, "p")
    with pytest.raises(StreamT1Error, match="'nan'.*non-finite"):
        score(CallableReward(lambda f, p: torch.tensor([0.0, float("nan"), 1.0]), name="nan"), frames, "p")
    assert score(CallableReward(lambda f, p: torch.full((3,), float("inf")), name="inf"), frames, "p",
                 check_finite=False).isinf().all()
    with pytest.raises(StreamT1Error, match=r"'raw_fn'.*\[N, T, 3, H, W\]"):
        def raw_fn(f, p):
            return torch.zeros(1)
        score(raw_fn, torch.rand(1, 3, 4, 4), "p")


def test_weighted_sum_combines_and_reports_kind():
    frames = torch.stack([moving(), jittery()])
    tc, ms, se = TemporalConsistency(), MotionSmoothness(), SharpnessExposure()
    combo = WeightedSum([(tc, 0.5), (ms, 2.0)])
    assert torch.allclose(combo(frames, ""), 0.5 * tc(frames, "") + 2.0 * ms(frames, ""))
    assert combo.kind == "video" and "temporal_consistency" in combo.name
    assert WeightedSum([(se, 1.0)]).kind == "image"
    with pytest.raises(StreamT1Error):
        WeightedSum([])
    with pytest.raises(StreamT1Error, match="pairs"):
        WeightedSum([(tc, "heavy")])


# -------------------------------------------------------------------------------------------- built-in rewards

def test_motion_smoothness_prefers_smooth_motion_over_jitter():
    frames = torch.stack([moving(), jittery(), moving(speed=2.0)])
    scores = MotionSmoothness()(frames, "")
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[0] > scores[1] and scores[2] > scores[1]
    assert (scores <= 0).all() and (scores >= -1).all()
    assert torch.equal(MotionSmoothness()(frames[:, :2], ""), torch.zeros(3))  # too short to judge


def test_temporal_consistency_prefers_consistent_over_flickering():
    frames = torch.stack([moving(speed=0.5), flickering(), jittery()])
    scores = TemporalConsistency()(frames, "")
    assert scores[0] > scores[1] and scores[0] > scores[2]
    l2 = TemporalConsistency(norm="l2")(frames, "")
    assert l2[0] > l2[1] and (l2 <= 0).all()
    assert torch.equal(TemporalConsistency()(frames[:, :1], ""), torch.zeros(3))
    with pytest.raises(StreamT1Error, match="norm"):
        TemporalConsistency(norm="l3")


def test_sharpness_exposure_prefers_sharp_well_exposed_frames():
    sharp = moving()
    candidates = torch.stack([
        sharp,
        blurred(sharp),
        (sharp * 3.0).clamp(0, 1),          # over-exposed, clipped
        sharp * 0.08,                        # under-exposed
        0.5 + 0.05 * (sharp - 0.5),          # low contrast
    ])
    scores = SharpnessExposure()(candidates, "")
    assert scores.shape == (5,)
    assert (scores[0] > scores[1:]).all(), scores
    assert (scores >= 0).all() and (scores < 1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_builtin_rewards_keep_batch_device_and_return_float32(device, dtype):
    frames = torch.stack([moving(5), jittery(5), flickering(5), moving(5, 2.0)]).to(device, dtype)
    for reward in (TemporalConsistency(), MotionSmoothness(), SharpnessExposure(), default_short_reward(),
                   default_long_reward()):
        out = score(reward, frames, "a prompt")
        assert out.shape == (4,) and out.dtype == torch.float32 and out.device == frames.device


def test_temporal_rewards_downsample_large_frames():
    frames = torch.stack([moving(4), jittery(4)])
    big = F.interpolate(frames.flatten(0, 1), scale_factor=8, mode="nearest").reshape(2, 4, 3, 256, 384)
    small = TemporalConsistency(max_side=48)(big, "")
    assert small[0] > small[1]
    assert torch.allclose(small, TemporalConsistency(max_side=None)(big, ""), atol=2e-2)


# --------------------------------------------------------------------------------------------------- registry

def test_build_reward_names_dicts_lists_and_callables():
    assert {"temporal_consistency", "motion_smoothness", "sharpness_exposure", "clip", "hpsv3",
            "videoalign", "default_short", "default_long"} <= set(known_rewards())
    assert isinstance(build_reward("temporal_consistency"), TemporalConsistency)
    assert build_reward({"name": "motion_smoothness", "norm": "l2"}).norm == "l2"
    assert build_reward("default_short").name == "default_short"
    combo = build_reward(["sharpness_exposure", ("temporal_consistency", 2.0)])
    assert isinstance(combo, WeightedSum) and [w for _, w in combo.parts] == [1.0, 2.0]
    own = TemporalConsistency()
    assert build_reward(own) is own
    wrapped = build_reward(lambda f, p: f.mean(dim=(1, 2, 3, 4)))
    assert isinstance(wrapped, CallableReward) and wrapped.kind == "video"
    frames = torch.rand(2, 3, 3, 8, 8)
    assert default_short_reward()(frames, "").shape == (2,)


def test_register_reward_adds_names_but_keeps_built_ins():
    from streamt1_engine.rewards import register_reward
    from streamt1_engine.rewards.registry import BUILDERS

    class Brightness:
        kind = "video"

        def __init__(self, path=None, gain=1.0):
            self.name, self.path, self.gain = "brightness", path, gain

        def __call__(self, frames, prompt):
            return self.gain * frames.mean(dim=(1, 2, 3, 4))

    try:
        register_reward("Brightness_Test", Brightness, takes_path=True)
        built = build_reward({"name": "brightness_test", "path": "somewhere", "gain": 2.0})
        assert isinstance(built, Brightness) and built.path == "somewhere" and built.gain == 2.0
        assert "brightness_test" in known_rewards()
    finally:
        BUILDERS.pop("brightness_test", None)
    with pytest.raises(StreamT1Error, match="cannot register"):
        register_reward("temporal_consistency", Brightness)
    with pytest.raises(StreamT1Error, match="callable"):
        register_reward("not_callable", 3)


def test_build_reward_errors_name_the_problem():
    with pytest.raises(StreamT1Error, match=r"unknown reward type 'aesthetics' \(known: .*temporal_consistency"):
        build_reward("aesthetics")
    with pytest.raises(StreamT1Error, match="takes no path"):
        build_reward("motion_smoothness:/some/dir")
    with pytest.raises(StreamT1Error, match="bad options.*speed"):
        build_reward({"name": "temporal_consistency", "speed": 3})
    with pytest.raises(StreamT1Error, match="'name'"):
        build_reward({"path": "x"})
    with pytest.raises(StreamT1Error, match="weights not found"):
        build_reward("clip:/definitely/not/here")
    with pytest.raises(StreamT1Error):
        build_reward(42)


# ------------------------------------------------------------------------------- tiny tokenizers and configs

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
WORDS = ["a", "the", "of", "and", "to", "is", "on", "in", "with", "cat", "dog", "red", "ball", "rolling", "image", "video", "rating", "quality", "visual", "motion", "text", "prompt", "overall", "score", "user", "assistant"]


def tiny_tokenizer(extra_specials=(), chat_template=CHAT_TEMPLATE, eos=None):
    """Word-level tokenizer built offline, with Qwen2-VL's special tokens at fixed ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + list(extra_specials)
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token=eos, **kwargs)


def qwen_config(vocab_size: int):
    from transformers import Qwen2VLConfig

    ids = {name: SPECIALS.index(tok) for name, tok in [("image_token_id", "<|image_pad|>"),
                                                       ("video_token_id", "<|video_pad|>"),
                                                       ("vision_start_token_id", "<|vision_start|>"),
                                                       ("vision_end_token_id", "<|vision_end|>")]}
    return Qwen2VLConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None, "eos_token_id": None,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2,
                       "spatial_merge_size": 2, "temporal_patch_size": 2}, **ids)


MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def write_qwen_base(directory, min_pixels=16, max_pixels=16 * 16):
    """The base-repository files a reward needs: config, tokenizer with chat template, preprocessor config."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(directory)
    qwen_config(len(tokenizer)).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": min_pixels, "max_pixels": max_pixels,
        "patch_size": 2, "temporal_patch_size": 2, "merge_size": 2, "image_mean": MEAN, "image_std": STD}))
    return directory


def random_qwen(vocab_size: int, seed: int):
    """A tiny Qwen2VLModel whose weights are scaled up so different inputs give clearly different outputs."""
    from transformers import Qwen2VLModel

    torch.manual_seed(seed)
    model = Qwen2VLModel(qwen_config(vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def old_layout(model) -> dict:
    """``Qwen2VLModel`` weights under the transformers < 4.52 checkpoint names (``model.*``, ``visual.*``)."""
    out = {}
    for key, value in model.state_dict().items():
        out[key if key.startswith("visual.") else "model." + key[len("language_model."):]] = value.clone()
    return out


def image_processor():
    """transformers' own (PIL-backed) Qwen2-VL image preprocessing, the reference for our torch version."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:
        from transformers import Qwen2VLImageProcessor as cls
    return cls(patch_size=2, merge_size=2, temporal_patch_size=2, image_mean=MEAN, image_std=STD)


def token_types(model, ids, pad_id, modality):
    """Newer transformers derive the 3-D rope index from per-token modality ids; older ones from input_ids."""
    if "mm_token_type_ids" not in inspect.signature(model.get_rope_index).parameters:
        return {}
    return {"mm_token_type_ids": (ids == pad_id).int() * (1 if modality == "image" else 2)}


def reference_hidden(model, tokenizer, text, pixels, grid, modality, rope="official"):
    """Hidden states of one prompt. ``rope="official"``: as the HPSv3 / VideoAlign forwards run it: token
    embeddings with the vision tower's output scattered over the pad tokens, then the language model called with
    ``position_ids=None``. ``rope="mrope"``: transformers' own forward (token types and 3-D rope index)."""
    pad_id = model.config.image_token_id if modality == "image" else model.config.video_token_id
    pad = tokenizer.convert_ids_to_tokens(pad_id)
    count = int(np.prod(grid)) // 4
    messages = [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": text}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(rendered.replace(pad, pad * count), add_special_tokens=False)["input_ids"]])
    key = "image" if modality == "image" else "video"
    with torch.no_grad():
        if rope == "official":
            embeds = model.get_input_embeddings()(ids)
            vision = model.visual(pixels, grid_thw=torch.tensor([grid])).pooler_output
            embeds = embeds.masked_scatter((ids == pad_id)[..., None].expand_as(embeds), vision)
            out = model.language_model(inputs_embeds=embeds, position_ids=None).last_hidden_state
        else:
            out = model(input_ids=ids, **token_types(model, ids, pad_id, modality), **{
                ("pixel_values" if key == "image" else "pixel_values_videos"): pixels,
                f"{key}_grid_thw": torch.tensor([grid])}).last_hidden_state
    return ids[0], out[0]


def uint8_frames(*shape, seed=0):
    """Random frames already on the 256 uint8 levels (what the engine hands the rewards), as float in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255


# ----------------------------------------------------------------------------------------- Qwen2-VL plumbing

GEOMETRY = VisionGeometry(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=256,
                          mean=MEAN, std=STD)


def test_patchify_matches_transformers_image_processor():
    image = torch.rand(3, 8, 12)
    expected = image_processor()(images=[image.permute(1, 2, 0).numpy()], do_resize=False, do_rescale=False,
                         return_tensors="pt")
    normalized = (image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    ours = patchify(normalized[None, None].expand(1, 2, 3, 8, 12), GEOMETRY)
    assert expected["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert torch.allclose(ours, expected["pixel_values"].float(), atol=1e-5)


def test_patchify_puts_consecutive_frames_in_one_temporal_patch():
    clip = torch.rand(1, 4, 3, 4, 4)  # two temporal patches, one merge window of 2x2 patches
    pixels = patchify(clip, GEOMETRY).view(2, 4, 3, 2, 2, 2)  # [t, window pos, C, tp, p, p]
    for t in range(2):
        for frame in range(2):
            top_left = clip[0, 2 * t + frame, :, :2, :2]
            bottom_right = clip[0, 2 * t + frame, :, 2:, 2:]
            assert torch.equal(pixels[t, 0, :, frame], top_left)
            assert torch.equal(pixels[t, 3, :, frame], bottom_right)


def test_geometry_sizes_follow_the_pixel_budget():
    assert GEOMETRY.size_for(8, 12) == (8, 12)
    h, w = GEOMETRY.size_for(64, 96)  # too many pixels: shrink, keep aspect, multiples of 4
    assert h % 4 == 0 and w % 4 == 0 and h * w <= 256 and abs(w / h - 1.5) < 0.3
    h, w = GEOMETRY.size_for(2, 3)
    assert h * w >= 16 and h % 4 == 0 and w % 4 == 0
    real = VisionGeometry(14, 2, 2, 256 * 28 * 28, 256 * 28 * 28, MEAN, STD)
    assert real.size_for(480, 832) == (336, 588)


def test_mrope_positions_match_transformers_rope_index():
    model = random_qwen(40, seed=0)
    for grid, pad in [((1, 4, 6), 6), ((2, 4, 4), 7)]:
        merged = (grid[0], grid[1] // 2, grid[2] // 2)
        count = int(np.prod(merged))
        ids = torch.tensor([[2, 9, 4] + [pad] * count + [5, 10, 11, 3]])
        modality = "image" if pad == 6 else "video"
        expected, _ = model.get_rope_index(ids, **token_types(model, ids, pad, modality),
                                           **{f"{modality}_grid_thw": torch.tensor([grid])})
        assert torch.equal(mrope_positions(ids.shape[1], 3, merged), expected[:, 0])


# --------------------------------------------------------------------------------------------------- HPSv3

def make_hpsv3(tmp_path, seed=0):
    """Base files + an ``HPSv3.safetensors`` in the release layout: full Qwen2-VL state dict (old key names),
    ``lm_head`` and a ranknet MLP head (``rm_head.0`` / ``.3`` / ``.5``) giving (mu, sigma) at <|Reward|>."""
    from safetensors.torch import save_file

    base = write_qwen_base(tmp_path / "qwen-base")
    vocab = len(tiny_tokenizer()) + 1  # the reward token is added on top of the base vocabulary
    model = random_qwen(vocab, seed)
    torch.manual_seed(seed + 1)
    head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.05), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 2)).eval()
    state = old_layout(model)
    state["lm_head.weight"] = torch.randn(vocab, 32)
    state.update({f"rm_head.{k}": v.clone() for k, v in head.state_dict().items()})
    ckpt = tmp_path / "hpsv3"
    ckpt.mkdir()
    save_file(state, str(ckpt / "HPSv3.safetensors"))
    return base, ckpt, model, head


# Stand-ins for the official sources, in their file layout: the engine must read these texts from here.
FAKE_HPSV3_INSTRUCTION = "\nYou are rating the image {{ visual quality }} .\nText prompt - {text_prompt}\n\n"
FAKE_HPSV3_REWARD_LINE = "\nPlease provide the overall score of this image : <|Reward|>\n\nEND\n"
FAKE_VIDEOALIGN_PROMPT = ("\nrating the video . visual quality : <|VQ_reward|>\nEND\nmotion quality : <|MQ_reward|>\n"
                          "END\nText prompt - {text_prompt}\nalignment : <|TA_reward|>\nEND\n")


def fake_hpsv3_package(root):
    """An ``hpsv3`` package whose import fails (it must be parsed, never imported) with the collator module."""
    package = root / "hpsv3"
    (package / "dataset").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the hpsv3 package must not be imported')\n")
    (package / "dataset" / "data_collator_qwen.py").write_text(
        "import torch\n\n"
        f"INSTRUCTION = {FAKE_HPSV3_INSTRUCTION!r}\n"
        "INSTRUCTION_debug = '{text_prompt}'\n"
        f"prompt_with_special_token = {FAKE_HPSV3_REWARD_LINE!r}\n"
        "prompt_without_special_token = 'no token'\n"
        "COLLATORS = dict(a=1)\n")
    return package


def fake_videoalign_checkout(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompt_template.py").write_text(
        "DIMENSION_DESCRIPTIONS = {'VQ': ['visual quality', 'clearness']}\n"
        "SIMPLE_PROMPT = 'rate the {dimension_name} of {text_prompt}'\n"
        f"DETAILED_PROMPT_WITH_SPECIAL_TOKEN = {FAKE_VIDEOALIGN_PROMPT!r}\n"
        "def build_prompt(prompt, dimension, template_type):\n    raise RuntimeError('never run')\n")
    return root


class TokenizerSpy:
    """Delegates to a tokenizer and records the chat messages and the texts it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.messages, self.texts = tokenizer, [], []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def apply_chat_template(self, messages, **kwargs):
        self.messages.append(messages)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, **kwargs)


def test_hpsv3_matches_the_official_forward(tmp_path, monkeypatch):
    """Sequential positions, the official template, uint8 pixels rescaled by the image processor: the engine's
    score equals the HPSv3 forward (language model called with position_ids=None), per-frame mu averaged."""
    from streamt1_engine.rewards.models import HPSv3Reward

    base, ckpt, model, head = make_hpsv3(tmp_path)
    fake_hpsv3_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    reward = HPSv3Reward(str(ckpt), base=str(base), pixels=8 * 12)
    assert reward.kind == "image" and reward.template_origin.endswith("data_collator_qwen.py")
    frames = uint8_frames(2, 3, 3, 16, 24)  # resized to 8 x 12 for the 96-pixel budget
    scores = score(reward, frames, "a red ball")
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert not torch.allclose(scores[0], scores[1])

    from PIL import Image

    tokenizer = reward.scorer.tokenizer
    processor = image_processor()
    text = FAKE_HPSV3_INSTRUCTION.format(text_prompt="a red ball") + FAKE_HPSV3_REWARD_LINE  # as hpsv3 builds it
    per_frame = []
    for image in frames.flatten(0, 1):  # PNG frames opened with PIL and resized by hpsv3's fetch_image
        png = Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        uint8 = np.array(png.resize((12, 8), Image.BICUBIC))
        pixels = processor(images=[uint8], do_resize=False, return_tensors="pt")["pixel_values"]
        ids, hidden = reference_hidden(model, tokenizer, text, pixels, (1, 4, 6), "image")
        reward_pos = (ids == tokenizer.convert_tokens_to_ids("<|Reward|>")).nonzero()[0, 0]
        per_frame.append(head(hidden[reward_pos])[0])  # (mu, sigma) -> mu
    expected = torch.stack(per_frame).view(2, 3).mean(dim=1)
    assert torch.allclose(scores, expected, atol=1e-5), (scores, expected)


def test_reward_language_model_gets_sequential_positions_not_mrope(tmp_path):
    """What the language model receives is 0..L-1 on all three axes; Qwen2-VL's M-RoPE stays an option, matches
    transformers' own forward and scores differently on the proxy."""
    from streamt1_engine.rewards.models import HPSv3Reward

    base, ckpt, model, head = make_hpsv3(tmp_path)
    template = "rate this image , prompt : {prompt} . score <|Reward|>"
    reward = HPSv3Reward(str(ckpt), base=str(base), pixels=8 * 12, template=template)
    received = []
    reward.scorer.module.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["position_ids"].clone()), with_kwargs=True)
    frames = uint8_frames(1, 2, 3, 8, 12, seed=3)
    sequential = reward(frames, "a cat")
    length = received[0].shape[-1]
    assert received[0].shape == (3, 2, length) and length > 6 + 10  # 6 merged image tokens plus the text
    assert torch.equal(received[0], torch.arange(length).expand(3, 2, length))

    mrope = HPSv3Reward(str(ckpt), base=str(base), pixels=8 * 12, template=template, positions="mrope")
    mrope_scores = mrope(frames, "a cat")
    text = template.replace("{prompt}", "a cat")
    expected = []
    for image in frames[0]:
        pixels = patchify(((image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
                          [None, None].expand(1, 2, 3, 8, 12), GEOMETRY)
        ids, hidden = reference_hidden(model, reward.scorer.tokenizer, text, pixels, (1, 4, 6), "image", rope="mrope")
        expected.append(head(hidden[(ids == reward.scorer.tokenizer.convert_tokens_to_ids("<|Reward|>"))][0])[0])
    assert torch.allclose(mrope_scores, torch.stack(expected).mean(), atol=1e-5)
    assert (mrope_scores - sequential).abs().item() > 1e-3
    with pytest.raises(StreamT1Error, match="positions"):
        HPSv3Reward(str(ckpt), base=str(base), template=template, positions="3d")


def test_hpsv3_template_file_reaches_the_tokenizer_unchanged(tmp_path):
    from streamt1_engine.rewards.models import HPSv3Reward

    base, ckpt, _, _ = make_hpsv3(tmp_path)
    text = "\nJudge {{this}} image .\n  Text prompt - {text_prompt}\nscore : <|Reward|>\nEND\n"
    template_file = tmp_path / "hpsv3_template.txt"
    template_file.write_text(text)
    reward = HPSv3Reward(str(ckpt), base=str(base), pixels=96, template_source=str(template_file))
    spy = reward.scorer.tokenizer = TokenizerSpy(reward.scorer.tokenizer)
    reward(uint8_frames(1, 1, 3, 8, 12), "a dog and a ball")
    with_prompt = text.replace("{text_prompt}", "a dog and a ball")  # a file is used verbatim: braces stay
    assert spy.messages == [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": with_prompt}]}]]
    rendered = spy.tokenizer.apply_chat_template(spy.messages[0], tokenize=False, add_generation_prompt=True)
    assert spy.texts == [rendered.replace("<|image_pad|>", "<|image_pad|>" * 6)]
    assert with_prompt in spy.texts[0]


def test_hpsv3_reads_the_official_template_from_the_package_without_importing_it(tmp_path, monkeypatch):
    from streamt1_engine.rewards.models import HPSv3Reward

    base, ckpt, _, _ = make_hpsv3(tmp_path)
    package = fake_hpsv3_package(tmp_path / "site")
    expected = FAKE_HPSV3_INSTRUCTION.format(text_prompt="{prompt}") + FAKE_HPSV3_REWARD_LINE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an official source found: no fallback warning
        for source in (package, package.parent, package / "dataset" / "data_collator_qwen.py"):
            assert HPSv3Reward(str(ckpt), base=str(base), template_source=str(source)).template == expected
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        assert HPSv3Reward(str(ckpt), base=str(base)).template == expected
    assert "{ visual quality }" in expected and "{{" not in expected  # str.format escaping as the official code
    broken = tmp_path / "broken"
    (broken / "dataset").mkdir(parents=True)
    (broken / "dataset" / "data_collator_qwen.py").write_text("INSTRUCTION = make_text()\n")
    with pytest.raises(StreamT1Error, match="no string INSTRUCTION"):
        HPSv3Reward(str(ckpt), base=str(base), template_source=str(broken))
    with pytest.raises(StreamT1Error, match="does not exist"):
        HPSv3Reward(str(ckpt), base=str(base), template_source=str(tmp_path / "nowhere.txt"))


def test_fallback_templates_warn_once_that_scores_are_not_comparable(tmp_path, monkeypatch):
    from streamt1_engine.rewards.models import HPSV3_TEMPLATE, HPSv3Reward, VideoAlignReward

    monkeypatch.setattr(templates, "_warned", set())
    base, ckpt, _, _ = make_hpsv3(tmp_path)
    root, _, _ = make_videoalign(tmp_path / "va")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = HPSv3Reward(str(ckpt), base=str(base))
        HPSv3Reward(str(ckpt), base=str(base))
        VideoAlignReward(str(root), min_pixels=16)
        VideoAlignReward(str(root), min_pixels=16)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 2, messages
    assert messages[0].startswith("HPSv3") and messages[1].startswith("VideoAlign")
    assert all("NOT comparable" in m for m in messages)
    assert first.template == HPSV3_TEMPLATE and first.template_origin == "engine fallback"


def test_hpsv3_never_takes_the_checkpoint_folder_for_the_qwen_base(tmp_path, monkeypatch):
    """A hub repo's own config.json is not the Qwen2-VL base: like the official loader, HPSv3 loads the base named
    by its config (Qwen/Qwen2-VL-7B-Instruct) unless ``base`` says otherwise."""
    from streamt1_engine.rewards.models import HPSv3Reward

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, ckpt, _, _ = make_hpsv3(tmp_path)
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        (ckpt / name).write_text((base / name).read_text())  # even a complete-looking folder is not the base
    with pytest.raises(StreamT1Error, match="base files not found.*Qwen/Qwen2-VL-7B-Instruct"):
        HPSv3Reward(str(ckpt), template="{prompt} <|Reward|>")
    assert HPSv3Reward(str(ckpt), base=str(base), template="{prompt} <|Reward|>", pixels=96)(
        uint8_frames(1, 1, 3, 8, 12), "x").shape == (1,)


def test_hpsv3_resizes_batches_and_accepts_new_key_layout(tmp_path):
    from safetensors.torch import load_file, save_file

    from streamt1_engine.rewards.models import HPSv3Reward

    base, ckpt, _, _ = make_hpsv3(tmp_path)
    old = load_file(str(ckpt / "HPSv3.safetensors"))
    new = {("model.visual." + k[len("visual."):]) if k.startswith("visual.") else
           ("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v for k, v in old.items()}
    weights_file = tmp_path / "new_layout.safetensors"
    save_file(new, str(weights_file))
    frames = torch.rand(3, 2, 3, 20, 30)
    a = HPSv3Reward(str(ckpt), base=str(base), pixels=96, max_batch=2)
    b = HPSv3Reward(str(weights_file), base=str(base), pixels=96, max_batch=8)
    assert a.scorer.geometry.size_for(20, 30, 96, 96) == (8, 12)
    assert torch.allclose(a(frames, "a cat"), b(frames, "a cat"), atol=1e-5)
    assert a(frames, "a cat").shape == (3,)


def test_hpsv3_errors(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from streamt1_engine.rewards.models import HPSv3Reward

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StreamT1Error, match="HPSv3 weights not found"):
        HPSv3Reward(str(tmp_path / "missing"))
    with pytest.raises(StreamT1Error, match="HPSv3 weights not found"):
        HPSv3Reward("nobody-here/not-a-reward-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StreamT1Error, match="one weight file"):
        HPSv3Reward(str(empty), base=str(empty))
    base, ckpt, _, _ = make_hpsv3(tmp_path)
    with pytest.raises(StreamT1Error, match="template"):
        HPSv3Reward(str(ckpt), base=str(base), template="no reward token here {prompt}")
    state = {k: v for k, v in load_file(str(ckpt / "HPSv3.safetensors")).items() if not k.startswith("rm_head")}
    save_file(state, str(ckpt / "HPSv3.safetensors"))
    with pytest.raises(StreamT1Error, match="rm_head"):
        HPSv3Reward(str(ckpt), base=str(base))


# ---------------------------------------------------------------------------------------------- VideoAlign

VA_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
LORA_R, LORA_ALPHA = 4, 8
VA_STATS = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}


def make_videoalign(tmp_path, seed=0):
    """A release-layout folder: ``model_config.json`` + ``checkpoint-N/model.pth`` holding a PEFT-wrapped state
    dict (``base_model.model.`` prefix, ``base_layer`` + ``lora_A/B.default`` on the LLM linears, old key
    names) with a bias-free scalar ``rm_head``, and the reward tokenizer in ``checkpoint-N/tokenizer``."""
    base = write_qwen_base(tmp_path / "qwen2-vl-2b", max_pixels=12 * 16)
    vocab = len(tiny_tokenizer()) + 3
    model = random_qwen(vocab, seed)
    torch.manual_seed(seed + 7)
    merged = old_layout(model)
    peft = {}
    for key, value in merged.items():
        if key.startswith("model.layers.") and key.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")):
            module = key[: -len(".weight")]
            lora_a, lora_b = torch.randn(LORA_R, value.shape[1]) * 0.3, torch.randn(value.shape[0], LORA_R) * 0.3
            peft[f"base_model.model.{module}.base_layer.weight"] = value
            peft[f"base_model.model.{module}.lora_A.default.weight"] = lora_a
            peft[f"base_model.model.{module}.lora_B.default.weight"] = lora_b
            merged[key] = value + (LORA_ALPHA / LORA_R) * lora_b @ lora_a
        elif key.startswith("model.layers.") and key.endswith("q_proj.bias"):
            peft[f"base_model.model.{key[: -len('.bias')]}.base_layer.bias"] = value
        else:
            peft["base_model.model." + key] = value
    head = nn.Linear(32, 1, bias=False)
    peft["base_model.model.rm_head.weight"] = head.weight.detach().clone()
    peft["base_model.model.lm_head.weight"] = torch.randn(vocab, 32)
    root = tmp_path / "videoreward"
    (root / "checkpoint-7" / "tokenizer").mkdir(parents=True)
    (root / "checkpoint-3").mkdir()
    torch.save(peft, root / "checkpoint-7" / "model.pth")
    torch.save({"nothing": torch.zeros(1)}, root / "checkpoint-3" / "model.pth")  # older step, must be skipped
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(VA_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(root / "checkpoint-7" / "tokenizer")
    (root / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "max_frame_pixels": 12 * 16, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special"},
        "model_config": {"model_name_or_path": str(base), "output_dim": 1, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "use_rslora": False},
        "inference_config": VA_STATS}))
    reference = random_qwen(vocab, seed)
    with torch.no_grad():
        reference.load_state_dict({("language_model." + k[len("model."):]) if k.startswith("model.") else k: v
                                   for k, v in merged.items()})
    return root, reference, head


def test_videoalign_merges_lora_and_matches_the_official_forward(tmp_path):
    """LoRA merged with peft's alpha / r, the official template, sequential positions, frames sampled at 2 fps:
    the engine's VQ / MQ / TA equal the VideoAlign forward (language model called with position_ids=None)."""
    from streamt1_engine.rewards.models import VideoAlignReward

    root, reference, head = make_videoalign(tmp_path)
    checkout = fake_videoalign_checkout(tmp_path / "VideoAlign")
    reward = VideoAlignReward(str(root), normalize=False, source_fps=4.0, min_pixels=16, template_source=str(checkout),
                              mp4_round_trip=False)
    assert reward.kind == "video" and reward.sample_fps == 2.0 and reward.max_pixels == 192
    frames = uint8_frames(2, 8, 3, 12, 16)  # 2 s at 4 fps -> 4 frames sampled at 2 fps
    dims = reward.dimension_scores(frames, "a dog")
    assert dims.shape == (2, 3) and torch.isfinite(dims).all()

    tokenizer = reward.scorer.tokenizer
    text = FAKE_VIDEOALIGN_PROMPT.format(text_prompt="a dog")  # build_prompt of "detailed_special"
    index = torch.linspace(0, 7, 4).round().long()
    assert torch.equal(reward._frame_index(8, frames.device), index)
    expected = []
    for clip in frames:
        clip = clip[index]
        normalized = (clip - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        pixels = patchify(normalized[None], reward.scorer.geometry)
        ids, hidden = reference_hidden(reference, tokenizer, text, pixels, (2, 6, 8), "video")
        positions = torch.stack([(ids == tokenizer.convert_tokens_to_ids(t)).nonzero()[0, 0] for t in VA_TOKENS])
        expected.append(head(hidden[positions])[:, 0])
    expected = torch.stack(expected)
    assert torch.allclose(dims, expected, atol=1e-5), (dims, expected)
    assert torch.allclose(reward(frames, "a dog"), expected.sum(dim=1), atol=1e-5)  # "Overall" = VQ + MQ + TA


def test_videoalign_finds_the_official_template_in_its_checkout(tmp_path, monkeypatch):
    """Auto-found in a VideoAlign checkout around the checkpoint (VideoAlign/checkpoints/<release>, as its README
    sets it up, or <dir>/VideoAlign beside <dir>/models/<release>, as Stream-T1's); or given as a checkout, its
    prompt_template.py or a text file. The type comes from the checkpoint's data_config."""
    from streamt1_engine.rewards.models import VideoAlignReward

    expected = FAKE_VIDEOALIGN_PROMPT.format(text_prompt="{prompt}")
    readme_layout = fake_videoalign_checkout(tmp_path / "a" / "VideoAlign")
    root, _, _ = make_videoalign(readme_layout / "checkpoints")
    stream_t1_root, _, _ = make_videoalign(tmp_path / "b" / "metrics" / "models")
    fake_videoalign_checkout(tmp_path / "b" / "metrics" / "VideoAlign")
    text_file = tmp_path / "va.txt"
    text_file.write_text(FAKE_VIDEOALIGN_PROMPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for built in (VideoAlignReward(str(root), min_pixels=16), VideoAlignReward(str(stream_t1_root), min_pixels=16),
                      VideoAlignReward(str(root), min_pixels=16, template_source=str(readme_layout)),
                      VideoAlignReward(str(root), min_pixels=16,
                                       template_source=str(readme_layout / "prompt_template.py")),
                      VideoAlignReward(str(root), min_pixels=16, template_source=str(text_file))):
            assert built.template == expected
    assert VideoAlignReward(str(root), min_pixels=16).template_origin == str(readme_layout / "prompt_template.py")
    settings = json.loads((root / "model_config.json").read_text())
    settings["data_config"]["prompt_template_type"] = "simple"
    (root / "model_config.json").write_text(json.dumps(settings))
    with pytest.raises(StreamT1Error, match="'simple' has no reward tokens"):
        VideoAlignReward(str(root), min_pixels=16)


def test_videoalign_scores_the_mp4_upstream_writes(tmp_path):
    """By default the clip goes through an in-memory H.264 MP4 written as Stream-T1 writes its reward videos
    (torchvision.io.write_video at 16 fps on PyAV 13: 255 * frames truncated, libx264, yuv420p, 1024 kbit/s)."""
    import io

    import av

    from streamt1_engine.rewards.models import VideoAlignReward, mp4_round_trip, reward_mp4

    t = torch.linspace(0, 1, 12).view(12, 1, 1, 1)
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    smooth = torch.stack([0.2 + 0.6 * x + 0 * t[..., 0], 0.3 + 0.4 * y + 0.1 * t[..., 0],
                          0.5 + 0 * x + 0.3 * t[..., 0]], dim=1).clamp(0, 1)  # [12, 3, 32, 48], slow colours
    with av.open(io.BytesIO(reward_mp4(smooth, 16.0))) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 16 and stream.frames in (0, 12)
    back = mp4_round_trip(smooth, 16.0)
    assert back.dtype == torch.uint8 and back.shape == (12, 3, 32, 48)
    assert (back.float() - smooth * 255).abs().mean() < 3.0  # lossy, but the same video
    # 255 * frames truncated, as torch.as_tensor(255 * video, dtype=torch.uint8) in write_video
    levels = (smooth * 255).floor()
    assert reward_mp4((levels + 0.7) / 255, 16.0) == reward_mp4(levels / 255, 16.0)
    assert reward_mp4((levels + 0.7) / 255, 16.0) != reward_mp4((levels + 1).clamp(max=255) / 255, 16.0)
    with pytest.raises(StreamT1Error, match="even"):
        mp4_round_trip(torch.rand(2, 3, 15, 16), 16.0)

    root, _, _ = make_videoalign(tmp_path)
    frames = uint8_frames(2, 8, 3, 12, 16, seed=5)
    template = "{prompt} " + " ".join(VA_TOKENS)
    through_mp4 = VideoAlignReward(str(root), min_pixels=16, normalize=False, template=template)
    direct = VideoAlignReward(str(root), min_pixels=16, normalize=False, template=template, mp4_round_trip=False)
    assert through_mp4.mp4_round_trip and not direct.mp4_round_trip
    decoded = torch.stack([mp4_round_trip(clip, 16.0) for clip in frames]).float() / 255
    assert torch.allclose(through_mp4(frames, "a cat"), direct(decoded, "a cat"), atol=1e-5)
    assert not torch.allclose(through_mp4(frames, "a cat"), direct(frames, "a cat"), atol=1e-4)


@pytest.mark.parametrize("size", [(30, 46), (7, 9)])  # shrink and enlarge
def test_pixels_are_resized_on_uint8_as_the_official_readers_do(size):
    """VideoAlign's reader resizes uint8 frames with torchvision (float bicubic antialias, clamp, round back to
    uint8); HPSv3's resizes the PNG frames as PIL images. The engine's resized pixels are exactly those."""
    from PIL import Image

    from streamt1_engine.rewards.qwen2vl import Qwen2VLScorer

    frames = uint8_frames(1, 2, 3, *size, seed=9)
    h, w = GEOMETRY.size_for(*size, 96, 96)
    assert (h, w) != size
    resized = {}
    for name in ("torchvision", "pil"):
        scorer = Qwen2VLScorer.__new__(Qwen2VLScorer)
        scorer.geometry, scorer.resize_filter = GEOMETRY, name
        resized[name] = scorer.resize_clips(frames, 96, 96)[0] * 255
        assert resized[name].shape == (2, 3, h, w)
    torchvision_way = F.interpolate((frames[0] * 255).round(), size=(h, w), mode="bicubic", align_corners=False,
                                    antialias=True).clamp(0, 255).round()
    assert torch.allclose(resized["torchvision"], torchvision_way, atol=1e-3)
    unrounded = F.interpolate(frames[0], size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(resized["torchvision"], unrounded.clamp(0, 1) * 255, atol=1e-2)
    for frame, ours in zip(frames[0], resized["pil"]):
        image = Image.fromarray((frame * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        pil = torch.from_numpy(np.array(image.resize((w, h), Image.BICUBIC))).permute(2, 0, 1).float()
        assert torch.allclose(ours, pil, atol=1e-3)  # bit for bit
    # frames off the uint8 levels become uint8 images as the official code casts them: 255 * frames truncated
    between = scorer.resize_clips(frames + 0.7 / 255, 96, 96)[0] * 255
    assert torch.allclose(between, resized["pil"], atol=1e-3)


def test_backbone_is_built_on_meta_and_takes_the_checkpoint_tensors(tmp_path, monkeypatch):
    """No second copy of the weights: the model's parameters are created without storage and become the
    checkpoint's own tensors (assign=True); the rotary buffers, not in any checkpoint, are real and correct."""
    from transformers import Qwen2VLModel

    from streamt1_engine.rewards.qwen2vl import backbone_state, build_backbone

    reference = random_qwen(41, seed=2)
    state = {k: v.clone() for k, v in old_layout(reference).items()}
    state["rm_head.weight"] = torch.zeros(1, 32)
    weights, _ = backbone_state(state, "test")
    built_on = []
    original_init = Qwen2VLModel.__init__

    def spy_init(self, config):
        original_init(self, config)
        built_on.extend({p.device.type for p in self.parameters()})

    monkeypatch.setattr(Qwen2VLModel, "__init__", spy_init)
    model = build_backbone(qwen_config(41), weights, "test")
    assert built_on == ["meta"]
    params = dict(model.named_parameters())
    assert set(params) == set(weights)
    assert all(params[k].data_ptr() == weights[k].data_ptr() for k in weights)  # assigned, not copied
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    ids = torch.tensor([[9, 10, 11, 12, 13]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state)
    with pytest.raises(StreamT1Error, match="missing"):
        build_backbone(qwen_config(41), {k: v for k, v in weights.items() if "norm" not in k}, "test")


def test_videoalign_normalisation_dims_and_short_clips(tmp_path):
    from streamt1_engine.rewards.models import VideoAlignReward

    root, _, _ = make_videoalign(tmp_path)
    frames = torch.rand(3, 5, 3, 12, 16)
    raw = VideoAlignReward(str(root), normalize=False, min_pixels=16).dimension_scores(frames, "a cat")
    mean = torch.tensor([VA_STATS[f"{d}_mean"] for d in ("VQ", "MQ", "TA")])
    std = torch.tensor([VA_STATS[f"{d}_std"] for d in ("VQ", "MQ", "TA")])
    normed = VideoAlignReward(str(root), min_pixels=16)
    assert torch.allclose(normed.dimension_scores(frames, "a cat"), (raw - mean) / std, atol=1e-5)
    assert torch.allclose(normed(frames, "a cat"), ((raw - mean) / std).sum(dim=1), atol=1e-5)
    motion = VideoAlignReward(str(root), dims=("MQ",), normalize={**VA_STATS, "MQ_std": 1.0}, min_pixels=16)
    assert torch.allclose(motion(frames, "a cat"), raw[:, 1] + 1.0, atol=1e-5)
    one_frame = VideoAlignReward(str(root), min_pixels=16, max_batch=1)(frames[:, :1], "a cat")
    assert one_frame.shape == (3,) and torch.isfinite(one_frame).all()


def test_videoalign_errors(tmp_path, monkeypatch):
    from streamt1_engine.rewards.models import VideoAlignReward

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StreamT1Error, match="VideoAlign weights not found"):
        VideoAlignReward(str(tmp_path / "missing"))
    root, _, _ = make_videoalign(tmp_path)
    direct = VideoAlignReward(str(root / "checkpoint-7" / "model.pth"), normalize=False, min_pixels=16)
    assert direct.scorer.tokenizer.convert_tokens_to_ids("<|TA_reward|>") == len(tiny_tokenizer()) + 2
    with pytest.raises(StreamT1Error, match="dims"):
        VideoAlignReward(str(root), dims=("VQ", "fun"))
    with pytest.raises(StreamT1Error, match="base files not found"):
        VideoAlignReward(str(root), base=str(tmp_path / "no-base"))
    settings = json.loads((root / "model_config.json").read_text())
    del settings["inference_config"]
    (root / "model_config.json").write_text(json.dumps(settings))
    with pytest.raises(StreamT1Error, match="inference_config"):
        VideoAlignReward(str(root))
    del settings["peft_lora_config"]
    (root / "model_config.json").write_text(json.dumps(settings))
    with pytest.raises(StreamT1Error, match="LoRA"):
        VideoAlignReward(str(root), normalize=False)


# ---------------------------------------------------------------------------------------------------- CLIP

def make_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    directory = tmp_path / "clip"
    tokenizer = tiny_tokenizer(chat_template=None, eos="<|endoftext|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8}, projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 16},
        "crop_size": {"height": 16, "width": 16}, "image_mean": MEAN, "image_std": STD}))
    return directory, model, tokenizer


def test_clip_alignment_matches_manual_cosine_and_caches_text(tmp_path):
    directory, model, tokenizer = make_clip(tmp_path)
    reward = build_reward(f"clip:{directory}")
    assert isinstance(reward, ClipTextAlignment) and reward.kind == "image"
    frames = torch.rand(3, 2, 3, 16, 16)
    scores = score(reward, frames, "a red ball")
    assert scores.shape == (3,) and (scores.abs() <= 1).all()
    assert list(reward._text_cache) == ["a red ball"]

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = tokenizer(["a red ball"], return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image = model.get_image_features(pixel_values=(frames.flatten(0, 1) - mean) / std)
    text = getattr(text, "pooler_output", text)
    image = getattr(image, "pooler_output", image)
    expected = F.cosine_similarity(image, text, dim=-1).view(3, 2).mean(dim=1)
    assert torch.allclose(scores, expected, atol=1e-5)

    wide = score(reward, torch.rand(2, 1, 3, 24, 40), "a cat")  # resized (shortest edge) and centre-cropped
    assert wide.shape == (2,) and torch.isfinite(wide).all()


def test_clip_missing_or_broken_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StreamT1Error, match="CLIP weights not found"):
        ClipTextAlignment(str(tmp_path / "nothing"))
    with pytest.raises(StreamT1Error, match="CLIP weights not found"):
        ClipTextAlignment("nobody-here/no-clip")
    directory, _, _ = make_clip(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(StreamT1Error, match="cannot load CLIP"):
        ClipTextAlignment(str(directory))


def test_model_rewards_build_from_specs(tmp_path):
    base, ckpt, _, _ = make_hpsv3(tmp_path)
    hps = build_reward({"name": "hpsv3", "path": str(ckpt), "base": str(base), "pixels": 96})
    assert hps.name == f"hpsv3:{ckpt}" and hps(torch.rand(1, 2, 3, 8, 12), "a dog").shape == (1,)
    root, _, _ = make_videoalign(tmp_path / "va")
    va = build_reward({"name": "videoalign", "path": str(root), "normalize": False, "min_pixels": 16})
    assert va.kind == "video" and va(torch.rand(2, 4, 3, 12, 16), "a dog").shape == (2,)
    assert math.isfinite(float(hybrid_score(hps(torch.rand(1, 2, 3, 8, 12), "x")[0], va(torch.rand(1, 4, 3, 12, 16),
                                                                                         "x")[0], 0.3)))


def test_videoalign_frame_sampling_follows_its_reader():
    """smart_nframes of VideoAlign's vision_process at Stream-T1's 16 fps and the release's 2 fps: an even count,
    at least 4, capped by the clip and at 768; num_frames instead when the checkpoint sets it; multi_pts: 6
    frames of an 8 fps resampling around 4 evenly spaced points."""
    from streamt1_engine.rewards.models import videoalign_frame_indices

    def spread(total, count):
        return [round(i * (total - 1) / (count - 1)) for i in range(count)]

    assert videoalign_frame_indices(117, 16.0, 2.0) == spread(117, 14)  # 14.6 frames -> 14
    assert videoalign_frame_indices(9, 16.0, 2.0) == spread(9, 4)  # 1.1 frames -> at least 4
    assert videoalign_frame_indices(40, 16.0, 2.0) == spread(40, 4)  # 5 frames: round(5 / 2) * 2, half to even
    assert videoalign_frame_indices(3, 16.0, 2.0) == [0, 2]  # capped by the clip, even
    assert videoalign_frame_indices(1, 16.0, 2.0) == [0, 0]  # repeated (upstream rejects a 1-frame clip)
    assert len(videoalign_frame_indices(20000, 16.0, 2.0)) == 768
    assert videoalign_frame_indices(117, 16.0, 2.0, num_frames=9) == spread(117, 8)  # round(9 / 2) * 2 = 8
    resampled = spread(117, 58)  # int(117 * 8 // 16) = 58 frames at 8 fps
    points = [3, 20, 37, 54]  # linspace(3, 54, 4)
    assert videoalign_frame_indices(117, 16.0, 2.0, sample_type="multi_pts") == [
        i for p in points for i in resampled[p - 3:p + 3]]
    with pytest.raises(StreamT1Error, match="sample_type"):
        videoalign_frame_indices(117, 16.0, 2.0, sample_type="random")
