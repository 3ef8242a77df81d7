"""Every attention backend gives the reference model output; the engine picks and checks backends."""
import pytest
import torch

from helpers import BeamPages, RouteFlag, make_cache, text_context, tiny_model
from streamt1_engine import StreamT1Engine, StreamT1Error
from streamt1_engine.config import StreamConfig
from streamt1_engine.engine import resolve_backend
from streamt1_engine.model.wan import ChunkAttention


def filled_cache(model, stream, chunks, gen):
    cache = make_cache(model, stream)
    text = text_context(model)
    beam = BeamPages()
    for c in range(chunks):
        table, counts = cache.page_table([beam])
        write = cache.new_chunk_pages(1, 3 * c)
        x = torch.randn(1, 4, 3, stream.latent_height, stream.latent_width, generator=gen)
        model(x, torch.zeros(1), text, ChunkAttention(cache.pool, table, counts, torch.tensor([3 * c]), write))
        cache.commit(beam, int(write[0]), RouteFlag.EMA if c % 2 else RouteFlag.APPEND)
        cache.flush(0.9)
    return cache, text, beam


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_model_forward_matches_torch_backend(backend):
    pytest.importorskip("triton") if backend == "triton" else None
    model = tiny_model(seed=4)
    stream = StreamConfig.tiny(local_attn_size=12, sink_size=3, max_sink_size=6, latent_height=4, latent_width=6)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cache, text, beam = filled_cache(model, stream, 6, gen)  # wrapped window, grown sink
        table, counts = cache.page_table([beam, BeamPages(), beam])
        x = torch.randn(3, 4, 3, 4, 6, generator=gen)
        t = torch.tensor([900.0, 600.0, 300.0])
        start = torch.tensor([18, 0, 18])
        ref = model(x, t, text, ChunkAttention(cache.pool, table, counts, start, backend="torch"))
        out = model(x, t, text, ChunkAttention(cache.pool, table, counts, start, backend=backend))
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_engine_with_triton_backend_matches_reference():
    pytest.importorskip("triton")
    ref = StreamT1Engine.from_pretrained("random-tiny", attention_backend="torch")
    tri = StreamT1Engine.from_pretrained("random-tiny", attention_backend="triton")
    a = ref.generate("a red circle", num_chunks=2, seed=3)
    b = tri.generate("a red circle", num_chunks=2, seed=3)
    assert (a.frames.int() - b.frames.int()).abs().max() <= 1


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("sdpa", cpu) == "sdpa"
    with pytest.raises(StreamT1Error, match="unknown attention backend"):
        resolve_backend("fast", cpu)
    with pytest.raises(StreamT1Error, match="flash-attn|CUDA"):
        resolve_backend("flash_attn", cpu)
