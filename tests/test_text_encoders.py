import json
import os
import subprocess
import sys

import pytest
import torch

from streamt1_engine.components import TextEncoder
from streamt1_engine.errors import StreamT1Error
from streamt1_engine.text_encoders import (HashedTextEncoder, UMT5TextEncoder, build_text_encoder,
                                           register_text_encoder, wan_t5_to_transformers)

TEXT_LEN = 16
SENTENCES = ["a cat walks on the beach at sunset", "a red car drives through the city at night",
             "waves crash on dark rocks", "the small dog runs in a green field"] * 4


def tiny_tokenizer():
    """A tiny Unigram tokenizer trained offline, wrapped like umT5's (pad 0, eos 1 appended, unk 2)."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import T5Tokenizer

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(SENTENCES, vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                unk_token="<unk>", show_progress=False)
    backend = unigram._tokenizer
    backend.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5Tokenizer(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def tiny_umt5():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=300, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return UMT5EncoderModel(config).eval()


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("umt5")
    tiny_umt5().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def direct_states(model, tokenizer, prompts):
    tokens = tokenizer(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return states, tokens.attention_mask


def test_umt5_matches_transformers_and_zeroes_padding(umt5_dir):
    encoder = build_text_encoder({"type": "umt5", "path": str(umt5_dir), "text_len": TEXT_LEN})
    assert isinstance(encoder, TextEncoder) and encoder.text_dim == 32 and encoder.text_len == TEXT_LEN
    prompts = ["a cat walks", "the red car drives through the city at night on the beach at sunset again"]
    out = encoder.encode(prompts)
    assert out.shape == (2, TEXT_LEN, 32) and out.dtype == torch.float32

    states, mask = direct_states(encoder.model, encoder.tokenizer, prompts)
    lengths = mask.sum(1)
    assert lengths[0] < TEXT_LEN and lengths[1] == TEXT_LEN  # the long prompt is truncated
    torch.testing.assert_close(out[0, : lengths[0]], states[0, : lengths[0]])
    torch.testing.assert_close(out[1], states[1])
    assert torch.all(out[0, lengths[0]:] == 0)
    assert out[0, : lengths[0]].abs().sum(-1).min() > 0
    # The transformers model leaves non-zero states on padding; Wan's context has zeros there.
    assert states[0, lengths[0]:].abs().sum() > 0


def test_umt5_cache_and_dtype(umt5_dir):
    encoder = UMT5TextEncoder.from_pretrained(umt5_dir, text_len=TEXT_LEN, dtype=torch.bfloat16, cache_size=2)
    first = encoder.encode(["a dog runs"])
    assert first.dtype == torch.bfloat16
    encoder.model = None  # a cached prompt never reaches the model again
    again = encoder.encode(["  a   dog runs "])  # same prompt after Wan's whitespace cleaning
    assert torch.equal(first, again)
    again[0, 0] += 1  # the caller owns what it gets
    assert torch.equal(encoder.encode(["a dog runs"]), first)


def test_umt5_cache_evicts_oldest(umt5_dir):
    encoder = UMT5TextEncoder.from_pretrained(umt5_dir, text_len=TEXT_LEN, cache_size=2)
    encoder.encode(["one cat", "two cats", "three cats"])
    assert list(encoder._cache) == ["two cats", "three cats"]


def test_umt5_pipeline_and_wan_layouts(umt5_dir, tmp_path):
    model, tokenizer = tiny_umt5(), tiny_tokenizer()
    prompts = ["waves crash on rocks"]
    reference, _ = direct_states(model, tokenizer, prompts)

    pipeline = tmp_path / "pipeline"
    model.save_pretrained(pipeline / "text_encoder")
    tokenizer.save_pretrained(pipeline / "tokenizer")
    out = build_text_encoder({"type": "umt5", "text_len": TEXT_LEN}, base_dir=pipeline).encode(prompts)
    length = int((out[0].abs().sum(-1) > 0).sum())
    torch.testing.assert_close(out[0, :length], reference[0, :length])

    # Wan's own layout: umT5 weights under Wan's module names, tokenizer in google/umt5-xxl/.
    wan = tmp_path / "wan"
    tokenizer.save_pretrained(wan / "google" / "umt5-xxl")
    wan_state = _wan_named(model.state_dict())
    assert set(wan_t5_to_transformers(wan_state)) == set(model.state_dict())
    torch.save(wan_state, wan / "models_t5_umt5-xxl-enc-bf16.pth")
    (wan / "config.json").write_text("{}")  # the Wan repo's config.json describes the DiT, not umT5
    encoder = build_text_encoder({"type": "umt5", "path": "wan", "text_len": TEXT_LEN}, base_dir=tmp_path)
    assert encoder.model.shared.weight is encoder.model.encoder.embed_tokens.weight
    out = encoder.encode(prompts)
    torch.testing.assert_close(out[0, :length], reference[0, :length])
    from_file = UMT5TextEncoder.from_pretrained(wan / "models_t5_umt5-xxl-enc-bf16.pth", text_len=TEXT_LEN)
    torch.testing.assert_close(from_file.encode(prompts), out)


def _wan_named(state):
    """Wan's key names for a transformers UMT5 state dict, written out independently of the module's table."""
    names = {"layer.0.layer_norm": "norm1", "layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.k": "attn.k",
             "layer.0.SelfAttention.v": "attn.v", "layer.0.SelfAttention.o": "attn.o",
             "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
             "layer.1.layer_norm": "norm2", "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
             "layer.1.DenseReluDense.wi_1": "ffn.fc1", "layer.1.DenseReluDense.wo": "ffn.fc2"}
    out = {"token_embedding.weight": state["shared.weight"], "norm.weight": state["encoder.final_layer_norm.weight"]}
    for key, value in state.items():
        if key.startswith("encoder.block."):
            _, _, index, rest = key.split(".", 3)
            out[f"blocks.{index}.{names[rest.removesuffix('.weight')]}.weight"] = value
    return out


def test_umt5_missing_or_incomplete_dir(tmp_path):
    with pytest.raises(StreamT1Error, match="missing"):
        UMT5TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(StreamT1Error, match="no umT5 encoder"):
        UMT5TextEncoder.from_pretrained(tmp_path)
    tiny_umt5().save_pretrained(tmp_path)
    with pytest.raises(StreamT1Error, match="no tokenizer"):
        UMT5TextEncoder.from_pretrained(tmp_path)


def test_hashed_is_deterministic_and_zero_padded():
    encoder = build_text_encoder({"type": "hashed", "text_dim": 24, "text_len": 8})
    assert isinstance(encoder, TextEncoder)
    out = encoder.encode(["A cat, walking", "a CAT walking", "a dog walking"])
    assert out.shape == (3, 8, 24)
    assert torch.allclose(out[:, :4].norm(dim=-1)[0], torch.ones(4))  # a, cat, ",", walking
    assert torch.all(out[0, 4:] == 0) and torch.all(out[1, 3:] == 0)
    assert torch.equal(out[0, [0, 1, 3]], out[1, :3])  # case does not matter; words keep their vectors
    assert not torch.allclose(out[1], out[2])
    assert torch.equal(out[1, 0], out[2, 0]) and torch.equal(out[1, 2], out[2, 2])
    other_seed = HashedTextEncoder(24, 8, seed=1).encode(["a cat walking"])
    assert not torch.allclose(other_seed[0], out[1])
    long = encoder.encode([" ".join(["word"] * 20)])
    assert torch.all(long[0].norm(dim=-1) > 0.99)  # truncated to text_len, no padding left


def test_hashed_is_identical_across_processes():
    code = ("import json; from streamt1_engine.text_encoders import HashedTextEncoder; "
            "print(json.dumps(HashedTextEncoder(6, 4, seed=3).encode(['hello world'])[0, :2].tolist()))")
    env = dict(os.environ, PYTHONHASHSEED="12345")  # Python's own str hash would differ from this process
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(run.stdout) == HashedTextEncoder(6, 4, seed=3).encode(["hello world"])[0, :2].tolist()


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt_is_an_error(prompt, umt5_dir):
    with pytest.raises(StreamT1Error, match="prompt is empty"):
        HashedTextEncoder(8, 4).encode(["fine", prompt])
    with pytest.raises(StreamT1Error, match="prompt is empty"):
        UMT5TextEncoder.from_pretrained(umt5_dir, text_len=TEXT_LEN).encode([prompt])


def test_registry():
    with pytest.raises(StreamT1Error, match="unknown text encoder type"):
        build_text_encoder({"type": "nope"})
    with pytest.raises(StreamT1Error, match="text_dim"):
        build_text_encoder({"type": "hashed", "text_len": 4})
    register_text_encoder("test_fixed", lambda spec, base_dir, device, dtype: HashedTextEncoder(4, 2, seed=7))
    assert build_text_encoder({"type": "test_fixed"}).seed == 7
