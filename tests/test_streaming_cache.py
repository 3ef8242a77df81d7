"""Streaming over the paged cache must equal one dense pass with the block-causal (+window, +sink) mask."""
import pytest
import torch

from helpers import BeamPages, RouteFlag, make_cache, text_context, tiny_model
from streamt1_engine.config import StreamConfig
from streamt1_engine.model.masks import block_causal_mask
from streamt1_engine.model.wan import ChunkAttention


def stream_chunks(model, cache, text, latents, timesteps, chunk_frames, other_beams=()):
    """Feed chunks one by one; each chunk's outputs come from one forward that also writes its page."""
    beam = BeamPages()
    outputs = []
    num_chunks = latents.shape[2] // chunk_frames
    for c in range(num_chunks):
        x = latents[:, :, c * chunk_frames:(c + 1) * chunk_frames]
        table, counts = cache.page_table([beam])
        write = cache.new_chunk_pages(1, c * chunk_frames)
        attn = ChunkAttention(cache.pool, table, counts, torch.tensor([c * chunk_frames]), write)
        outputs.append(model(x, torch.tensor([timesteps[c]]), text, attn))
        cache.commit(beam, int(write[0]), RouteFlag.DISCARD)
        cache.flush(0.999)
        cache.check_consistency([beam, *other_beams])
    return torch.cat(outputs, dim=2), beam


# local_attn_size counts the sink and the current chunk (upstream's meaning): (12, 3) is LongLive's layout
@pytest.mark.parametrize("local_attn_size,sink_size,num_chunks",
                         [(12, 3, 6), (15, 3, 4), (9, 3, 5), (9, 0, 5), (12, 6, 6)])
def test_streaming_equals_dense_block_causal(local_attn_size, sink_size, num_chunks):
    model = tiny_model()
    chunk = 3
    stream = StreamConfig.tiny(local_attn_size=local_attn_size, sink_size=sink_size,
                               max_sink_size=max(sink_size, 3))
    cache = make_cache(model, stream)
    text = text_context(model)
    g = torch.Generator().manual_seed(3)
    frames = num_chunks * chunk
    latents = torch.randn(1, 4, frames, stream.latent_height, stream.latent_width, generator=g)
    timesteps = [0.0] * (num_chunks - 1) + [600.0]
    with torch.no_grad():
        streamed, beam = stream_chunks(model, cache, text, latents, timesteps, chunk)
        tokens = (stream.latent_height // 2) * (stream.latent_width // 2)
        mask = block_causal_mask(frames, chunk, tokens, local_attn_size=local_attn_size, sink_size=sink_size)
        per_frame_t = torch.tensor(timesteps).repeat_interleave(chunk)[None]
        dense = model(latents, per_frame_t, text, ChunkAttention.dense(1, "cpu", mask))
    torch.testing.assert_close(streamed, dense, atol=2e-5, rtol=1e-4)
    # the rolling window and the sink hold exactly the expected pages
    assert len(beam.window) == min(stream.window_pages, num_chunks - stream.sink_pages)
    assert len(beam.sink) == min(stream.sink_pages, num_chunks)


def test_window_actually_hides_old_frames():
    """Guard against a vacuous equality: without the window, the last chunk's output changes."""
    model = tiny_model()
    stream = StreamConfig.tiny(local_attn_size=9, sink_size=3, max_sink_size=3)
    text = text_context(model)
    latents = torch.randn(1, 4, 15, stream.latent_height, stream.latent_width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        streamed, _ = stream_chunks(model, make_cache(model, stream), text, latents, [0.0] * 4 + [600.0], 3)
        tokens = (stream.latent_height // 2) * (stream.latent_width // 2)
        full = block_causal_mask(15, 3, tokens)
        dense_full = model(latents, torch.tensor([0.0] * 12 + [600.0] * 3)[None], text, ChunkAttention.dense(1, "cpu", full))
    assert (streamed[:, :, -3:] - dense_full[:, :, -3:]).abs().max() > 1e-3


def test_candidates_sharing_pages_match_batch_one():
    model = tiny_model(seed=2)
    stream = StreamConfig.tiny(local_attn_size=12, sink_size=3, max_sink_size=6)
    cache = make_cache(model, stream)
    text = text_context(model)
    g = torch.Generator().manual_seed(5)
    history = torch.randn(1, 4, 9, stream.latent_height, stream.latent_width, generator=g)
    with torch.no_grad():
        _, beam_a = stream_chunks(model, cache, text, history, [0.0] * 3, 3)
        _, beam_b = stream_chunks(model, cache, text, history[:, :, :6].flip(1), [0.0] * 2, 3, [beam_a])
        beams = [beam_a, beam_b, beam_a]  # candidates 0 and 2 share every page of beam a
        x = torch.randn(3, 4, 3, stream.latent_height, stream.latent_width, generator=g)
        t = torch.tensor([900.0, 500.0, 250.0])
        table, counts = cache.page_table(beams)
        batched = model(x, t, text, ChunkAttention(cache.pool, table, counts, torch.tensor([9, 6, 9])))
        for i, beam in enumerate(beams):
            tab, cnt = cache.page_table([beam])
            alone = model(x[i:i + 1], t[i:i + 1], text, ChunkAttention(cache.pool, tab, cnt, torch.tensor([[9, 6, 9][i]])))
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)
