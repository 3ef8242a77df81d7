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
so an interrupted run still leaves usable weights. The shipped weights are the EMA of two runs (about 65
minutes on 2 cores in all): the default run, then a second one started from it (``--init``)::

    python -m streamt1_engine.tiny.train --out stage1
    python -m streamt1_engine.tiny.train --out stage2 --init stage1 --seed 1 --lr 1e-3 --steps 3000 --minutes 60
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.wan import ChunkAttention, TextContext
from .model import (
    FPS,
    VAE_FACTOR,
    TinyModel,
    build_tiny_model,
    inference_timesteps,
    load_tiny_model,
    teacher_forcing_mask,
    tiny_sampler_config,
)
from .procedural import ProceduralVideos, contiguous_chunks
from .text_encoder import save_tiny_text_encoder

CLIP_CHUNKS = 4


def sample_timesteps(batch: int, chunks: int, gen: torch.Generator, shift: float = 5.0,
                     inference_prob: float = 0.75) -> torch.Tensor:
    """[batch, chunks] training timesteps in (0, 1000]: the shifted schedule, biased to the inference steps."""
    sampler = tiny_sampler_config()
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
                  fg_weight: float = 4.0, first_chunk_weight: float = 2.0, rollout: bool = False) -> torch.Tensor:
    """Flow-matching loss of the noisy chunks given clean context (teacher forcing).

    With ``rollout`` the noisy input is the one the few-step sampler really meets at a random inference
    step: reached by the model's own earlier steps (no gradient), i.e. built from its own imperfect x0
    estimates rather than the truth; the target still points at the true x0, flow = (x_t - x0) / sigma.
    The first chunk, generated from the prompt alone, is the hardest and counts ``first_chunk_weight`` times.
    """
    cf = model.stream.chunk_frames
    x0 = model.vae.encode(frames)  # [B, C, F, h, w] in [-1, 1]
    b, _, num_frames = x0.shape[:3]
    chunks = num_frames // cf
    context = x0
    if context_noise:  # robustness to the imperfect context the model itself produces at inference
        level = torch.rand(b, 1, 1, 1, 1, generator=gen) * 0.1 * (torch.rand(b, 1, 1, 1, 1, generator=gen) < 0.5)
        context = x0 + level * torch.randn(x0.shape, generator=gen)
    text = text_context(model, prompts)
    attn = ChunkAttention.dense(b, x0.device, mask, frame_positions=times.repeat(1, 2))
    zeros = torch.zeros(b, num_frames)

    def flow_of(x_t, t_frames):
        inputs = torch.cat([context, x_t], dim=2)
        return model.dit(inputs, torch.cat([zeros, t_frames], dim=1), text, attn)[:, :, num_frames:].float()

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
            timesteps = sample_timesteps(b, chunks, gen)
        t_frames = timesteps.repeat_interleave(cf, dim=1)  # [B, F]
        s = (t_frames / 1000.0)[:, None, :, None, None]
        x_t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen)
    s = (t_frames / 1000.0)[:, None, :, None, None]
    err = (flow_of(x_t, t_frames) - (x_t - x0) / s).pow(2).mean(dim=1)  # [B, F, h, w]
    err = (err * object_weight(frames, model.vae.spatial_factor, fg_weight)).mean(dim=(2, 3))
    weight = contiguous_chunks(times, cf).float()  # after a jump: context only
    weight[:, 0] *= first_chunk_weight
    weight = weight.repeat_interleave(cf, dim=1)
    return (err * weight).sum() / weight.sum()


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


def engine_spec(model: TinyModel, description: str, training: dict):
    from ..engine_format import EngineSpec

    return EngineSpec(model=model.dit.config, stream=model.stream, sampler=model.sampler,
                      text_encoder={"type": "tiny", "weights": "text_encoder.safetensors", **model.text_encoder.config()},
                      vae={"type": "space_to_depth", "factor": VAE_FACTOR}, fps=FPS, name="streamt1-tiny",
                      rewards={"short": "procedural_frame", "long": "procedural_video"}, description=description,
                      training=training)


def save_model_dir(model: TinyModel, out: Path, training: dict) -> None:
    """Write streamt1.json, dit.safetensors and text_encoder.safetensors (each replaced atomically)."""
    from ..engine_format import DIT_WEIGHTS, save_weights, write_engine_spec

    out.mkdir(parents=True, exist_ok=True)
    description = ("Tiny causal Wan DiT trained on procedural videos of coloured shapes (32x32, 8 fps); "
                   "prompts like 'a red circle moving left on a blue background'.")
    # float16 halves the shipped size; the loaders cast back to the run dtype
    save_weights(out / DIT_WEIGHTS, model.dit.state_dict(), torch.float16)
    save_tiny_text_encoder(model.text_encoder, out / "text_encoder.safetensors.tmp")
    os.replace(out / "text_encoder.safetensors.tmp", out / "text_encoder.safetensors")
    write_engine_spec(out, engine_spec(model, description, training))


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
          init: Path | None = None) -> dict:
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_tiny_model(seed=seed)
    if init is not None:  # continue from an earlier model dir
        start_model = load_tiny_model(init)
        model.dit.load_state_dict(start_model.dit.state_dict())
        model.text_encoder.load_state_dict(start_model.text_encoder.state_dict())
    else:
        pass_through_init(model.dit)
    for m in (model.dit, model.text_encoder):
        m.train()
    params = EMA.params(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA(model, ema_decay)
    data = ProceduralVideos(seed=seed)
    val_batch = ProceduralVideos(seed=seed + 10_000).streaming_batch(0, val_size, CLIP_CHUNKS,
                                                                             model.stream.chunk_frames)
    mask = teacher_forcing_mask(CLIP_CHUNKS * model.stream.chunk_frames, model.stream.chunk_frames,
                                model.frame_tokens)
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in params)
    print(f"tiny model: {n_params / 1e6:.2f} M parameters, batch {batch}, up to {steps} steps or {minutes} min, "
          f"{threads} threads", flush=True)
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
        frames, prompts, times = data.streaming_batch(step * batch, batch, CLIP_CHUNKS, model.stream.chunk_frames)
        rollout = progress >= rollout_after and bool(torch.rand((), generator=gen) < rollout_prob)
        loss = training_loss(model, frames, prompts, times, gen, mask, rollout=rollout)
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
            save_model_dir(ema.shadow, out, training)
            last_save = time.time()
            print(f"saved checkpoint at step {step} to {out}", flush=True)
    val = validation_loss(ema.shadow, val_batch, mask)
    minutes_used = (time.time() - start) / 60
    training = {"steps": step, "seed": seed, "batch": batch, "lr": lr, "ema_decay": ema_decay,
                "rollout_prob": rollout_prob, "rollout_after": rollout_after,
                "train_loss": round(final_loss, 5), "val_loss_at_inference_steps": round(val, 5),
                "minutes": round(minutes_used, 1), "threads": threads, "stopped_by": stopped_by,
                "init": str(init) if init is not None else None}
    save_model_dir(ema.shadow, out, training)
    print(f"done: {step} steps in {minutes_used:.1f} min (stopped by {stopped_by}), train loss {final_loss:.4f}, "
          f"validation loss (EMA, inference steps) {val:.4f}; wrote {out}", flush=True)
    return training


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the embedded tiny streaming video model on procedural videos.")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write (engine format)")
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
    parser.add_argument("--init", type=Path, default=None, help="start from this model dir instead of scratch")
    args = parser.parse_args(argv)
    train(args.out, args.minutes, args.steps, args.batch, args.lr, args.seed, args.threads, args.save_minutes,
          rollout_prob=args.rollout_prob, rollout_after=args.rollout_after, init=args.init)


if __name__ == "__main__":
    main()
