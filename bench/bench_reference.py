#!/usr/bin/env python
"""Our engine vs the reference way of running the same Stream-T1 search, on the same model and seeds.

The reference Stream-T1 code runs every candidate alone at batch 1, deep-copies the whole KV cache for each
candidate, clones the cache and re-applies RoPE to all cached keys in float64 in every attention call, and
re-decodes the candidate's whole reward window with the VAE. The baseline here does exactly those things
with our model: a ``ReferenceDenoiser`` (batch 1, a private deep copy of the candidate's pages), a
``reference`` attention backend (per-call clone + float64 rotation + SDPA) and a ``ReferenceBeamSearch``
whose long-term reward window is re-decoded per candidate. Search decisions (seeds, survivors, routing,
final pick) go through the same ``BeamSearch`` bookkeeping, so both runs must agree; the script checks it.

What the baseline does not reproduce: the reference also writes frames to PNG/MP4 files to score them
(not done here, so its cost is understated). With a causal VAE (Wan) the window can only be re-decoded to
the same frames from the start of the stream; beyond ``window_chunks`` chunks this decodes more than the
reference would (the default 7-chunk run is shorter than the 10-chunk window, so it is unaffected).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from streamt1_engine.model import wan  # noqa: E402
from streamt1_engine.model.wan import ChunkAttention, KVPool  # noqa: E402
from streamt1_engine.sampler import ChunkNoise, context_pass, denoise_chunk  # noqa: E402
from streamt1_engine.search.beam_search import BeamSearch, to_float, to_uint8  # noqa: E402

PROMPT = "a red fox running through fresh snow, cinematic lighting"
REFERENCE_BACKEND = "reference"


# -- the reference attention: clone the cache, rotate every cached key in float64, then attend -------------
def rotate_keys_float64(keys: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """keys [P, T, H, D] (half layout) rotated by ``angles`` [P, T, D/2] in float64, as the reference rotates
    its cached keys from scratch on every call."""
    d = keys.shape[-1]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    k = keys.double()
    lo, hi = k[..., : d // 2], k[..., d // 2:]
    return torch.cat([lo * cos - hi * sin, lo * sin + hi * cos], dim=-1)


def make_reference_attention():
    """The reference's attention cost on our post-RoPE pool: the reference keeps keys pre-RoPE and rotates
    every cached key in float64 on every call; our pool holds them rotated, so the baseline does the same
    float64 rotation work by the remaining angle, zero (an identity), which keeps the cost and the result."""
    def reference_attention(q, k_chunk, v_chunk, k_pool, v_pool, page_table, num_pages, scale=None, **_):
        outs = []
        for i in range(q.shape[0]):
            count = int(num_pages[i])  # a host read per call, as the reference does
            pages = page_table[i, :count].long()
            k_cache, v_cache = k_pool[pages].clone(), v_pool[pages].clone()  # the per-call cache clone
            angles = torch.zeros(*k_cache.shape[:2], k_cache.shape[-1] // 2, dtype=torch.float64, device=q.device)
            k_rot = rotate_keys_float64(k_cache, angles)
            h, d = q.shape[2:]
            keys = torch.cat([k_rot.reshape(-1, h, d).to(q.dtype), k_chunk[i].to(q.dtype)])
            values = torch.cat([v_cache.reshape(-1, h, d).to(q.dtype), v_chunk[i].to(q.dtype)])
            out = F.scaled_dot_product_attention(q[i:i + 1].transpose(1, 2), keys[None].transpose(1, 2),
                                                 values[None].transpose(1, 2), scale=scale)
            outs.append(out.transpose(1, 2))
        return torch.cat(outs)

    return reference_attention


@contextmanager
def reference_attention_backend():
    """Route ``backend="reference"`` calls of the model's attention to ``reference_attention``."""
    original = wan.paged_attention
    reference = make_reference_attention()

    def dispatch(*args, backend="torch", **kwargs):
        if backend == REFERENCE_BACKEND:
            return reference(*args, **kwargs)
        return original(*args, backend=backend, **kwargs)

    wan.paged_attention = dispatch
    try:
        yield
    finally:
        wan.paged_attention = original


# -- candidates one at a time, each with a deep copy of its cache ------------------------------------------
class ReferenceDenoiser:
    """Batch 1 per candidate; every candidate (and every survivor's context pass) gets a private deep copy of
    all layers of its beam's cache."""

    def __init__(self, model, schedule, text, context_timestep: float = 0.0):
        self.model, self.schedule, self.text, self.context_timestep = model, schedule, text, context_timestep
        self.last_x0: torch.Tensor | None = None

    @staticmethod
    def _private(attn: ChunkAttention, i: int, write: bool) -> tuple[ChunkAttention, int]:
        count = int(attn.num_pages[i])
        pages = attn.page_table[i, :count].long()
        pool = attn.pool
        k, v, pos = pool.k[:, pages].clone(), pool.v[:, pages].clone(), pool.page_frame_pos[pages].clone()
        if write:  # one more page for the chunk's own K/V
            k = torch.cat([k, torch.zeros_like(pool.k[:, :1])], 1)
            v = torch.cat([v, torch.zeros_like(pool.v[:, :1])], 1)
            pos = torch.cat([pos, attn.frame_start[i:i + 1].to(pos.dtype)])
        device = pool.k.device
        table = torch.arange(count, dtype=torch.int32, device=device)[None]
        private = ChunkAttention(KVPool(k, v, pos, pool.frame_cos, pool.frame_sin), table,
                                 torch.tensor([count], dtype=torch.int32, device=device),
                                 attn.frame_start[i:i + 1],
                                 torch.tensor([count], device=device) if write else None, backend=REFERENCE_BACKEND)
        return private, count

    def denoise(self, noise: ChunkNoise, attn: ChunkAttention) -> torch.Tensor:
        outs = []
        for i in range(noise.initial.shape[0]):
            private, _ = self._private(attn, i, write=False)
            one = ChunkNoise(noise.initial[i:i + 1], noise.renoise[:, i:i + 1])
            outs.append(denoise_chunk(self.model, self.schedule, one, self.text, private))
        self.last_x0 = torch.cat(outs)
        return self.last_x0

    def context(self, x0: torch.Tensor, attn: ChunkAttention) -> None:
        for i in range(x0.shape[0]):
            private, written = self._private(attn, i, write=True)
            context_pass(self.model, x0[i:i + 1], self.text, private, self.context_timestep)
            page = int(attn.write_pages[i])
            attn.pool.k[:, page] = private.pool.k[:, written]
            attn.pool.v[:, page] = private.pool.v[:, written]


class ReferenceBeamSearch(BeamSearch):
    """The long-term reward's window is re-decoded with the VAE for every candidate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        probe = torch.zeros((1, *self.latent_shape), device=self.device)
        self.stateful_vae = self.vae.decode_chunk(probe, None)[1] is not None

    def _window_video(self, parent_beams, frames_u8):
        x0 = self.denoiser.last_x0
        keep = self.search.window_chunks - 1
        clips = []
        for i, beam in enumerate(parent_beams):
            history = beam.node.lineage() if beam.node is not None else []
            window = history[max(0, len(history) - keep):] if keep > 0 else []
            # a causal decoder gives the streamed frames only when it starts at the stream's first chunk
            start = 0 if self.stateful_vae else len(history) - len(window)
            state, decoded = None, []
            for latents in [n.latents for n in history[start:]] + [x0[i]]:
                frames, state = self.vae.decode_chunk(latents[None], state)
                decoded.append(to_uint8(frames)[0])
            clips.append(torch.cat(decoded[len(decoded) - len(window) - 1:]))
        return to_float(torch.stack(clips))


def run_reference(engine, prompt: str, num_chunks: int, seed: int, search):
    """The same search as ``engine.generate`` but the reference way; returns (records, chosen beam, videos)."""
    from streamt1_engine.cache import PagedKVCache
    from streamt1_engine.rewards import default_long_reward, default_short_reward

    stream = engine.config.stream
    with torch.inference_mode():
        text = engine.model.encode_text(engine.text_encoder.encode([prompt]).to(engine.device))
    cache = PagedKVCache(engine.config.model, stream,
                         PagedKVCache.pages_needed(stream, search.survivors, search.first_chunk_candidates),
                         engine.device, engine.dtype, "torch")
    short, long = default_short_reward(), default_long_reward()
    latent_shape = (engine.config.model.in_channels, stream.chunk_frames, stream.latent_height, stream.latent_width)
    with reference_attention_backend(), torch.inference_mode():
        runner = ReferenceBeamSearch(
            model=engine.model, vae=engine.vae, cache=cache, text=text, prompt=prompt, search=search,
            schedule=engine.schedule, num_chunks=num_chunks, seed=seed, latent_shape=latent_shape,
            short_reward=short, long_reward=long, attention_backend=REFERENCE_BACKEND,
            context_timestep=engine.config.sampler.context_timestep,
            denoiser=ReferenceDenoiser(engine.model, engine.schedule, text, engine.config.sampler.context_timestep))
        for _ in range(num_chunks):
            runner.step()
        best, _ = runner.choose_final(long)
    videos = [torch.cat([n.frames for n in b.node.lineage()]).cpu() for b in runner.beams]
    records = runner.records
    runner.release()
    return records, best, videos


def compare(engine_result, ref_records, ref_best, ref_videos) -> dict:
    ours = engine_result.chunks
    same = dict(
        candidate_seeds=[r.candidate_seeds for r in ours] == [r.candidate_seeds for r in ref_records],
        survivors=[r.survivors for r in ours] == [r.survivors for r in ref_records],
        route_flags=[r.route_flags for r in ours] == [r.route_flags for r in ref_records],
        sink_frames=[r.sink_frames for r in ours] == [r.sink_frames for r in ref_records],
        chosen_beam=engine_result.info["chosen_beam"] == ref_best)
    diffs = [abs(a - b) for r, q in zip(ours, ref_records) if r.hybrid_scores and q.hybrid_scores
             for a, b in zip(r.hybrid_scores, q.hybrid_scores)]
    video = ref_videos[ref_best]
    frame_diff = None
    if video.shape == engine_result.frames.shape:
        frame_diff = int((engine_result.frames.int() - video.int()).abs().max())
    return dict(same, all_match=all(same.values()), max_hybrid_score_diff=max(diffs) if diffs else 0.0,
                max_frame_diff=frame_diff)


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=None, help="stream length (default 7 = a 5 s video; tiny: 3)")
    p.add_argument("--vae", choices=["wan-random", "light"], default=None)
    p.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                   help="CUDA graphs for our engine (auto: on with CUDA)")
    p.add_argument("--require-match", action="store_true", help="exit with an error when the decisions differ")
    args = common.finish_args(p.parse_args(argv), warmup=1, repeat=1)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.chunks is None:
        args.chunks = 3 if args.tiny else 7
    if args.vae is None:
        args.vae = "light" if args.tiny else "wan-random"
    return args


def main(argv=None):
    args = parse_args(argv)
    from streamt1_engine.search.config import SearchConfig

    graphs = args.graphs == "on" or (args.graphs == "auto" and args.device.type == "cuda")
    engine = common.build_engine(args, vae=args.vae, cuda_graphs=graphs, sync_stages=False)
    search = SearchConfig(strategy="stream_t1", beam_size=2, top_k=2)
    for _ in range(args.warmup):  # tables, autotuning, graph capture; the reference run frees its cache first
        run_reference(engine, PROMPT, 1, args.seed, search)
        engine.generate(PROMPT, num_chunks=2, seed=args.seed, search=search)
    common.reset_peak(args.device)
    ours_s, ours = common.wall_seconds(
        lambda: engine.generate(PROMPT, num_chunks=args.chunks, seed=args.seed, search=search), args.device)
    ours_peak = common.peak_bytes(args.device)
    engine._cache = engine._graphed = None  # give the reference run the memory our pool held
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    common.reset_peak(args.device)
    ref_s, (ref_records, ref_best, ref_videos) = common.wall_seconds(
        lambda: run_reference(engine, PROMPT, args.chunks, args.seed, search), args.device)
    ref_peak = common.peak_bytes(args.device)
    check = compare(ours, ref_records, ref_best, ref_videos)
    frames = int(ours.frames.shape[0])
    rows = [dict(run="engine", cuda_graphs=engine.cuda_graphs, chunks=args.chunks, wall_s=ours_s, fps=frames / ours_s,
                 s_per_chunk=ours_s / args.chunks, peak_mib=common.mib(ours_peak), speedup_vs_reference=ref_s / ours_s),
            dict(run="reference", cuda_graphs=False, chunks=args.chunks, wall_s=ref_s, fps=frames / ref_s,
                 s_per_chunk=ref_s / args.chunks, peak_mib=common.mib(ref_peak), speedup_vs_reference=1.0)]
    verdict = "SAME decisions" if check["all_match"] else "DIFFERENT decisions"
    notes = [f"check: {verdict} (seeds {check['candidate_seeds']}, survivors {check['survivors']}, routes "
             f"{check['route_flags']}, sinks {check['sink_frames']}, final pick {check['chosen_beam']}); max hybrid "
             f"score diff {check['max_hybrid_score_diff']:.3g}; max frame diff {check['max_frame_diff']} (uint8)",
             "stream_t1: B=2, K=2, built-in weight-free rewards; same prompt and seed in both runs",
             common.parts_note(args)]
    report = common.Report("bench_reference", "Engine vs the reference way (same search, same seeds)",
                           common.environment(args, __file__), rows, notes=notes, extra={"check": check})
    report.emit(args.out)
    if args.require_match and not check["all_match"]:
        raise SystemExit(f"the baseline and the engine disagree: {check}")
    return rows, check


if __name__ == "__main__":
    main()
