"""What the rewards see. "cold" (the reference's): the chunk decoded alone, and the last W chunks decoded
together, each from a cold VAE state and truncated to uint8; "streamed": the streamed frames reused."""
import pytest
import torch

from helpers import text_context, tiny_model
from streamt1_engine.cache import PagedKVCache
from streamt1_engine.config import SamplerConfig, StreamConfig
from streamt1_engine.sampler import make_schedule
from streamt1_engine.search.beam_search import BeamSearch, EagerDenoiser
from streamt1_engine.search.config import SearchConfig
from streamt1_engine.vae import WanVAE, decode_cold_windows

Z_DIM = 4
STREAM = StreamConfig.tiny()
SCHEDULE = make_schedule(SamplerConfig())
W = 2  # long-term window, chunks


@pytest.fixture(scope="module")
def vae():
    """A random Wan VAE with the real one's 4x temporal factor: 3 latent frames decode to 9 (cold) or 12."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1,
                             temperal_downsample=[True, True],
                             latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.7, 2.0, 1.1])
    return WanVAE(model)


def reference_decode(vae, latents):
    """Clips [N, C, F, h, w] decoded from scratch in one call, as float [N, T, 3, H, W] in [0, 1] (test_vae
    checks this decode against diffusers' own)."""
    return vae.decode_chunk(latents, None)[0]


def assert_truncated(received, reference):
    """``received`` holds the uint8 truncation of ``reference`` (float rounding may move a rare value by one)."""
    levels = received * 255
    assert torch.equal(levels, levels.round()), "reward frames must come from uint8"
    truncated = (reference * 255).floor()
    assert (levels - truncated).abs().max() <= 1
    assert (levels == truncated).float().mean() > 0.995
    assert (levels == (reference * 255).round()).float().mean() < 0.9  # not rounded


class Recorder:
    def __init__(self, name):
        self.name, self.calls = name, []

    def __call__(self, frames, prompt):
        self.calls.append(frames.clone())
        return frames.mean(dim=(1, 2, 3, 4)) * (10 if self.name == "short" else -3)


def run(vae, reward_frames, num_chunks=W + 1):
    model = tiny_model(seed=0)
    text = text_context(model)
    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=W, reward_frames=reward_frames)
    cache = PagedKVCache(model.config, STREAM, PagedKVCache.pages_needed(STREAM, 2, 4), torch.device("cpu"),
                         torch.float32)
    x0s = []

    class Denoiser(EagerDenoiser):
        def denoise(self, noise, attn, text=None):
            x0s.append(super().denoise(noise, attn, text))
            return x0s[-1]

    short, long = Recorder("short"), Recorder("long")
    runner = BeamSearch(model=model, vae=vae, cache=cache, text=text, prompt="p", search=search, schedule=SCHEDULE,
                        num_chunks=num_chunks, seed=3, latent_shape=(Z_DIM, 3, STREAM.latent_height,
                                                                     STREAM.latent_width),
                        short_reward=short, long_reward=long, attention_backend="torch",
                        denoiser=Denoiser(model, SCHEDULE, text))
    parents = []  # the beams' last nodes before each step
    with torch.no_grad():
        for _ in range(num_chunks):
            parents.append([b.node for b in runner.beams])
            runner.step()
    return runner, x0s, parents, short.calls, long.calls


@pytest.fixture(scope="module")
def cold(vae):
    return run(vae, "cold")


def test_short_reward_sees_the_chunk_decoded_alone_and_truncated(vae, cold):
    runner, x0s, _, shorts, _ = cold
    for c, (x0, received) in enumerate(zip(x0s, shorts)):
        assert received.shape[:2] == (x0.shape[0], 9)  # 3 latent frames from a cold state: 9 frames
        assert_truncated(received, reference_decode(vae, x0))


def test_long_reward_sees_the_cold_decoded_window(vae, cold):
    runner, x0s, parents, _, longs = cold
    for c, (x0, received, record) in enumerate(zip(x0s, longs, runner.records)):
        assert received.shape[0] == x0.shape[0]
        windows, latents = [], []
        for n in range(x0.shape[0]):
            parent = parents[c][record.candidate_parents[n]] if c > 0 else None
            history = parent.lineage() if parent is not None else []
            windows.append(history[max(0, len(history) - (W - 1)):])
            latents.append(torch.cat([node.latents for node in windows[-1]] + [x0[n]], dim=1))
        expected = torch.cat([reference_decode(vae, x[None]) for x in latents])  # each window alone
        assert received.shape[1] == expected.shape[1] == (9 if c == 0 else 21)
        assert_truncated(received, expected)
        for n, window in enumerate(windows):
            streamed = torch.cat([node.frames for node in window]).float() / 255 if window else None
            if c < W:  # the window starts at frame 0: the streamed frames are its cold decode
                if streamed is not None:
                    assert torch.equal(received[n, :streamed.shape[0]], streamed.permute(0, 3, 1, 2))
            else:  # from chunk W on, the cold window is not the streamed frames (21 frames, not 24)
                assert streamed.shape[0] + 12 == 24
                assert not torch.equal(received[n, :9], streamed[-9:].permute(0, 3, 1, 2))


def test_output_is_the_streamed_decode_truncated(vae, cold):
    """The final pick sees each beam's whole video as decoded from frame 0, which is the streamed decode."""
    runner = cold[0]
    lineages = [beam.node.lineage() for beam in runner.beams]
    videos = torch.stack([torch.cat([n.frames for n in nodes]) for nodes in lineages]).float() / 255
    assert videos.shape[1] == 9 + 12 * (len(lineages[0]) - 1)
    latents = torch.stack([torch.cat([n.latents for n in nodes], dim=1) for nodes in lineages])
    assert_truncated(videos.permute(0, 1, 4, 2, 3), reference_decode(vae, latents))


def test_streamed_mode_reuses_the_streamed_frames(vae):
    runner, _, _, shorts, longs = run(vae, "streamed", num_chunks=3)
    assert [s.shape[1] for s in shorts] == [9, 12, 12]  # the streamed decode of each chunk
    assert [s.shape[1] for s in longs] == [9, 9 + 12, 12 + 12]  # the lineage's streamed frames, no re-decode
    last = runner.records[-1]
    for beam, i in zip(runner.beams, last.survivors):  # a survivor's output frames are what its rewards saw
        frames = beam.node.frames.float().permute(0, 3, 1, 2) / 255
        assert torch.equal(shorts[-1][i], frames) and torch.equal(longs[-1][i, 12:], frames)


def test_batched_window_decode_equals_each_window_alone(vae):
    torch.manual_seed(2)
    prefixes = torch.randn(2, Z_DIM, 3, 4, 6)
    latents = torch.randn(3, Z_DIM, 3, 4, 6)
    index = torch.tensor([1, 0, 1])
    frames = decode_cold_windows(vae, prefixes, latents, index)
    assert frames.shape == (3, 1 + 4 * 5, 3, 16, 24)
    for n in range(3):
        alone, _ = vae.decode_chunk(torch.cat([prefixes[index[n]], latents[n]], dim=1)[None], None)
        torch.testing.assert_close(frames[n], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(decode_cold_windows(vae, None, latents, index), vae.decode_chunk(latents, None)[0])
