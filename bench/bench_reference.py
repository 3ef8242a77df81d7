#!/usr/bin/env python
"""Our engine vs Stream-T1 run the way the official code runs it, on the same model, seeds and rewards.

The baseline (``ReferenceStreamT1``) is a separate implementation of the official pipeline's loop
(``pipelines/stream_scaling.py`` and ``wan/modules/causal_model_stream_t1.py`` of FrameX-AI/Stream-T1). It
shares only the engine's weights and layer math (projections, norms, FFN, cross-attention, head), the VAE's
``decode_chunk`` and the reward callables; its candidate loop, noise, cache, attention, routing and pruning
are its own, so equal decisions are a real cross-check. Like the official code it:

- runs every candidate alone at batch 1, the clean context pass included, for all N candidates before any
  is pruned (pruning happens after each candidate, keeping the running top K);
- gives each candidate ``copy.deepcopy`` of its beam's whole KV cache (every layer's full buffer), of its
  reward history and a clone of its beam's latent video;
- keeps keys before RoPE in a flat per-layer buffer of ``(local_attn_size + max_sink_size - sink_size)``
  frames; every attention call clones the layer's buffer, rolls/appends/blends in the clone, re-rotates
  every cached key in float64 and reads the cache indices back to the host (``.item()``, ``.tolist()``);
- attends ``local_attn_size`` frames including the ``sink_size`` sink; an APPEND grows the sink and the
  cache budget together up to ``max_sink_size``; EMA (or APPEND with a full sink) blends the evicted chunk
  into the newest sink frames, ``sink = alpha * sink + (1 - alpha) * evicted``, on pre-RoPE keys;
- draws noise from ``torch.Generator(device).manual_seed(seed)`` per candidate in the official shape
  ([1, F, C, h, w]), dtype and order, with the official seed numbering and noise propagation;
- decodes from a cold VAE state: the candidate chunk alone for the short reward (uint8 by truncation), the
  last ``sliding_window_size`` chunks' latents for the long reward (re-decoded per candidate), each beam's
  whole latent video for the final pick;
- routes with the short-score mean over the whole lineage and ``long_low`` against the previous long score.

What is not reproduced: the official code writes every short-reward frame as a PNG and every long-reward
window and final video as an H.264 MP4, and its rewards read those files back. Here the PNGs are written to
and read back from a temporary directory (lossless, so the rewards see the same frames); the MP4s are
written and read back too (the cost), but the rewards score the frames before encoding, as the engine does,
since the lossy round trip would change the inputs. The rewards are the engine's built-in weight-free ones,
not HPSv3 / VideoAlign, so model-loading and reward cost are left out of both runs alike. Latents stay in the
model dtype as in the official code (bf16 on a GPU); the VAE de-normalises in float32 (the engine's
``decode_chunk``) where the official wrapper does it in the latents' dtype. Each layer writes its cache
update right after its attention instead of after the last block (each layer reads only its own buffer, so
the result is the same).

As in the official code, every denoising step writes the chunk's K/V into the cache (the context pass
overwrites them last), and a chunk is evicted at the first step of the chunk whose write overflows the
budget, not when it is committed; the frames each chunk attends to are those of the rule above.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

PROMPT = "a red fox running through fresh snow, cinematic lighting"
DISCARD, EMA, APPEND = "DISCARD", "EMA", "APPEND"


# -- the official knobs (configs/stream_scaling.yaml, stream_scaling.sh) ----------------------------------
@dataclass(frozen=True)
class UpstreamSettings:
    num_frame_per_block: int = 3
    local_attn_size: int = 12  # frames a chunk attends to, the sink and its own chunk included
    sink_size: int = 3
    max_sink_size: int = 15
    beam_size: int = 2
    top_k: int = 2
    sliding_window_size: int = 10  # chunks of the long-reward window
    short_threshold: float = 0.0
    long_threshold: float = 0.2
    noise_fusion_sigma: float = -0.1
    short_score_fusion_threshold: float = 0.4
    compression_alpha: float = 0.999
    context_noise: int = 0
    denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250)
    timestep_shift: float = 5.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        # the official pipeline only runs this layout: global attention (-1) fails while sizing its cache,
        # a sink of 0 attends unrotated keys, and its sink/window code assumes sink blocks of one chunk
        if self.local_attn_size <= 0 or self.sink_size <= 0:
            raise ValueError("the reference runs local attention with a sink (local_attn_size > 0, sink_size > 0)")
        if self.sink_size != self.num_frame_per_block or self.max_sink_size % self.sink_size:
            raise ValueError("the reference needs sink_size == num_frame_per_block and max_sink_size a multiple")

    @property
    def cache_frames(self) -> int:
        return self.local_attn_size + self.max_sink_size - self.sink_size


# -- the official sampler: FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True), warped steps --------
class UpstreamSchedule:
    def __init__(self, s: UpstreamSettings):
        n = s.num_train_timesteps
        sigmas = torch.linspace(1.0, 0.0, n + 1)[:-1]  # float32, as the official scheduler
        self.sigmas = s.timestep_shift * sigmas / (1 + (s.timestep_shift - 1) * sigmas)
        self.timesteps = self.sigmas * n
        with_zero = torch.cat([self.timesteps, torch.tensor([0.0])])
        self.steps = with_zero[n - torch.tensor(s.denoising_step_list, dtype=torch.long)]

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        table = self.timesteps.to(timestep.device)
        index = (table[None] - timestep[:, None]).abs().argmin(dim=1)
        return self.sigmas.to(timestep.device)[index]

    def to_x0(self, flow: torch.Tensor, xt: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma * flow in float64, back to the flow's dtype (flow/xt [F, C, h, w])."""
        sigma = self.sigma(timestep).double().reshape(-1, 1, 1, 1)
        return (xt.double() - sigma * flow.double()).to(flow.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(timestep).reshape(-1, 1, 1, 1)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)


# -- RoPE as the official code applies it: complex pairs, float64, recomputed on every call ---------------
def rope_table(head_dim: int, theta: float, positions: int, device) -> torch.Tensor:
    """complex128 [positions, head_dim / 2]: frame, height and width parts side by side."""
    d = head_dim
    parts = []
    for dim in (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)):
        inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=1).to(device)


def rope_apply(x: torch.Tensor, table: torch.Tensor, start_frame: int, frames: int, grid_h: int,
               grid_w: int) -> torch.Tensor:
    """Rotate x [1, frames*grid_h*grid_w, H, D] (interleaved pairs) as frames starting at ``start_frame``."""
    c = x.shape[-1] // 2
    ft, fh, fw = table.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    seq = frames * grid_h * grid_w
    xc = torch.view_as_complex(x[0, :seq].to(torch.float64).reshape(seq, x.shape[2], -1, 2))
    freqs = torch.cat([ft[start_frame:start_frame + frames].view(frames, 1, 1, -1).expand(frames, grid_h, grid_w, -1),
                       fh[:grid_h].view(1, grid_h, 1, -1).expand(frames, grid_h, grid_w, -1),
                       fw[:grid_w].view(1, 1, grid_w, -1).expand(frames, grid_h, grid_w, -1)], dim=-1)
    out = torch.view_as_real(xc * freqs.reshape(seq, 1, -1)).flatten(2)
    return out[None].type_as(x)


# -- the official per-layer KV cache ------------------------------------------------------------------------
class LayerCache:
    """One layer's flat K/V buffer (pre-RoPE keys) and its indices, kept on the device as the official code
    keeps them (so every read is a host sync)."""

    def __init__(self, s: UpstreamSettings, frame_tokens: int, heads: int, head_dim: int, device, dtype):
        shape = (1, s.cache_frames * frame_tokens, heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        long = dict(dtype=torch.long, device=device)
        self.global_end = torch.tensor([0], **long)
        self.local_end = torch.tensor([0], **long)
        self.sink_frames = torch.tensor([s.sink_size], **long)
        self.budget = torch.tensor([s.local_attn_size * frame_tokens], **long)  # grows with every APPEND
        self.appended = torch.zeros(0, **long)  # first frame of every appended sink chunk


@dataclass
class CacheUpdate:
    """What one call writes: the new chunk at [write_start, write_end); for a roll, the evicted tokens and
    whether they blend into the sink; for an append, the grown sink and budget."""

    action: str  # "insert", "roll", "append"
    current_end: int
    local_end: int
    write_start: int
    write_end: int
    recompute: bool
    sink_tokens: int = 0
    evicted: int = 0
    rolled: int = 0
    blend: bool = False
    sink_frames: int = 0
    budget: int = 0
    appended_frame: int = -1


@dataclass
class CallContext:
    """The per-forward facts every layer's attention needs."""

    start_frame: int
    frames: int
    grid_h: int
    grid_w: int
    routes: dict  # chunk start frame -> route flag, the lineage's history
    settings: UpstreamSettings
    table: torch.Tensor
    attended: list | None = None  # filled with the attended frame positions when given

    @property
    def frame_tokens(self) -> int:
        return self.grid_h * self.grid_w


def _plan(cache: LayerCache, ctx: CallContext, num_new: int) -> CacheUpdate:
    s, fsl = ctx.settings, ctx.frame_tokens
    start = ctx.start_frame * fsl
    end = start + num_new
    sink_frames = int(cache.sink_frames.item())
    sink_tokens = sink_frames * fsl
    budget = int(cache.budget.item())
    global_end, local_end = int(cache.global_end.item()), int(cache.local_end.item())
    recompute = end <= global_end and start > 0  # a later step or the context pass of the same chunk
    if end > global_end and num_new + local_end > budget:
        evicted = num_new + local_end - budget
        rolled = local_end - evicted - sink_tokens
        new_end = local_end + end - global_end - evicted
        evicted_frame = ctx.start_frame - (new_end - sink_tokens) // fsl
        flag = ctx.routes.get(evicted_frame, DISCARD)
        if flag == APPEND and sink_frames < s.max_sink_size:
            return CacheUpdate("append", end, new_end + num_new, new_end, new_end + num_new, recompute,
                               sink_frames=sink_frames + num_new // fsl, budget=budget + num_new,
                               appended_frame=evicted_frame)
        blend = flag == EMA or (flag == APPEND and sink_frames == s.max_sink_size)
        return CacheUpdate("roll", end, new_end, new_end - num_new, new_end, recompute, sink_tokens=sink_tokens,
                           evicted=evicted, rolled=rolled, blend=blend)
    new_end = local_end + end - global_end
    write_start = new_end - num_new
    if recompute:
        write_start = max(write_start, sink_tokens)
    return CacheUpdate("insert", end, new_end, write_start, new_end, recompute)


def _apply(k_buf, v_buf, update: CacheUpdate, k_new, v_new, alpha: float) -> None:
    if update.action == "roll":
        st, ev, ro = update.sink_tokens, update.evicted, update.rolled
        evicted_k, evicted_v = k_buf[:, st:st + ev].clone(), v_buf[:, st:st + ev].clone()
        if update.blend:  # into the newest sink frames
            k_buf[:, st - ev:st] = alpha * k_buf[:, st - ev:st] + (1 - alpha) * evicted_k
            v_buf[:, st - ev:st] = alpha * v_buf[:, st - ev:st] + (1 - alpha) * evicted_v
        k_buf[:, st:st + ro] = k_buf[:, st + ev:st + ev + ro].clone()
        v_buf[:, st:st + ro] = v_buf[:, st + ev:st + ev + ro].clone()
    length = update.write_end - update.write_start
    if length > 0:
        offset = k_new.shape[1] - length
        k_buf[:, update.write_start:update.write_end] = k_new[:, offset:]
        v_buf[:, update.write_start:update.write_end] = v_new[:, offset:]


def cached_attention(cache: LayerCache, q, k, v, ctx: CallContext) -> torch.Tensor:
    """One layer's attention the official way: q/k/v [1, L, H, D] of the chunk (k pre-RoPE)."""
    s, fsl = ctx.settings, ctx.frame_tokens
    appended = cache.appended.cpu().tolist()
    update = _plan(cache, ctx, q.shape[1])
    temp_k, temp_v = cache.k.clone(), cache.v.clone()  # the per-call clone
    _apply(temp_k, temp_v, update, k, v, s.compression_alpha)
    sink_frames = int(cache.sink_frames.item())
    if update.action == "append":
        sink_frames, appended = update.sink_frames, appended + [update.appended_frame]
    sink_tokens, base = sink_frames * fsl, s.sink_size * fsl
    gh, gw = ctx.grid_h, ctx.grid_w
    keys = [rope_apply(temp_k[:, :base], ctx.table, 0, s.sink_size, gh, gw)]
    positions = list(range(s.sink_size))
    if sink_frames > s.sink_size:
        for i, first in enumerate(appended):
            a = (i + 1) * base
            keys.append(rope_apply(temp_k[:, a:a + base], ctx.table, first, s.sink_size, gh, gw))
            positions += range(first, first + s.sink_size)
    local = temp_k[:, sink_tokens:update.local_end]
    if local.shape[1]:
        frames = local.shape[1] // fsl
        first = ctx.start_frame - frames + s.num_frame_per_block
        keys.append(rope_apply(local, ctx.table, first, frames, gh, gw))
        positions += range(first, first + frames)
    values = temp_v[:, :update.local_end]
    query = rope_apply(q, ctx.table, ctx.start_frame, ctx.frames, gh, gw)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), torch.cat(keys, 1).transpose(1, 2),
                                         values.transpose(1, 2)).transpose(1, 2)
    if ctx.attended is not None:
        ctx.attended[:] = positions
    # write back what the call changed (the official code applies it after all blocks; each layer only
    # reads its own buffer, so the result is the same)
    _apply(cache.k, cache.v, update, k, v, s.compression_alpha)
    if update.action == "append":
        cache.sink_frames.fill_(update.sink_frames)
        cache.budget.fill_(update.budget)
        cache.appended = torch.cat([cache.appended, torch.tensor([update.appended_frame], dtype=torch.long,
                                                                 device=cache.appended.device)])
    if not update.recompute:
        cache.global_end.fill_(update.current_end)
        cache.local_end.fill_(update.local_end)
    return out


# -- the DiT forward over the engine's layers, with the official cache and attention ----------------------
def _sinusoid(dim: int, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    position = t.double()
    angles = torch.outer(position, torch.pow(10000, -torch.arange(half, device=t.device).double().div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _self_attention(attn_module, x, cache: LayerCache, ctx: CallContext) -> torch.Tensor:
    n, length = x.shape[:2]
    heads = attn_module.num_heads
    q = attn_module.norm_q(attn_module.q(x)).view(n, length, heads, -1)
    k = attn_module.norm_k(attn_module.k(x)).view(n, length, heads, -1)
    v = attn_module.v(x).view(n, length, heads, -1)
    return attn_module.o(cached_attention(cache, q, k, v, ctx).flatten(2))


def _block(block, x, e, text_kv, cache: LayerCache, ctx: CallContext) -> torch.Tensor:
    shift1, scale1, gate1, shift2, scale2, gate2 = (block.modulation.float()[:, None] + e).unbind(2)
    h = (block.norm1(x) * (1 + scale1) + shift1).to(x.dtype)
    x = (x.float() + _self_attention(block.self_attn, h, cache, ctx).float() * gate1).to(x.dtype)
    x = x + block.cross_attn(block.norm3(x).to(x.dtype), text_kv)
    h = (block.norm2(x) * (1 + scale2) + shift2).to(x.dtype)
    return (x.float() + block.ffn(h).float() * gate2).to(x.dtype)


def reference_forward(model, noisy: torch.Tensor, timestep: float, text, caches: list[LayerCache],
                      ctx: CallContext) -> torch.Tensor:
    """noisy [1, F, C, h, w] (the official layout) -> predicted flow, same layout and dtype."""
    cfg = model.config
    _, frames, channels, height, width = noisy.shape
    pt, ph, pw = cfg.patch_size
    dtype = model.patch_embedding.weight.dtype
    x = model.patch_embedding(noisy.permute(0, 2, 1, 3, 4).to(dtype)).flatten(2).transpose(1, 2)
    t = torch.tensor([float(timestep)], device=x.device)
    e = model.time_embedding(_sinusoid(cfg.freq_dim, t).to(dtype))
    e_blocks = model.time_projection(e).unflatten(-1, (6, cfg.dim)).float()[:, None]
    for layer, block in enumerate(model.blocks):
        ctx_layer = ctx if layer == 0 else dataclasses.replace(ctx, attended=None)
        x = _block(block, x, e_blocks, text.kv[layer], caches[layer], ctx_layer)
    out = model.head(x, e[:, None])[0]
    gh, gw = height // ph, width // pw
    out = out.view(frames // pt, gh, gw, pt, ph, pw, cfg.out_channels)
    out = torch.einsum("fhwpqrc->cfphqwr", out).reshape(cfg.out_channels, frames, height, width)
    return out.permute(1, 0, 2, 3)[None].to(noisy.dtype)


# -- the official decisions (plain Python) ------------------------------------------------------------------
def _route_excess(history: dict, short: float, long: float, s: UpstreamSettings) -> tuple[float, float]:
    """(short score over the lineage's mean, long score's drop from the previous chunk), each less its
    threshold: the two comparisons ``route_flag`` makes, > 0 meaning high / low."""
    keys = sorted(history)[:-1]
    mean_short = sum(history[k]["short"] for k in keys) / len(keys)
    return short - mean_short - s.short_threshold, history[keys[-1]]["long"] - long - s.long_threshold


def route_flag(history: dict, short: float, long: float, s: UpstreamSettings) -> str:
    """``history``: chunk start frame -> {"short", "long"} of the lineage, the current chunk last. The short
    mean runs over every earlier chunk (the official window slice ``[max(0, 1 - W):]`` keeps them all);
    long_low compares with the previous chunk's long score."""
    short_excess, long_excess = _route_excess(history, short, long, s)
    short_high, long_low = short_excess > 0, long_excess > 0
    if short_high and not long_low:
        return EMA
    return APPEND if short_high and long_low else DISCARD


def route_margin(history: dict, short: float, long: float, s: UpstreamSettings) -> float:
    """How far the routing comparisons of ``route_flag`` are from their thresholds (a score change smaller
    than this cannot change the flag)."""
    if len(history) < 2:
        return math.inf
    return min(abs(e) for e in _route_excess(history, short, long, s))


def hybrid_weight(start_frame: int, total_frames: int, s: UpstreamSettings) -> float:
    """Share of the short score, ``start / (total - chunk)`` capped (the official code divides by zero for
    a one-chunk video)."""
    return min(start_frame / (total_frames - s.num_frame_per_block), s.short_score_fusion_threshold)


# -- the official search loop --------------------------------------------------------------------------------
@dataclass
class ReferenceChunk:
    index: int
    candidate_seeds: list[int]
    candidate_parents: list[int]
    short_scores: list[float]
    long_scores: list[float]
    hybrid_scores: list[float]
    hybrid_weight: float
    survivors: list[int]  # candidate indices, best first (the new beams' order)
    route_flags: list[str]  # of the survivors
    attended_frames: list[list[int]]  # per candidate, the latent frames its chunk attended to
    route_margins: list[float] = field(default_factory=list)  # of the survivors: see route_margin

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ReferenceResult:
    records: list[ReferenceChunk]
    chosen_beam: int
    final_scores: list[float]
    frames: torch.Tensor  # uint8 [T, H, W, 3] of the chosen beam, cold full decode
    beams: list[dict] = field(default_factory=list)


class ReferenceStreamT1:
    """One prompt's Stream-T1 search as the official pipeline runs it (see the module docstring).

    ``short_reward`` / ``long_reward``: the engine's reward contract, ``f(frames [1, T, 3, H, W] in [0, 1],
    prompt) -> [1]``; the long reward also makes the final pick, as upstream's VideoAlign does."""

    def __init__(self, model, vae, text, settings: UpstreamSettings, latent_shape: tuple[int, int, int],
                 short_reward: Callable, long_reward: Callable, *, device, dtype, files: bool = True):
        self.model, self.vae, self.text, self.s = model, vae, text, settings
        self.channels, self.height, self.width = latent_shape
        self.short_reward, self.long_reward = short_reward, long_reward
        self.device, self.dtype = torch.device(device), dtype
        self.schedule = UpstreamSchedule(settings)
        cfg = model.config
        self.grid_h, self.grid_w = self.height // cfg.patch_size[1], self.width // cfg.patch_size[2]
        self.frame_tokens = self.grid_h * self.grid_w
        self.table = rope_table(cfg.head_dim, cfg.rope_theta, 1024, self.device)
        self.files = files and _available("PIL") and _available("av")  # the round trips need Pillow and PyAV
        self._tmp: Path | None = None

    # -- pieces of generate_candidate ---------------------------------------------------------------
    def _empty_cache(self) -> list[LayerCache]:
        cfg = self.model.config
        return [LayerCache(self.s, self.frame_tokens, cfg.num_heads, cfg.head_dim, self.device, self.dtype)
                for _ in range(cfg.num_layers)]

    def _forward(self, noisy, timestep, cache, start_frame, routes, attended=None):
        ctx = CallContext(start_frame, noisy.shape[1], self.grid_h, self.grid_w, routes, self.s, self.table, attended)
        return reference_forward(self.model, noisy, timestep, self.text, cache, ctx)

    def _denoise(self, noisy, cache, start_frame, routes, generator, attended):
        steps = self.schedule.steps
        f = noisy.shape[1]
        x0 = noisy
        for i, t in enumerate(steps.tolist()):
            timestep = torch.full((f,), t, device=self.device)
            flow = self._forward(noisy, t, cache, start_frame, routes, attended if i == 0 else None)
            x0 = self.schedule.to_x0(flow[0], noisy[0], timestep)[None]
            if i + 1 < len(steps):
                fresh = torch.randn(x0[0].shape, device=self.device, dtype=self.dtype, generator=generator)
                nxt = torch.full((f,), float(steps[i + 1]), device=self.device)
                noisy = self.schedule.add_noise(x0[0], fresh, nxt)[None]
        return x0

    def _decode_u8(self, latents: torch.Tensor) -> torch.Tensor:
        """Cold decode of latents [1, F, C, h, w] -> uint8 [T, H, W, 3] on the host, truncated as upstream."""
        frames, _ = self.vae.decode_chunk(latents.permute(0, 2, 1, 3, 4).float(), None)
        return (255.0 * frames[0].clamp(0, 1).permute(0, 2, 3, 1).cpu()).to(torch.uint8)

    def _as_reward_input(self, frames_u8: torch.Tensor) -> torch.Tensor:
        return (frames_u8.to(self.device).permute(0, 3, 1, 2).float() / 255.0)[None]

    def _through_pngs(self, frames_u8: torch.Tensor, tag: str) -> torch.Tensor:
        if not self.files or self._tmp is None:
            return frames_u8
        from PIL import Image
        import numpy as np

        folder = self._tmp / tag
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, frame in enumerate(frames_u8.numpy()):
            path = folder / f"frame_{i:04d}.png"
            Image.fromarray(frame).save(path)
            paths.append(path)
        return torch.from_numpy(np.stack([np.array(Image.open(p).convert("RGB")) for p in paths]))

    def _through_mp4(self, frames_u8: torch.Tensor, tag: str) -> None:
        if not self.files or self._tmp is None:
            return
        from streamt1_engine.video_io import read_video, write_mp4

        path = self._tmp / f"{tag}.mp4"
        write_mp4(path, frames_u8.numpy(), fps=common.VIDEO_FPS)
        read_video(path)

    def _short_score(self, x0, tag) -> float:
        frames = self._through_pngs(self._decode_u8(x0), tag)
        return float(self.short_reward(self._as_reward_input(frames), self.prompt)[0].item())

    def _long_score(self, output, start_frame, tag) -> float:
        first = max(0, start_frame - (self.s.sliding_window_size - 1) * self.s.num_frame_per_block)
        frames = self._decode_u8(output[:, first:start_frame + self.s.num_frame_per_block])
        self._through_mp4(frames, tag)
        return float(self.long_reward(self._as_reward_input(frames), self.prompt)[0].item())

    def generate_candidate(self, beam: dict, chunk: int, seed: int, tag: str) -> dict:
        s, f = self.s, self.s.num_frame_per_block
        start_frame = chunk * f
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cache = copy.deepcopy(beam["kv_cache"])
        sample = torch.randn((1, f, self.channels, self.height, self.width), device=self.device, dtype=self.dtype,
                             generator=generator)
        noisy = sample if chunk == 0 else (s.noise_fusion_sigma * beam["noise"]
                                           + math.sqrt(1 - s.noise_fusion_sigma ** 2) * sample)
        beam_noise = noisy.clone()
        history = copy.deepcopy(beam["history"])
        routes = {k: v["route"] for k, v in history.items()}
        attended: list[int] = []
        x0 = self._denoise(noisy, cache, start_frame, routes, generator, attended)
        output = beam["output"].clone()
        output[:, start_frame:start_frame + f] = x0.to(output.dtype)
        self._forward(x0, float(s.context_noise), cache, start_frame, routes)  # context pass, every candidate
        short = self._short_score(x0, f"{tag}/short")
        long = self._long_score(output, start_frame, f"{tag}/long")
        history[start_frame] = {"short": short, "long": long, "route": DISCARD, "margin": math.inf}
        if chunk > 0:
            history[start_frame]["route"] = route_flag(history, short, long, s)
            history[start_frame]["margin"] = route_margin(history, short, long, s)
        alpha = hybrid_weight(start_frame, self.num_output_frames, s)
        hybrid = alpha * short + (1 - alpha) * long
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return dict(output=output, kv_cache=cache, seeds=beam["seeds"] + [seed], score=hybrid, noise=beam_noise,
                    history=history, short=short, long=long, alpha=alpha, attended=attended, index=-1)

    def _keep_top(self, kept: list[dict], candidate: dict) -> None:
        """Insert, stable sort best first, drop the last beyond top_k: the official running pruning."""
        kept.append(candidate)
        kept.sort(key=lambda c: c["score"], reverse=True)
        if len(kept) > self.s.top_k:
            pruned = kept.pop()
            for key in ("kv_cache", "output", "noise"):
                pruned.pop(key, None)

    # -- the whole stream ------------------------------------------------------------------------------
    def run(self, prompt: str, num_chunks: int, seed: int) -> ReferenceResult:
        if num_chunks < 2:
            raise ValueError("the official hybrid weight divides by (frames - chunk frames): run >= 2 chunks")
        self.prompt, f = prompt, self.s.num_frame_per_block
        self.num_output_frames = num_chunks * f
        output = torch.zeros((1, self.num_output_frames, self.channels, self.height, self.width),
                             device=self.device, dtype=self.dtype)
        beams = [dict(output=output, kv_cache=self._empty_cache(), seeds=[], history={}, noise=None)]
        records = []
        with tempfile.TemporaryDirectory(prefix="streamt1-reference-") as tmp:
            self._tmp = Path(tmp)
            for chunk in range(num_chunks):
                jobs = []  # (seed, parent beam index)
                if chunk == 0:
                    jobs = [(seed + 1000 * chunk + i, 0) for i in range(self.s.beam_size * self.s.top_k)]
                else:
                    for b, beam in enumerate(beams):
                        jobs += [(beam["seeds"][-1] if i == 0 else seed + 1000 * chunk + 100 * b + i, b)
                                 for i in range(self.s.beam_size)]
                kept: list[dict] = []
                done = []
                for j, (cand_seed, b) in enumerate(jobs):
                    candidate = self.generate_candidate(beams[b], chunk, cand_seed, f"{chunk}/{b}/{cand_seed}")
                    candidate["index"] = j
                    done.append(candidate)
                    self._keep_top(kept, candidate)
                    if chunk > 0 and (j + 1) % self.s.beam_size == 0:  # a beam's children are done: free it
                        for key in ("kv_cache", "output", "noise"):
                            beams[b].pop(key, None)
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
                beams = kept
                start = chunk * f
                records.append(ReferenceChunk(
                    index=chunk, candidate_seeds=[s for s, _ in jobs],
                    candidate_parents=[b if chunk > 0 else -1 for _, b in jobs],
                    short_scores=[c["short"] for c in done], long_scores=[c["long"] for c in done],
                    hybrid_scores=[c["score"] for c in done], hybrid_weight=done[0]["alpha"],
                    survivors=[c["index"] for c in beams], route_flags=[c["history"][start]["route"] for c in beams],
                    attended_frames=[c["attended"] for c in done],
                    route_margins=[c["history"][start]["margin"] for c in beams]))
            best, best_score, scores, best_frames = 0, -float("inf"), [], None
            for b, beam in enumerate(beams):  # _write_final_videos: cold full decode, first best wins
                frames = self._decode_u8(beam["output"])
                self._through_mp4(frames, f"final/beam_{b}")
                value = float(self.long_reward(self._as_reward_input(frames), prompt)[0].item())
                scores.append(value)
                if value > best_score:
                    best, best_score, best_frames = b, value, frames
            self._tmp = None
        for beam in beams:  # the caller keeps the beams' latents and noise, not their caches
            beam.pop("kv_cache", None)
        return ReferenceResult(records, best, scores, best_frames, beams)


# -- the engine's paper-exact run and the comparison ---------------------------------------------------------
def upstream_settings(engine, search) -> UpstreamSettings:
    """The official knobs equal to the engine's configuration (upstream terms, as the config names them)."""
    stream, sampler = engine.config.stream, engine.config.sampler
    return UpstreamSettings(
        num_frame_per_block=stream.num_frame_per_block, local_attn_size=stream.local_attn_size,
        sink_size=stream.sink_size, max_sink_size=stream.max_sink_size, beam_size=search.beam_size,
        top_k=search.top_k, sliding_window_size=search.window_chunks, short_threshold=search.short_threshold,
        long_threshold=search.long_threshold, noise_fusion_sigma=search.noise_sigma,
        short_score_fusion_threshold=search.fusion_cap, compression_alpha=search.ema_alpha,
        context_noise=int(sampler.context_timestep), denoising_step_list=tuple(int(t) for t in sampler.denoising_steps),
        timestep_shift=sampler.shift, num_train_timesteps=sampler.num_train_timesteps)


def paper_search(**overrides):
    """The engine's paper-exact Stream-T1 search (B=2, K=2), every parity option spelt out."""
    from streamt1_engine.search.config import SearchConfig

    options = dict(strategy="stream_t1", beam_size=2, top_k=2, noise_mode="official", reward_frames="cold",
                   short_history="lineage")
    options.update(overrides)
    return SearchConfig(**options)


def run_reference(engine, prompt: str, num_chunks: int, seed: int, search, *, files: bool = True) -> ReferenceResult:
    from streamt1_engine.rewards import default_long_reward, default_short_reward

    stream = engine.config.stream
    with torch.inference_mode():
        text = engine.model.encode_text(engine.text_encoder.encode([prompt]).to(engine.device))
        runner = ReferenceStreamT1(engine.model, engine.vae, text, upstream_settings(engine, search),
                                   (engine.config.model.in_channels, stream.latent_height, stream.latent_width),
                                   default_short_reward(), default_long_reward(), device=engine.device,
                                   dtype=engine.dtype, files=files)
        return runner.run(prompt, num_chunks, seed)


def score_tolerance(dtype: torch.dtype) -> float:
    """How far one candidate's reward may differ between the two runs: float32 agrees to rounding; bf16/fp16
    latents (8 / 11 bits of mantissa, rounded in every one of 30 layers x 5 forwards) move the decoded frames
    and so the scores by a few hundredths."""
    return 1e-4 if dtype == torch.float32 else 5e-2


def decision_margin(scores, keep: int) -> float:
    """Smallest gap between neighbours among the best ``keep + 1`` scores: what decides which candidates are
    kept and in which order (a score change below half of it cannot change the decision)."""
    ordered = sorted(scores or [], reverse=True)[:keep + 1]
    return min((a - b for a, b in zip(ordered, ordered[1:])), default=math.inf)


def compare(engine_result, ref: ReferenceResult, tolerance: float) -> dict:
    """Decisions compared where they are deterministic: a chunk whose survivors or routes differ while its
    deciding margin (``decision_margin`` of either run's hybrid scores, the routes' threshold distances) is
    within ``2 * tolerance`` (each run's score may be off by ``tolerance``) is a near-tie, not compared, and
    the chunks after it continue different lineages, so they are not compared either."""
    ours, tie = engine_result.chunks, 2 * tolerance
    statuses, compared, diverged = [], [], False
    mismatch = dict(candidate_seeds=False, survivors=False, route_flags=False)
    for r, q in zip(ours, ref.records):
        if diverged:
            statuses.append("after a near-tie, not compared")
            continue
        compared.append((r, q))
        keep = len(q.survivors)
        margin = min(decision_margin(q.hybrid_scores, keep), decision_margin(r.hybrid_scores, keep),
                     min(q.route_margins, default=math.inf))
        if r.candidate_seeds != q.candidate_seeds:
            mismatch["candidate_seeds"] = True
            statuses.append("DIFFERENT seeds")
        elif r.survivors == q.survivors and r.route_flags == q.route_flags:
            statuses.append("same")
        elif margin <= tie:
            statuses.append(f"near-tie (margin {margin:.3g} <= {tie:g}), not compared")
            compared.pop()
            diverged = True
        else:
            mismatch["survivors"] |= r.survivors != q.survivors
            mismatch["route_flags"] |= r.route_flags != q.route_flags
            statuses.append(f"DIFFERENT (margin {margin:.3g} > {tie:g})")
    if len(ours) != len(ref.records):
        mismatch["candidate_seeds"] = True
        statuses.append(f"DIFFERENT chunk counts ({len(ours)} vs {len(ref.records)})")
    final_margin = min(decision_margin(ref.final_scores, 1),
                       decision_margin(engine_result.info.get("final_beam_scores"), 1))
    if diverged:
        chosen = "not compared (after a near-tie)"
    elif engine_result.info["chosen_beam"] == ref.chosen_beam:
        chosen = "same"
    else:
        chosen = "near-tie, not compared" if final_margin <= tie else "DIFFERENT"
    same = {k: not v for k, v in mismatch.items()}
    same["chosen_beam"] = chosen != "DIFFERENT"
    diffs = {}
    for kind in ("short_scores", "long_scores", "hybrid_scores"):
        pairs = [(a, b) for r, q in compared for a, b in zip(getattr(r, kind) or [], getattr(q, kind))]
        complete = all(len(getattr(r, kind) or []) == len(getattr(q, kind)) for r, q in compared)
        diffs[kind] = max((abs(a - b) for a, b in pairs), default=0.0) if complete else float("inf")
    same["scores_within_tolerance"] = max(diffs.values()) <= tolerance
    frame_diff = None
    if not diverged and ref.frames is not None and tuple(ref.frames.shape) == tuple(engine_result.frames.shape):
        frame_diff = int((engine_result.frames.int() - ref.frames.int()).abs().max())
    near_ties = sum(s.startswith("near-tie") for s in statuses) + (chosen.startswith("near-tie"))
    return dict(same, all_match=all(same.values()), score_tolerance=tolerance, near_tie_tolerance=tie,
                compared_chunks=len(compared), near_ties=near_ties, chunk_status=statuses, chosen_beam_status=chosen,
                **{f"max_{k}_diff": v for k, v in diffs.items()}, max_frame_diff=frame_diff)


# -- CLI -------------------------------------------------------------------------------------------------------
def build_vae(kind: str, cfg, device, seed: int):
    """``wan-tiny``: a small random AutoencoderKLWan (causal; 4x spatial, 2x temporal, so that CPU runs take
    seconds), the tiny default when diffusers is installed; ``wan-random`` / ``light`` as in common.py."""
    if kind != "wan-tiny":
        return common.build_vae(kind, cfg, device, seed)
    from diffusers import AutoencoderKLWan

    from streamt1_engine.vae import WanVAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKLWan(base_dim=8, z_dim=cfg.in_channels, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True])
    return WanVAE(model, device=device, dtype=torch.float32)


def build_engine(args, cuda_graphs: bool):
    """Random-weight DiT, hashed text encoder and the chosen VAE, with the official Stream-T1 stream layout."""
    from streamt1_engine.config import EngineConfig, SamplerConfig, StreamConfig
    from streamt1_engine.engine import StreamT1Engine
    from streamt1_engine.text_encoders import HashedTextEncoder

    cfg = common.model_config(args.tiny)
    size = common.stream_config(args.tiny)
    stream = StreamConfig.preset("stream-t1", latent_height=size.latent_height, latent_width=size.latent_width)
    model = common.random_dit(cfg, args.device, args.torch_dtype, seed=args.seed)
    text = HashedTextEncoder(cfg.text_dim, cfg.text_len, seed=args.seed)
    return StreamT1Engine(model, text, build_vae(args.vae, cfg, args.device, args.seed),
                          EngineConfig(cfg, stream, SamplerConfig()), device=args.device, dtype=args.torch_dtype,
                          attention_backend=args.backend, fps=common.VIDEO_FPS,
                          name="random-tiny" if args.tiny else "random-wan2.1-1.3b", cuda_graphs=cuda_graphs)


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=None, help="stream length (default 7 = a 5 s video; tiny: 6)")
    p.add_argument("--vae", choices=["wan-random", "wan-tiny", "light"], default=None,
                   help="default: wan-random; tiny: wan-tiny when diffusers is installed, else light")
    p.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                   help="CUDA graphs for our engine (auto: on with CUDA)")
    p.add_argument("--no-files", action="store_true", help="skip the PNG/MP4 round trips of the reference")
    p.add_argument("--require-match", action="store_true", help="exit with an error when the decisions differ")
    args = common.finish_args(p.parse_args(argv), warmup=1, repeat=1)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.chunks is None:
        args.chunks = 6 if args.tiny else 7
    if args.chunks < 2:
        p.error("--chunks must be >= 2 (the official hybrid weight divides by the frames after the first chunk)")
    if args.vae is None:
        args.vae = "wan-random" if not args.tiny else ("wan-tiny" if _available("diffusers") else "light")
    return args


def estimate(args) -> dict:
    """Warm-up (2 chunks) and timed runs of both: the engine's 4 candidates + 2 context passes per chunk, the
    reference's 4 candidates each with its own context pass; cold decodes of each candidate's chunk and of its
    reward window (3 chunks), and of each beam's whole video for the final pick, in both."""
    cfg, stream = common.model_config(args.tiny), common.stream_config(args.tiny)
    flops = vae_frames = 0.0
    for chunks in (2, args.chunks) if args.warmup else (args.chunks,):
        flops += common.stream_flops(cfg, stream, chunks, 4, 2) + common.stream_flops(cfg, stream, chunks, 4, 4)
        window = sum(12 * min(c + 1, 3) for c in range(chunks))  # the long reward's window, re-decoded
        vae_frames += 2 * (4 * (12 * chunks + window) + 2 * common.video_frames(chunks))
    vae_flops = vae_frames * common.VAE_TFLOP_PER_FRAME * 1e12 if args.vae == "wan-random" else 0.0
    host_s = 1.0 * args.chunks  # assumed: the reference's per-layer host reads, cache clones and deep copies
    return common.estimate("reference", flops, vae_flops=vae_flops,
                           overhead_s=common.PROCESS_START_S + common.TRITON_WARMUP_S + host_s,
                           detail=f"{args.chunks} chunks, engine + reference, VAE {args.vae}")


def main(argv=None):
    args = parse_args(argv)
    if args.estimate:
        return estimate(args)
    graphs = args.graphs == "on" or (args.graphs == "auto" and args.device.type == "cuda")
    files = not args.no_files and _available("PIL") and _available("av")  # what the reference can round-trip
    engine = build_engine(args, graphs)
    search = paper_search()
    for _ in range(args.warmup):  # tables, autotuning, graph capture
        run_reference(engine, PROMPT, 2, args.seed, search, files=files)
        engine.generate(PROMPT, num_chunks=2, seed=args.seed, search=search)
    rows = common.LiveRows(args.out, "bench_reference")  # each timing is kept the moment it is measured
    common.reset_peak(args.device)
    ours_s, ours = common.wall_seconds(
        lambda: engine.generate(PROMPT, num_chunks=args.chunks, seed=args.seed, search=search), args.device)
    frames = int(ours.frames.shape[0])
    engine_row = dict(run="engine", cuda_graphs=engine.cuda_graphs, chunks=args.chunks, wall_s=ours_s,
                      fps=frames / ours_s, s_per_chunk=ours_s / args.chunks,
                      peak_mib=common.mib(common.peak_bytes(args.device)), speedup_vs_reference=None)
    rows.append(engine_row)
    engine.free_pool()  # give the reference run the memory our pool held
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    common.reset_peak(args.device)
    ref_s, ref = common.wall_seconds(
        lambda: run_reference(engine, PROMPT, args.chunks, args.seed, search, files=files), args.device)
    rows.append(dict(run="reference", cuda_graphs=False, chunks=args.chunks, wall_s=ref_s, fps=frames / ref_s,
                     s_per_chunk=ref_s / args.chunks, peak_mib=common.mib(common.peak_bytes(args.device)),
                     speedup_vs_reference=1.0))
    engine_row["speedup_vs_reference"] = ref_s / ours_s
    tolerance = score_tolerance(args.torch_dtype)
    check = compare(ours, ref, tolerance)
    verdict = ("SAME decisions" if check["all_match"] else "DIFFERENT decisions") + (
        f" where deterministic ({check['compared_chunks']} of {args.chunks} chunks compared; {check['near_ties']} "
        f"near-tie(s) within {check['near_tie_tolerance']:g}, not compared)" if check["near_ties"] else "")
    missing = [name for name, module in (("Pillow", "PIL"), ("av", "av")) if not _available(module)]
    if args.no_files:
        file_note = ""
    elif files:
        file_note = ", PNG/MP4 round trips on a temp dir"
    else:
        file_note = f"; PNG/MP4 round trips skipped: no {' and no '.join(missing)}"
    notes = [f"check: {verdict} (seeds {check['candidate_seeds']}, survivors {check['survivors']}, routes "
             f"{check['route_flags']}, final pick {check['chosen_beam_status']}, scores within {tolerance:g} "
             f"{check['scores_within_tolerance']}); max score diff short {check['max_short_scores_diff']:.3g} "
             f"long {check['max_long_scores_diff']:.3g} hybrid {check['max_hybrid_scores_diff']:.3g}; "
             f"max frame diff {check['max_frame_diff']} (uint8); per chunk: {', '.join(check['chunk_status'])}",
             f"engine {ours_s:.3f} s vs reference {ref_s:.3f} s in this run: {ref_s / ours_s:.2f}x (timings kept "
             "whatever the check says)",
             "reference: the official loop (batch 1 per candidate, context pass for all N, deep-copied cache, "
             "per-call clone + float64 re-rotation, host reads per layer, cold decodes, window re-decoded per "
             "candidate" + file_note + ")",
             "engine: paper-exact search (noise_mode=official, reward_frames=cold, short_history=lineage); "
             "B=2, K=2, built-in weight-free rewards; same prompt and seed in both runs",
             common.parts_note(args) if args.vae != "wan-tiny" else
             "toy random-weight DiT; VAE: small random AutoencoderKLWan (causal, 4x spatial / 2x temporal); "
             "hashed text encoder"]
    if args.vae == "light":
        notes.append("cold decodes and window re-decodes ran the weight-free stand-in VAE"
                     + (" (skipped: no diffusers)" if not _available("diffusers") else "")
                     + ": the real VAE's cost is left out of both timings")
    report = common.Report("bench_reference", "Engine vs the official way of running Stream-T1 (same seeds)",
                           common.environment(args, __file__), rows, notes=notes,
                           extra={"check": check, "reference_chunks": [r.to_dict() for r in ref.records],
                                  "engine_chunks": [r.to_dict() for r in ours.chunks]})
    report.emit(args.out)
    if args.require_match and not check["all_match"]:
        raise SystemExit(f"the baseline and the engine disagree where the decisions are deterministic (timings "
                         f"written): {check['chunk_status']}, final pick {check['chosen_beam_status']}")
    return rows, check


if __name__ == "__main__":
    main()
