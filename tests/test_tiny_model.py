"""The embedded tiny model: shipped weights load, generate recognisable videos, and the quality benchmark runs."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from streamt1_engine.errors import StreamT1Error
from streamt1_engine.tiny import ASSET_DIR, build_tiny_model, load_tiny_model, sample_video, video_metrics
from streamt1_engine.tiny.rewards import ProceduralVideoReward
from streamt1_engine.tiny.text_encoder import TinyTextEncoder, load_tiny_text_encoder

PROMPTS = ["a red circle moving left on a blue background", "a yellow square moving down on a black background",
           "a green triangle moving right on a white background", "a white circle moving up on a gray background"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    return load_tiny_model()


def _quality(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Procedural video reward per video (background, colour, shape, crispness, persistence, smoothness)."""
    reward = ProceduralVideoReward()
    return torch.cat([reward(frames[i:i + 1], p) for i, p in enumerate(prompts)])


def test_shipped_files_are_small_and_in_engine_format():
    config = json.loads((ASSET_DIR / "streamt1.json").read_text())
    assert config["format"] == "streamt1-engine" and config["text_encoder"]["type"] == "tiny"
    assert config["vae"] == {"type": "space_to_depth", "factor": 4}
    total = sum(f.stat().st_size for f in ASSET_DIR.iterdir())
    assert total < 12 * 2 ** 20


def test_trained_model_beats_random_weights(shipped):
    trained = sample_video(shipped, PROMPTS, num_chunks=2, seed=0)
    assert trained.shape == (len(PROMPTS), 6, 3, 32, 32)
    random_model = build_tiny_model(shipped.dit.config, seed=0)
    random_model.dit.eval()
    untrained = sample_video(random_model, PROMPTS, num_chunks=2, seed=0)
    good, bad = _quality(trained, PROMPTS), _quality(untrained, PROMPTS)
    assert good.mean() > 0.5 and bad.mean() < 0.2, (good, bad)
    assert (good > bad + 0.2).all(), (good, bad)
    backgrounds = torch.stack([video_metrics(trained[i:i + 1], p)["background"][0] for i, p in enumerate(PROMPTS)])
    assert (backgrounds > 0.8).all(), backgrounds


def test_engine_generates_the_prompted_scene():
    import streamt1_engine.engine as engine_mod
    from streamt1_engine.model.wan import CausalWanDiT

    engine = engine_mod.StreamT1Engine.from_pretrained("tiny", device="cpu")
    assert engine.name == "tiny"
    torch.manual_seed(0)
    random_engine = engine_mod.StreamT1Engine(CausalWanDiT(engine.config.model), engine.text_encoder, engine.vae,
                                              engine.config, device="cpu")
    scores = {}
    for name, eng in (("trained", engine), ("random", random_engine)):
        videos = []
        for prompt in PROMPTS[:2]:
            result = eng.generate(prompt, num_chunks=2, seed=0)
            assert result.frames.shape == (6, 32, 32, 3) and result.frames.dtype == torch.uint8
            videos.append(result.frames.permute(0, 3, 1, 2).float() / 255.0)
        scores[name] = _quality(torch.stack(videos), PROMPTS[:2])
    assert scores["trained"].mean() > 0.5 and scores["random"].mean() < 0.2, scores


def test_text_encoder_pads_and_maps_unknown_words(shipped):
    enc = shipped.text_encoder
    out = enc.encode(["a red circle", "a zebra doing a backflip on a red background"])
    assert out.shape == (2, enc.text_len, enc.text_dim)
    assert out[0, 3:].abs().sum() == 0 and out[0, :3].abs().sum() > 0
    ids, _ = enc.token_ids(["a zebra"])
    assert ids[0, 1].item() == 1  # the unknown token
    long_prompt = " ".join(["red"] * 40)
    assert enc.encode([long_prompt]).shape == (1, enc.text_len, enc.text_dim)


def test_text_encoder_registry_and_bad_config(tmp_path):
    import streamt1_engine.text_encoders as registry
    import streamt1_engine.tiny  # noqa: F401  (registers the "tiny" type)

    config = json.loads((ASSET_DIR / "streamt1.json").read_text())
    built = registry.build_text_encoder(config["text_encoder"], ASSET_DIR, "cpu", torch.float32)
    assert isinstance(built, TinyTextEncoder)
    with pytest.raises(StreamT1Error, match="weights not found"):
        load_tiny_text_encoder({"type": "tiny", "weights": "missing.safetensors"}, tmp_path)


def test_loader_reports_missing_files(tmp_path):
    with pytest.raises(StreamT1Error, match="no streamt1.json"):
        load_tiny_model(tmp_path)


def test_trainer_writes_a_loadable_model_dir(tmp_path):
    from streamt1_engine.tiny.train import train

    info = train(tmp_path / "a", steps=2, batch=2, threads=1, val_size=2, log_every=1)
    assert info["steps"] == 2 and info["stopped_by"] == "steps" and info["init"] is None
    model = load_tiny_model(tmp_path / "a")
    assert model.dit.config == load_tiny_model().dit.config
    # a second stage starts from the first one's weights and keeps the first stage's record before its own
    second = train(tmp_path / "b", steps=1, batch=2, threads=1, val_size=2, log_every=1, init=tmp_path / "a")
    assert second["init"] == str(tmp_path / "a")
    stages = json.loads((tmp_path / "b" / "streamt1.json").read_text())["training"]["stages"]
    assert stages[0] == json.loads((tmp_path / "a" / "streamt1.json").read_text())["training"]
    assert stages[1]["steps"] == 1 and stages[1]["init"] == "stage 1"
    third = train(tmp_path / "c", steps=1, batch=2, threads=1, val_size=2, log_every=1, init=tmp_path / "b")
    stages = json.loads((tmp_path / "c" / "streamt1.json").read_text())["training"]["stages"]
    assert [s.get("init") for s in stages] == [None, "stage 1", "stage 2"] and third["init"] == str(tmp_path / "b")
    # continued in place, with a checkpoint after every step: the record still gains one stage
    train(tmp_path / "a", steps=2, batch=2, threads=1, val_size=2, log_every=1, init=tmp_path / "a", save_minutes=0)
    stages = json.loads((tmp_path / "a" / "streamt1.json").read_text())["training"]["stages"]
    assert [s["steps"] for s in stages] == [2, 2] and stages[1]["init"] == "stage 1"


def test_quality_benchmark_quick_mode(capsys):
    """The v1 bench (the one the README's first table came from) stays reachable through bench_quality.py."""
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--v1", "--quick"])
    assert set(rows) == {"none", "stream_t1"}
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows.values())
    assert "| stream_t1 |" in capsys.readouterr().out
