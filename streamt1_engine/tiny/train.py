"""Train the embedded tiny streaming video model on procedural videos (CPU, minutes).

    python -m streamt1_engine.tiny.train --out DIR [--minutes 25 --steps 2400 --seed 0]

A causal Wan DiT and the tiny text encoder learn jointly by flow matching with teacher forcing: each
sample is [clean frames at timestep 0 | noisy frames], every noisy chunk of 3 frames has its own
timestep and attends to the clean chunks before it and to itself. Clips are 5 chunks; half of them jump
in time after the first chunk, as the streaming cache does once the window has moved away from the sink
(the chunk right after such a jump is context only, no loss). Timesteps follow the sampler's shifted
schedule, half of them exactly the 4 warped steps used at inference. Training stops at ``--steps`` or
``--minutes``, whichever comes first (the learning-rate schedule follows the nearer one), and the model
directory is rewritten every few minutes so an interrupted run still leaves usable weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from ..model.wan import ChunkAttention, TextContext
from .model import (FPS, VAE_FACTOR, TinyModel, build_tiny_model, teacher_forcing_mask, tiny_sampler_config,
                    tiny_stream_config, warp_timesteps)
from .procedural import ProceduralVideos
from .text_encoder import save_tiny_text_encoder

CLIP_CHUNKS = 5


def sample_timesteps(batch: int, chunks: int, gen: torch.Generator, shift: float = 5.0,
                     inference_prob: float = 0.5) -> torch.Tensor:
    """[batch, chunks] training timesteps in (0, 1000]: the shifted schedule, biased to the inference steps."""
    sampler = tiny_sampler_config()
    warped = torch.tensor(warp_timesteps(sampler.denoising_steps, sampler.shift, sampler.num_train_timesteps))
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
                  gapped: torch.Tensor, gen: torch.Generator, mask: torch.Tensor,
                  timesteps: torch.Tensor | None = None, context_noise: bool = True) -> torch.Tensor:
    cf = model.stream.chunk_frames
    x0 = model.vae.encode(frames)  # [B, C, F, h, w] in [-1, 1]
    b, _, num_frames = x0.shape[:3]
    chunks = num_frames // cf
    if timesteps is None:
        timesteps = sample_timesteps(b, chunks, gen)
    t_frames = timesteps.repeat_interleave(cf, dim=1)  # [B, F]
    s = (t_frames / 1000.0)[:, None, :, None, None]
    noise = torch.randn(x0.shape, generator=gen)
    x_t = (1 - s) * x0 + s * noise
    context = x0
    if context_noise:  # robustness to the imperfect context the model itself produces at inference
        level = torch.rand(b, 1, 1, 1, 1, generator=gen) * 0.1 * (torch.rand(b, 1, 1, 1, 1, generator=gen) < 0.5)
        context = x0 + level * torch.randn(x0.shape, generator=gen)
    inputs = torch.cat([context, x_t], dim=2)
    all_t = torch.cat([torch.zeros_like(t_frames), t_frames], dim=1)
    positions = times.repeat(1, 2)
    flow = model.dit(inputs, all_t, text_context(model, prompts),
                     ChunkAttention.dense(b, inputs.device, mask, frame_positions=positions))[:, :, num_frames:]
    err = (flow.float() - (noise - x0)).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    weight = torch.ones_like(err)
    weight[gapped, cf: 2 * cf] = 0.0  # the chunk right after a jump in time is context only
    return (err * weight).sum() / weight.sum()


def engine_config(model: TinyModel, description: str, training: dict) -> dict:
    stream = model.stream
    sampler = model.sampler
    return {
        "format": "streamt1-engine",
        "version": 1,
        "model": model.dit.config.to_dict(),
        "stream": {"chunk_frames": stream.chunk_frames, "window_frames": stream.window_frames,
                   "sink_frames": stream.sink_frames, "max_sink_frames": stream.max_sink_frames,
                   "latent_height": stream.latent_height, "latent_width": stream.latent_width},
        "sampler": {"denoising_steps": list(sampler.denoising_steps), "shift": sampler.shift},
        "text_encoder": {"type": "tiny", "weights": "text_encoder.safetensors", **model.text_encoder.config()},
        "vae": {"type": "space_to_depth", "factor": VAE_FACTOR},
        "fps": FPS,
        "description": description,
        "training": training,
    }


def save_model_dir(model: TinyModel, out: Path, training: dict) -> None:
    """Write streamt1.json, dit.safetensors and text_encoder.safetensors (each replaced atomically)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    description = ("Tiny causal Wan DiT trained on procedural videos of coloured shapes (32x32, 8 fps); "
                   "prompts like 'a red circle moving left on a blue background'.")
    state = {k: v.detach().contiguous().cpu() for k, v in model.dit.state_dict().items()}
    save_file(state, str(out / "dit.safetensors.tmp"))
    os.replace(out / "dit.safetensors.tmp", out / "dit.safetensors")
    save_tiny_text_encoder(model.text_encoder, out / "text_encoder.safetensors.tmp")
    os.replace(out / "text_encoder.safetensors.tmp", out / "text_encoder.safetensors")
    (out / "streamt1.json.tmp").write_text(json.dumps(engine_config(model, description, training), indent=2) + "\n")
    os.replace(out / "streamt1.json.tmp", out / "streamt1.json")


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
    frames, prompts, times, gapped = batch
    warped = warp_timesteps(model.sampler.denoising_steps, model.sampler.shift)
    losses = []
    with torch.no_grad():
        for t in warped:
            gen = torch.Generator().manual_seed(1234)
            steps = torch.full((frames.shape[0], frames.shape[1] // model.stream.chunk_frames), t)
            losses.append(training_loss(model, frames, prompts, times, gapped, gen, mask, steps,
                                        context_noise=False).item())
    return sum(losses) / len(losses)


def train(out: Path, minutes: float = 25.0, steps: int = 2400, batch: int = 16, lr: float = 1e-3,
          seed: int = 0, threads: int | None = None, save_minutes: float = 3.0, ema_decay: float = 0.998,
          log_every: int = 25) -> dict:
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_tiny_model(seed=seed)
    for m in (model.dit, model.text_encoder):
        m.train()
    params = EMA.params(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA(model, ema_decay)
    data = ProceduralVideos(seed=seed)
    val_batch = ProceduralVideos(seed=seed + 10_000).streaming_batch(0, 32, CLIP_CHUNKS, model.stream.chunk_frames)
    mask = teacher_forcing_mask(CLIP_CHUNKS * model.stream.chunk_frames, model.stream.chunk_frames,
                                model.frame_tokens)
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in params)
    print(f"tiny model: {n_params / 1e6:.2f} M parameters, batch {batch}, up to {steps} steps or {minutes} min, "
          f"{threads} threads", flush=True)
    start = last_save = time.time()
    warmup = min(100, steps // 10)
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
        frames, prompts, times, gapped = data.streaming_batch(step * batch, batch, CLIP_CHUNKS,
                                                              model.stream.chunk_frames)
        loss = training_loss(model, frames, prompts, times, gapped, gen, mask)
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
                "train_loss": round(final_loss, 5), "val_loss_at_inference_steps": round(val, 5),
                "minutes": round(minutes_used, 1), "threads": threads, "stopped_by": stopped_by}
    save_model_dir(ema.shadow, out, training)
    print(f"done: {step} steps in {minutes_used:.1f} min (stopped by {stopped_by}), train loss {final_loss:.4f}, "
          f"validation loss (EMA, inference steps) {val:.4f}; wrote {out}", flush=True)
    return training


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the embedded tiny streaming video model on procedural videos.")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write (engine format)")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget")
    parser.add_argument("--steps", type=int, default=2400, help="optimizer steps (the run stops at whichever comes first)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--save-minutes", type=float, default=3.0, help="rewrite the model dir this often")
    args = parser.parse_args(argv)
    train(args.out, args.minutes, args.steps, args.batch, args.lr, args.seed, args.threads, args.save_minutes)


if __name__ == "__main__":
    main()
