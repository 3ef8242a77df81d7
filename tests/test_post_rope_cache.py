"""The post-RoPE cache against the layout it replaced (pre-RoPE keys, rotated at attention time).

The old path is kept here as the reference: ``pre_rope_path`` swaps in a self-attention that writes pre-RoPE
keys and attends through ``paged_attention_rope_naive`` (rotating every cached key at its page's frames)
and a sink merge that blends pre-RoPE keys as they are. Because RoPE is linear and a page's positions never
change, both must give the same model outputs, the same cache (up to the rotation) and the same video.
"""
from contextlib import contextmanager

import pytest
import torch

from helpers import BeamPages, RouteFlag, brightness, make_cache, smoothness, text_context, tiny_model
from streamt1_engine import SearchConfig, StreamT1Engine
from streamt1_engine.cache import PagedKVCache, paged_cache
from streamt1_engine.config import StreamConfig
from streamt1_engine.kernels.paged_attention.naive_rope import paged_attention_rope_naive, rotated_page_keys
from streamt1_engine.kernels.qk_norm_rope import qk_norm_rope
from streamt1_engine.kernels.sink_merge import EMA
from streamt1_engine.model import wan

ALPHA = 0.7


def _blend_pre_rope(k_pool, v_pool, page_frame_pos, ops, alpha, frame_cos, frame_sin, *, backend="torch"):
    """The old merge: pre-RoPE keys blend as they are (the blend is rotated at the sink's frames when read)."""
    for mode, evicted, sink, dst, _ in ops.tolist():
        if mode == EMA:
            for pool in (k_pool, v_pool):
                pool[:, dst] = (alpha * pool[:, sink].float() + (1 - alpha) * pool[:, evicted].float()).to(pool.dtype)
            page_frame_pos[dst] = page_frame_pos[sink]


@contextmanager
def pre_rope_path(model, grid_h: int, grid_w: int):
    """Run ``model`` (and the cache's merges) the old way while the block is active."""
    rope = model.rope
    spatial_cos, spatial_sin = rope.spatial_tables(grid_h, grid_w)

    def forward(self, x, chunk_rope, attn, layer):
        q_rot, k_pre, k_rot = qk_norm_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight, self.eps,
                                           self.num_heads, chunk_rope.cos, chunk_rope.sin)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        pool = attn.pool
        if attn.write_pages is not None:
            pool.k[layer].index_copy_(0, attn.write_pages, k_pre.to(pool.k.dtype))
            pool.v[layer].index_copy_(0, attn.write_pages, v.to(pool.v.dtype))
        if pool is None:
            raise AssertionError("the stream tests run against a cache")
        out = paged_attention_rope_naive(q_rot, k_rot, v, pool.k[layer], pool.v[layer], attn.page_table,
                                         attn.num_pages, pool.page_frame_pos, rope.frame_cos, rope.frame_sin,
                                         spatial_cos, spatial_sin, grid_h * grid_w)
        return self.o(out.flatten(2))

    original_forward, original_merge = wan.SelfAttention.forward, paged_cache.sink_merge_
    wan.SelfAttention.forward, paged_cache.sink_merge_ = forward, _blend_pre_rope
    try:
        yield
    finally:
        wan.SelfAttention.forward, paged_cache.sink_merge_ = original_forward, original_merge


STREAM = StreamConfig.tiny(local_attn_size=12, sink_size=3, max_sink_size=9, latent_height=4, latent_width=6)
# Per chunk, each beam's route flag: appends until the sink is full, EMA merges, into shared sinks too.
FLAGS = [RouteFlag.DISCARD, RouteFlag.APPEND, RouteFlag.EMA, RouteFlag.APPEND, RouteFlag.EMA, RouteFlag.EMA,
         RouteFlag.APPEND, RouteFlag.DISCARD, RouteFlag.EMA, RouteFlag.EMA]


def run_stream(model, dtype, chunks=10):
    """Two beams forked from one parent every chunk (siblings share pages, EMA into a shared sink copies),
    each chunk denoised once and written back; returns the per-chunk outputs, the cache and the beams."""
    cache = PagedKVCache(model.config, STREAM, PagedKVCache.pages_needed(STREAM, 2, 2) + 2, torch.device("cpu"),
                         dtype)
    text = text_context(model)
    gen = torch.Generator().manual_seed(5)
    beams, outputs = [BeamPages()], []
    for c in range(chunks):
        parents = [0, 0] if c % 3 == 0 else [0, len(beams) - 1]
        forked = [cache.fork(beams[p]) for p in parents]
        for b in beams:
            cache.drop(b)
        table, counts = cache.page_table(forked)
        x = torch.randn(2, 4, 3, STREAM.latent_height, STREAM.latent_width, generator=gen).to(dtype)
        start = torch.full((2,), 3 * c)
        attn = wan.ChunkAttention(cache.pool, table, counts, start,
                                  max_pages=max(len(b.all_pages()) for b in forked))
        with torch.no_grad():
            outputs.append(model(x, torch.tensor([500.0, 250.0]), text, attn).float())
            write = cache.new_chunk_pages(2, 3 * c)
            model(x, torch.zeros(2), text, wan.ChunkAttention(cache.pool, table, counts, start, write))
        for i, beam in enumerate(forked):
            cache.commit(beam, int(write[i]), FLAGS[(c + i) % len(FLAGS)] if c else RouteFlag.DISCARD)
        cache.flush(ALPHA)
        beams = forked
    return outputs, cache, beams


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_rotated_merge_equals_rotating_at_attention_time(dtype, tol):
    """Over a stream with APPENDs and EMA merges (in place and copy-on-write): the same outputs and, page for
    page, the post-RoPE cache equals the pre-RoPE cache rotated at the pages' frames.

    Tolerance: relative error (L2) of every chunk's output; fp32 1e-5 (measured 2e-7: rounding of the two orders of
    rotation and blend), bf16 1e-2 (measured 3e-3: keys stored in bf16 after rotation vs before)."""
    model = tiny_model(seed=3, num_layers=2).to(dtype)
    new_out, new_cache, new_beams = run_stream(model, dtype)
    with pre_rope_path(model, STREAM.latent_height // 2, STREAM.latent_width // 2):
        old_out, old_cache, old_beams = run_stream(model, dtype)
    assert [b.all_pages() for b in new_beams] == [b.all_pages() for b in old_beams]
    assert any(len(b.sink) > 1 for b in new_beams), "the stream must append into the sink"
    for c, (a, b) in enumerate(zip(new_out, old_out)):
        err = float((a - b).norm() / b.norm())
        assert err <= tol, f"chunk {c}: relative error {err:.2e}"
    pages = sorted({p for b in new_beams for p in b.all_pages()})
    ids = torch.tensor(pages)[None]
    for layer in range(model.config.num_layers):
        pool = old_cache.pool
        rope = model.rope
        sc, ss = rope.spatial_tables(STREAM.latent_height // 2, STREAM.latent_width // 2)
        want = rotated_page_keys(pool.k[layer], ids, pool.page_frame_pos, rope.frame_cos, rope.frame_sin, sc, ss,
                                 sc.shape[0])[0]
        got = new_cache.pool.k[layer][pages].float()
        err = float((got - want).norm() / want.norm())
        assert err <= tol, f"layer {layer}: cache relative error {err:.2e}"
        torch.testing.assert_close(new_cache.pool.v[layer][pages], old_cache.pool.v[layer][pages], atol=tol,
                                   rtol=tol)


def test_stream_is_the_same_video_as_before():
    """The engine's Stream-T1 run (fp32, torch backend) with the post-RoPE cache against the old path:
    the same search decisions, latents within 1e-4 and frames within 1/255."""
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu", attention_backend="torch")
    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2, window_chunks=3, short_threshold=-0.05,
                          long_threshold=0.0, ema_alpha=ALPHA)
    kwargs = dict(num_chunks=7, seed=11, search=search, short_reward=brightness, long_reward=smoothness)
    new = engine.generate("a green triangle", **kwargs)
    patch = engine.model.config.patch_size
    stream = engine.config.stream
    with pre_rope_path(engine.model, stream.latent_height // patch[1], stream.latent_width // patch[2]):
        old = engine.generate("a green triangle", **kwargs)
    flags = {f for r in new.chunks for f in r.route_flags}
    assert {"EMA", "APPEND"} <= flags, f"the stream must merge and append, saw {flags}"
    for name in ("route_flags", "survivors", "sink_frames", "candidate_parents"):
        assert [getattr(r, name) for r in new.chunks] == [getattr(r, name) for r in old.chunks], name
    torch.testing.assert_close(new.latents, old.latents, atol=1e-4, rtol=1e-4)
    assert int((new.frames.int() - old.frames.int()).abs().max()) <= 1
