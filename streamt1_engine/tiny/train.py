"""Train the embedded tiny streaming video model on procedural videos (CPU, minutes).

    python -m streamt1_engine.tiny.train --out DIR [--steps 1800 --minutes 30 --seed 0]

A causal Wan DiT and the tiny text encoder learn jointly by flow matching with teacher forcing: each
sample is [clean frames at timestep 0 | noisy frames], every noisy chunk of 3 frames has its own
timestep and attends to the clean chunks before it and to itself. Clips are 4 chunks; half of them jump
in time after the first chunk (and sometimes the second), as the streaming cache does once the window
has moved away from the sink (a chunk right after such a jump is context only: no loss). Timesteps
follow the sampler's shifted schedule, three quarters of them exactly the 4 warped steps used at
inference; the loss weighs object pixels up. Training stops at ``--steps`` or ``--minutes``, whichever comes first (the
learning-rate schedule follows the nearer one), and the model directory is rewritten every few minutes
so an interrupted run still leaves usable weights. The weights shipped before v2 are the EMA of two runs
(about 65 minutes on 2 cores in all): the default run, then a second one started from it (``--init``)::

    python -m streamt1_engine.tiny.train --out stage1
    python -m streamt1_engine.tiny.train --out stage2 --init stage1 --seed 1 --lr 1e-3 --steps 3000 --minutes 60

(``--recipe v1 [--stage 2]`` names the same options.) The shipped weights are the three stages of the v2
recipe (``recipes.py``, about 140 minutes), which trains for motion with options that are all off by
default: clips of 8 chunks in which a chunk sees the sink and the inference window before it, part of each
batch seeing the model's own chunks as context, extra loss weight on pixels that change and a loss on the
frame-to-frame change across chunk boundaries, the benchmark's held-out scenes kept out of the data, and
at last a sampler whose steps end at a lower noise level::

    python -m streamt1_engine.tiny.train --recipe v2 --out stage1
    python -m streamt1_engine.tiny.train --recipe v2 --stage 2 --init stage1 --out stage2
    python -m streamt1_engine.tiny.train --recipe v2 --stage 3 --init stage2 --out stage3
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import SamplerConfig
from ..engine_format import read_engine_spec
from ..errors import require
from ..model.wan import ChunkAttention, TextContext
from .model import (
    FPS,
    FRAME_SIZE,
    VAE_FACTOR,
    TinyModel,
    build_tiny_model,
    inference_timesteps,
    load_tiny_model,
    teacher_forcing_mask,
    tiny_sampler_config,
    tiny_wan_config,
)
from .procedural import ProceduralVideos, contiguous_chunks
from .recipes import recipe_stage
from .text_encoder import save_tiny_text_encoder

CLIP_CHUNKS = 4


def sample_timesteps(batch: int, chunks: int, gen: torch.Generator, sampler: SamplerConfig | None = None,
                     inference_prob: float = 0.75) -> torch.Tensor:
    """[batch, chunks] training timesteps in (0, 1000]: the sampler's shifted schedule, biased to its
    inference steps (default: the tiny model's sampler)."""
    sampler = sampler or tiny_sampler_config()
    shift = sampler.shift
    warped = torch.tensor(inference_timesteps(sampler))
    u = torch.rand(batch, chunks, generator=gen).clamp_min(1e-3)
    shifted = 1000.0 * shift * u / (1 + (shift - 1) * u)
    pick = warped[torch.randint(len(warped), (batch, chunks), generator=gen)]
    use_pick = torch.rand(batch, chunks, generator=gen) < inference_prob
    return torch.where(use_pick, pick, shifted)


def text_context(model: TinyModel, prompts: list[str]) -> TextContext:
    """Per-layer cross-attention K/V with gradients through the text encoder (``encode_text`` has none)."""
    ids, mask = model.text_encoder.token_ids(prompts)
    states = model.text_encoder(ids, mask)
    context = model.dit.text_embedding(states)
    return TextContext([blk.cross_attn.text_kv(context) for blk in model.dit.blocks])


def training_loss(model: TinyModel, frames: torch.Tensor, prompts: list[str], times: torch.Tensor,
                  gen: torch.Generator, mask: torch.Tensor,
                  timesteps: torch.Tensor | None = None, context_noise: bool = True,
                  fg_weight: float = 4.0, first_chunk_weight: float = 2.0, rollout: bool = False,
                  motion_weight: float = 0.0, temporal_weight: float = 0.0,
                  own_context: torch.Tensor | None = None, own_context_start: int = 1) -> torch.Tensor:
    """Flow-matching loss of the noisy chunks given clean context (teacher forcing).

    With ``rollout`` the noisy input is the one the few-step sampler really meets at a random inference
    step: reached by the model's own earlier steps (no gradient), i.e. built from its own imperfect x0
    estimates rather than the truth; the target still points at the true x0, flow = (x_t - x0) / sigma.
    The first chunk, generated from the prompt alone, is the hardest and counts ``first_chunk_weight`` times.

    ``own_context`` (bool [B]): those samples see the model's own chunks as context (``own_context_chunks``)
    instead of the truth. ``motion_weight`` weighs up latent pixels that change from the previous frame
    (a moving object's edges: what makes it move). ``temporal_weight`` adds a loss on the frame-to-frame
    change of the x0 estimate, where the first frame of a chunk continues from the context's last frame:
    a chunk boundary must change the video as much as the truth does, no more (no seams).
    """
    cf = model.stream.chunk_frames
    x0 = model.vae.encode(frames)  # [B, C, F, h, w] in [-1, 1]
    b, _, num_frames = x0.shape[:3]
    chunks = num_frames // cf
    context = x0
    if context_noise:  # robustness to the imperfect context the model itself produces at inference
        level = torch.rand(b, 1, 1, 1, 1, generator=gen) * 0.1 * (torch.rand(b, 1, 1, 1, 1, generator=gen) < 0.5)
        context = x0 + level * torch.randn(x0.shape, generator=gen)
    if own_context is not None and bool(own_context.any()):
        rows = own_context.nonzero().flatten()
        context = context.clone()
        context[rows] = own_context_chunks(model, x0[rows], [prompts[i] for i in rows.tolist()], times[rows],
                                           mask, gen, own_context_start)
    text = text_context(model, prompts)
    attn = ChunkAttention.dense(b, x0.device, mask, frame_positions=times.repeat(1, 2))

    def flow_of(x_t, t_frames):
        return dense_flow(model, context, x_t, t_frames, text, attn)

    if rollout:
        steps = inference_timesteps(model.sampler)
        k = int(torch.randint(1, len(steps), (), generator=gen))
        x_t = torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            for i in range(k):
                x0_est = x_t - steps[i] / 1000.0 * flow_of(x_t, torch.full((b, num_frames), steps[i]))
                s_next = steps[i + 1] / 1000.0
                x_t = (1 - s_next) * x0_est + s_next * torch.randn(x0.shape, generator=gen)
        t_frames = torch.full((b, num_frames), steps[k])
    else:
        if timesteps is None:
            timesteps = sample_timesteps(b, chunks, gen, model.sampler)
        t_frames = timesteps.repeat_interleave(cf, dim=1)  # [B, F]
        s = (t_frames / 1000.0)[:, None, :, None, None]
        x_t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen)
    s = (t_frames / 1000.0)[:, None, :, None, None]
    flow = flow_of(x_t, t_frames)
    err = (flow - (x_t - x0) / s).pow(2).mean(dim=1)  # [B, F, h, w]
    pixel_weight = object_weight(frames, model.vae.spatial_factor, fg_weight)
    if motion_weight:
        pixel_weight = pixel_weight + motion_weight * change_weight(frames, times, model.vae.spatial_factor)
    err = (err * pixel_weight).mean(dim=(2, 3))
    weight = contiguous_chunks(times, cf).float()  # after a jump: context only
    weight[:, 0] *= first_chunk_weight
    weight = weight.repeat_interleave(cf, dim=1)
    loss = (err * weight).sum() / weight.sum()
    if temporal_weight:
        loss = loss + temporal_weight * temporal_loss(x_t - s * flow, x0, context, times, cf, weight)
    return loss


def dense_flow(model: TinyModel, context: torch.Tensor, x_t: torch.Tensor, t_frames: torch.Tensor,
               text: TextContext, attn: ChunkAttention) -> torch.Tensor:
    """Flow of the noisy frames of the teacher-forcing layout [context at timestep 0 | x_t at t_frames]."""
    b, num_frames = t_frames.shape
    inputs = torch.cat([context, x_t], dim=2)
    timesteps = torch.cat([torch.zeros(b, num_frames), t_frames], dim=1)
    return model.dit(inputs, timesteps, text, attn)[:, :, num_frames:].float()


@torch.no_grad()
def own_context_chunks(model: TinyModel, x0: torch.Tensor, prompts: list[str], times: torch.Tensor,
                       mask: torch.Tensor, gen: torch.Generator, start: int = 1) -> torch.Tensor:
    """The model's own version of every chunk of the clip, to serve as context (self-forcing-style).

    Every chunk is the truth noised to a random inference step (index ``start`` or later), then denoised
    by the sampler's remaining steps, seeing the true chunks before it. From pure noise (index 0) the
    model would draw a scene of its own while the loss still targets the true next chunk, and teach it to
    ignore its context; from a noised truth the object stays about where it is, while the blur, speckle,
    colour and shape drift are the model's own, what it meets in its context at inference."""
    steps = inference_timesteps(model.sampler)
    require(0 <= start < len(steps), f"own-context start must be an inference step index below {len(steps)}")
    k = int(torch.randint(start, len(steps), (), generator=gen))
    b, num_frames = x0.shape[0], x0.shape[2]
    text = text_context(model, prompts)
    attn = ChunkAttention.dense(b, x0.device, mask, frame_positions=times.repeat(1, 2))
    sigma = steps[k] / 1000.0
    x_t = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=gen)
    for i in range(k, len(steps)):
        flow = dense_flow(model, x0, x_t, torch.full((b, num_frames), steps[i]), text, attn)
        x0_est = x_t - steps[i] / 1000.0 * flow
        if i + 1 < len(steps):
            sigma = steps[i + 1] / 1000.0
            x_t = (1 - sigma) * x0_est + sigma * torch.randn(x0.shape, generator=gen)
    return x0_est.clamp(-1, 1)


def temporal_loss(x0_pred: torch.Tensor, x0: torch.Tensor, context: torch.Tensor, times: torch.Tensor,
                  chunk_frames: int, frame_weight: torch.Tensor) -> torch.Tensor:
    """Squared error of the predicted frame-to-frame change [B, C, F, h, w] against the true one, over
    frames that directly follow their predecessor in time. A chunk's first frame is compared with the
    context's last frame of the chunk before (what the stream shows before it), the others with the
    prediction's own previous frame."""
    prev_pred = torch.cat([x0_pred[:, :, :1], x0_pred[:, :, :-1]], dim=2).clone()
    firsts = torch.arange(chunk_frames, x0.shape[2], chunk_frames)
    prev_pred[:, :, firsts] = context[:, :, firsts - 1]
    prev_true = torch.cat([x0[:, :, :1], x0[:, :, :-1]], dim=2)
    err = ((x0_pred - prev_pred) - (x0 - prev_true)).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    follows = torch.cat([torch.zeros_like(times[:, :1], dtype=torch.bool), times[:, 1:] == times[:, :-1] + 1], 1)
    weight = frame_weight * follows.float()
    return (err * weight).sum() / weight.sum().clamp_min(1e-6)


def change_weight(frames: torch.Tensor, times: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, F, h, w] share of pixels in each latent pixel's block that changed from the frame before (0 for
    a clip's first frame and after a jump in time)."""
    changed = (frames[:, 1:] - frames[:, :-1]).abs().amax(dim=2) > 0.1  # [B, F-1, H, W]
    changed = changed & (times[:, 1:] == times[:, :-1] + 1)[..., None, None]
    changed = torch.cat([torch.zeros_like(changed[:, :1]), changed], dim=1).float()
    return F.avg_pool2d(changed, factor)


def object_weight(frames: torch.Tensor, factor: int, fg_weight: float) -> torch.Tensor:
    """[B, F, h, w] loss weight per latent pixel: 1 + fg_weight x (share of object pixels in its block).
    Objects cover a tenth of a frame; without this the model first learns backgrounds only."""
    background = frames.flatten(3).median(dim=3).values[..., None, None]
    fg = ((frames - background).norm(dim=2) > 0.1).float()  # [B, F, H, W]
    return 1 + fg_weight * F.avg_pool2d(fg, factor)


@torch.no_grad()
def pass_through_init(dit) -> None:
    """Start from flow = x_t: an orthogonal patch embedding, the head its transpose, and every block,
    the time embedding and the head modulation zeroed (the adaLN-Zero idea). The target
    flow = (x_t - x0) / sigma is mostly x_t, and a tiny model whose width equals the patch size learns
    the exact pass-through only slowly from a random start; leaked noise shows as blocky speckle."""
    cfg = dit.config
    ph, pw = cfg.patch_size[1:]
    patch_dims = cfg.in_channels * ph * pw
    if cfg.dim < patch_dims or cfg.out_channels != cfg.in_channels:
        return
    q, _ = torch.linalg.qr(torch.randn(cfg.dim, patch_dims))  # orthonormal columns [dim, patch_dims]
    dit.patch_embedding.weight.copy_(q.view(cfg.dim, cfg.in_channels, 1, ph, pw))
    dit.patch_embedding.bias.zero_()
    # the head emits features in (ph, pw, channel) order, the patch embedding reads (channel, ph, pw)
    head = q.view(cfg.dim, cfg.in_channels, ph, pw).permute(2, 3, 1, 0).reshape(patch_dims, cfg.dim)
    dit.head.head.weight.copy_(head)
    dit.head.head.bias.zero_()
    dit.head.modulation.zero_()
    for layer in (dit.time_embedding[2], dit.time_projection[1]):
        layer.weight.zero_()
        layer.bias.zero_()
    for block in dit.blocks:
        for layer in (block.self_attn.o, block.cross_attn.o, block.ffn[2]):
            layer.weight.zero_()
            layer.bias.zero_()


DEFAULT_REWARDS = {"short": "procedural_frame", "long": "procedural_video"}


def engine_spec(model: TinyModel, description: str, training: dict, rewards: dict | None = None):
    from ..engine_format import EngineSpec

    return EngineSpec(model=model.dit.config, stream=model.stream, sampler=model.sampler,
                      text_encoder={"type": "tiny", "weights": "text_encoder.safetensors", **model.text_encoder.config()},
                      vae={"type": "space_to_depth", "factor": model.vae.spatial_factor}, fps=FPS, name="streamt1-tiny",
                      rewards=dict(rewards or DEFAULT_REWARDS), description=description, training=training)


def save_model_dir(model: TinyModel, out: Path, training: dict, rewards: dict | None = None) -> None:
    """Write streamt1.json, dit.safetensors and text_encoder.safetensors (each replaced atomically)."""
    from ..engine_format import DIT_WEIGHTS, save_weights, write_engine_spec

    out.mkdir(parents=True, exist_ok=True)
    size = model.stream.latent_height * model.vae.spatial_factor
    description = (f"Tiny causal Wan DiT trained on procedural videos of coloured shapes ({size}x{size}, {FPS} fps); "
                   "prompts like 'a red circle moving left on a blue background'.")
    # float16 halves the shipped size; the loaders cast back to the run dtype
    save_weights(out / DIT_WEIGHTS, model.dit.state_dict(), torch.float16)
    save_tiny_text_encoder(model.text_encoder, out / "text_encoder.safetensors.tmp")
    os.replace(out / "text_encoder.safetensors.tmp", out / "text_encoder.safetensors")
    write_engine_spec(out, engine_spec(model, description, training, rewards))


def stage_history(training: dict, init: Path | None, earlier: dict | None) -> dict:
    """The ``training`` record a model dir keeps: this run alone, or the stages of the ``init`` dir (its
    record ``earlier``) followed by this one, whose ``init`` names the stage it continues ("stage 1"), not a
    path on the training machine."""
    if init is None:
        return training
    earlier = earlier or {}
    stages = list(earlier["stages"]) if "stages" in earlier else [earlier] if earlier else []
    return {"stages": stages + [{**training, "init": f"stage {len(stages)}" if stages else str(init)}]}


class EMA:
    """Exponential moving average of all trainable weights (the shipped weights are the average)."""

    def __init__(self, model: TinyModel, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model)
        for p in self.params(self.shadow):
            p.requires_grad_(False)

    @staticmethod
    def params(model: TinyModel):
        return list(model.dit.parameters()) + list(model.text_encoder.parameters())

    @torch.no_grad()
    def update(self, model: TinyModel, step: int):
        decay = min(self.decay, (1 + step) / (10 + step))
        for avg, p in zip(self.params(self.shadow), self.params(model)):
            avg.lerp_(p, 1 - decay)


def validation_loss(model: TinyModel, batch, mask) -> float:
    """Loss on a fixed batch at each of the inference timesteps (same noise every time)."""
    frames, prompts, times = batch
    warped = inference_timesteps(model.sampler)
    losses = []
    with torch.no_grad():
        for t in warped:
            gen = torch.Generator().manual_seed(1234)
            steps = torch.full((frames.shape[0], frames.shape[1] // model.stream.chunk_frames), t)
            losses.append(training_loss(model, frames, prompts, times, gen, mask, steps,
                                        context_noise=False).item())
    return sum(losses) / len(losses)


def train(out: Path, minutes: float = 30.0, steps: int = 1800, batch: int = 16, lr: float = 2e-3,
          seed: int = 0, threads: int | None = None, save_minutes: float = 3.0, ema_decay: float = 0.995,
          log_every: int = 25, val_size: int = 32, rollout_prob: float = 0.0, rollout_after: float = 0.5,
          init: Path | None = None, clip_chunks: int = CLIP_CHUNKS, context_rollout_prob: float = 0.0,
          context_rollout_start: int = 1, motion_weight: float = 0.0, temporal_weight: float = 0.0,
          frame_size: int = FRAME_SIZE, vae_factor: int = VAE_FACTOR, dim: int = 256, ffn_dim: int = 512,
          num_layers: int = 3, num_heads: int = 4, hold_out: bool = False, rewards: dict | None = None,
          sampler_shift: float | None = None) -> dict:
    """Train (or continue from ``init``) and write the EMA weights to ``out``; the defaults are the v1
    stage-1 run. ``context_rollout_prob``: share of each batch that sees the model's own chunks as context
    (from ``rollout_after``, like ``rollout_prob``). ``clip_chunks``: chunks per training clip (a chunk
    sees the sink and the inference window before it). ``hold_out``: never train on the held-out scenes
    of ``procedural.HELD_OUT_SCENES``. The model's shapes and sampler are ignored with ``init`` (they come
    from there). ``sampler_shift``: the timestep shift of the model's few-step sampler, which the training
    timesteps follow and the model dir records (default: the init dir's, else the tiny sampler's 5).
    A lower shift ends the sampler at a lower noise level, where the last x0 estimate is sharper."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    require(clip_chunks >= 2, "clip_chunks must be >= 2")
    require(0.0 <= context_rollout_prob <= 1.0 and 0.0 <= rollout_prob <= 1.0, "rollout shares must be in [0, 1]")
    require(sampler_shift is None or sampler_shift > 0, f"sampler_shift must be > 0, got {sampler_shift}")
    start_model = load_tiny_model(init) if init is not None else None
    # read once: the init dir may be ``out`` itself, whose record the checkpoints below rewrite
    earlier = read_engine_spec(init).training if init is not None else None
    if start_model is not None:  # continue from an earlier model dir, in its shapes
        dit_config = start_model.dit.config
        frame_size = start_model.stream.latent_height * start_model.vae.spatial_factor
    else:
        dit_config = tiny_wan_config(dim, ffn_dim, num_heads, num_layers, vae_factor)
    model = build_tiny_model(dit_config, seed=seed, frame_size=frame_size)
    if start_model is not None:
        model.dit.load_state_dict(start_model.dit.state_dict())
        model.text_encoder.load_state_dict(start_model.text_encoder.state_dict())
        model.sampler = start_model.sampler
    else:
        pass_through_init(model.dit)
    if sampler_shift is not None:
        model.sampler = dataclasses.replace(model.sampler, shift=float(sampler_shift))
    for m in (model.dit, model.text_encoder):
        m.train()
    params = EMA.params(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA(model, ema_decay)
    cf = model.stream.chunk_frames
    data = ProceduralVideos(seed=seed, width=frame_size, height=frame_size, hold_out=hold_out)
    val_data = ProceduralVideos(seed=seed + 10_000, width=frame_size, height=frame_size, hold_out=hold_out)
    val_batch = val_data.streaming_batch(0, val_size, clip_chunks, cf)
    mask = teacher_forcing_mask(clip_chunks * cf, cf, model.frame_tokens, window_chunks=model.stream.window_pages)
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in params)
    print(f"tiny model: {n_params / 1e6:.2f} M parameters, {frame_size}x{frame_size}, clips of {clip_chunks} chunks, "
          f"batch {batch}, up to {steps} steps or {minutes} min, {threads} threads", flush=True)
    options = dict(motion_weight=motion_weight, temporal_weight=temporal_weight,
                   own_context_start=context_rollout_start)
    start = last_save = time.time()
    warmup = max(1, min(100, steps // 10))
    step, running, final_loss, stopped_by = 0, [], float("nan"), "steps"
    training = {}
    while True:
        elapsed = time.time() - start
        progress = max(step / steps, elapsed / (minutes * 60))
        if progress >= 1.0:
            stopped_by = "steps" if step >= steps else "time"
            break
        scale = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        frames, prompts, times = data.streaming_batch(step * batch, batch, clip_chunks, cf)
        rollout = progress >= rollout_after and bool(torch.rand((), generator=gen) < rollout_prob)
        own = None
        if context_rollout_prob > 0 and progress >= rollout_after:
            own = torch.rand(batch, generator=gen) < context_rollout_prob
        loss = training_loss(model, frames, prompts, times, gen, mask, rollout=rollout, own_context=own, **options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(model, step)
        running.append(loss.item())
        step += 1
        if step % log_every == 0:
            avg = sum(running) / len(running)
            final_loss, running = avg, []
            eta = (time.time() - start) * (1 - progress) / max(progress, 1e-6)
            print(f"step {step:5d}  loss {avg:.4f}  lr {lr * scale:.2e}  {progress * 100:5.1f}%  "
                  f"elapsed {elapsed / 60:5.1f} min  eta {eta / 60:5.1f} min", flush=True)
        if time.time() - last_save > save_minutes * 60:
            training = {"steps": step, "seed": seed, "batch": batch, "train_loss": round(final_loss, 5)}
            save_model_dir(ema.shadow, out, stage_history(training, init, earlier), rewards)
            last_save = time.time()
            print(f"saved checkpoint at step {step} to {out}", flush=True)
    if math.isnan(final_loss) and running:  # a run shorter than log_every: no log line yet
        final_loss = sum(running) / len(running)
    val = validation_loss(ema.shadow, val_batch, mask)
    minutes_used = (time.time() - start) / 60
    training = {"steps": step, "seed": seed, "batch": batch, "lr": lr, "ema_decay": ema_decay,
                "rollout_prob": rollout_prob, "rollout_after": rollout_after,
                "train_loss": round(final_loss, 5), "val_loss_at_inference_steps": round(val, 5),
                "minutes": round(minutes_used, 1), "threads": threads, "stopped_by": stopped_by,
                "init": str(init) if init is not None else None}
    v2_options = {"clip_chunks": clip_chunks, "context_rollout_prob": context_rollout_prob,
                  "context_rollout_start": context_rollout_start, "motion_weight": motion_weight,
                  "temporal_weight": temporal_weight, "hold_out": hold_out, "sampler_shift": model.sampler.shift}
    v1_values = {"clip_chunks": CLIP_CHUNKS, "context_rollout_prob": 0.0, "context_rollout_start": 1,
                 "motion_weight": 0.0, "temporal_weight": 0.0, "hold_out": False,
                 "sampler_shift": tiny_sampler_config().shift}
    if v2_options != v1_values:  # a v1 run records exactly what it always recorded
        training.update(v2_options)
    save_model_dir(ema.shadow, out, stage_history(training, init, earlier), rewards)
    print(f"done: {step} steps in {minutes_used:.1f} min (stopped by {stopped_by}), train loss {final_loss:.4f}, "
          f"validation loss (EMA, inference steps) {val:.4f}; wrote {out}", flush=True)
    return training


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the embedded tiny streaming video model on procedural videos.")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write (engine format)")
    parser.add_argument("--recipe", default=None, help="a named recipe (v1, v2) whose stage sets the defaults")
    parser.add_argument("--stage", type=int, default=1,
                        help="stage of --recipe (every stage after the first needs --init)")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock cap")
    parser.add_argument("--steps", type=int, default=1800, help="optimizer steps (stops at steps or minutes)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--save-minutes", type=float, default=3.0, help="rewrite the model dir this often")
    parser.add_argument("--rollout-prob", type=float, default=0.0,
                        help="share of steps trained on the sampler's own inputs (experimental, off by default)")
    parser.add_argument("--rollout-after", type=float, default=0.5, help="progress (0-1) where rollouts may start")
    parser.add_argument("--context-rollout-prob", type=float, default=0.0,
                        help="share of each batch that sees the model's own chunks as context")
    parser.add_argument("--context-rollout-start", type=int, default=1,
                        help="earliest inference step index the own-context chunks start from (0 = pure noise)")
    parser.add_argument("--clip-chunks", type=int, default=CLIP_CHUNKS, help="chunks per training clip")
    parser.add_argument("--motion-weight", type=float, default=0.0, help="loss weight of pixels that change")
    parser.add_argument("--temporal-weight", type=float, default=0.0,
                        help="weight of the loss on frame-to-frame change (chunk boundaries included)")
    parser.add_argument("--hold-out", action=argparse.BooleanOptionalAction, default=False,
                        help="keep the benchmark's held-out scenes out of the training data")
    parser.add_argument("--frame-size", type=int, default=FRAME_SIZE, help="frame height and width in pixels")
    parser.add_argument("--vae-factor", type=int, default=VAE_FACTOR, help="space-to-depth factor")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3, dest="num_layers")
    parser.add_argument("--heads", type=int, default=4, dest="num_heads")
    parser.add_argument("--init", type=Path, default=None, help="start from this model dir instead of scratch")
    parser.add_argument("--sampler-shift", type=float, default=None,
                        help="timestep shift of the model's sampler (default: the init dir's, else 5)")
    first, _ = parser.parse_known_args(argv)
    rewards = None
    if first.recipe is not None:
        stage = recipe_stage(first.recipe, first.stage)
        rewards = stage.pop("rewards", None)
        parser.set_defaults(**stage)
    args = parser.parse_args(argv)
    if args.recipe is not None and args.stage > 1 and args.init is None:
        parser.error(f"stage {args.stage} of recipe {args.recipe} continues an earlier stage: pass --init DIR")
    options = {k: v for k, v in vars(args).items() if k not in ("out", "recipe", "stage", "save_minutes")}
    train(args.out, save_minutes=args.save_minutes, rewards=rewards, **options)


if __name__ == "__main__":
    main()
