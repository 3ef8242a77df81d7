"""Causal Wan2.1 DiT that denoises one chunk per call against a paged, shared KV cache.

Parameter names follow the original Wan code (the names Self-Forcing, CausVid and LongLive checkpoints
use under their ``model.`` prefix), so loading those is a prefix strip; diffusers names are mapped in
``loading.py``. The model holds no cache state: the pool, page tables and write targets come in a
``ChunkAttention`` per call, which keeps N candidates of one chunk a single batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache.kv_pool import KVPool  # also importable from here
from ..config import WanConfig
from ..errors import require
from ..kernels.paged_attention import paged_attention
from ..kernels.qk_norm_rope import qk_norm_rope
from ..kernels.residual_norm import residual_norm
from .rope import Rope3D


@dataclass
class ChunkAttention:
    """What one batched chunk forward reads and writes in the cache (all device tensors).

    page_table [N, M] / num_pages [N]: cached pages each candidate attends to (sink first, then window);
    frame_start [N]: latent-frame index of the chunk; write_pages [N] or None: pages that receive the
    chunk's keys (rotated at the chunk's positions, which become the page's) and values (the clean context
    pass). ``max_pages``: host int >= every ``num_pages`` entry (the longest beam), so the torch path reads
    only the slots that can be valid; None (e.g. inside a captured CUDA graph, where the counts change
    between replays) reads the full table width. ``row_pages``: host copy of ``num_pages`` (eager calls only);
    the torch path then attends each row over exactly its own pages, so a row's result does not depend on
    the other rows (several streams in one batch give each stream's own results).
    """

    pool: KVPool | None
    page_table: torch.Tensor
    num_pages: torch.Tensor
    frame_start: torch.Tensor
    write_pages: torch.Tensor | None = None
    backend: str = "torch"
    dense_mask: torch.Tensor | None = None  # [L, L] bool, only without a pool (training / references)
    frame_positions: torch.Tensor | None = None  # [N, F] explicit RoPE frame positions (overrides frame_start)
    max_pages: int | None = None
    row_pages: tuple[int, ...] | None = None

    @classmethod
    def dense(cls, batch: int, device, mask: torch.Tensor | None = None, frame_start: int = 0,
              frame_positions: torch.Tensor | None = None) -> "ChunkAttention":
        """Attention among the call's own tokens only (no cache), optionally masked and with explicit
        frame positions (e.g. teacher forcing: clean frames then noisy frames at the same positions)."""
        empty = torch.zeros(batch, 0, dtype=torch.int32, device=device)
        start = torch.full((batch,), frame_start, dtype=torch.long, device=device)
        return cls(None, empty, torch.zeros(batch, dtype=torch.int32, device=device), start, dense_mask=mask,
                   frame_positions=frame_positions)


@dataclass
class ChunkRope:
    """RoPE of the chunk's own tokens (cos/sin [N, L, D/2]); cached pages need none (stored rotated)."""

    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class TextContext:
    """Cross-attention keys/values of one prompt for every layer, computed once per prompt."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer ([B, Lt, H, D], [B, Lt, H, D]), B = 1 or N


def glue_backend(attn: "ChunkAttention") -> str:
    """Backend of the elementwise glue (norms, modulation, gated residuals): the fused Triton kernels where
    the attention runs a Triton kernel (CUDA, or the interpreter in tests), plain PyTorch elsewhere."""
    return "triton" if attn.backend.startswith("triton") else "torch"


_GEMM_GELU_IS_TANH: dict[str, bool] = {"meta": True}  # meta: the census counts what CUDA launches


def gemm_gelu_is_tanh(device: torch.device) -> bool:
    """Whether ``torch._addmm_activation(..., use_gelu=True)`` applies the tanh GELU on ``device``.

    cuBLASLt's GELU epilogue (and PyTorch's CUDA fallback) is the tanh approximation; the CPU kernel applies
    the exact erf GELU. Probed once per device rather than assumed, on a product that is exact even in TF32
    (small integers and eighths); not while a CUDA graph is being captured (a probe needs the host), where
    the answer is "no" until the next eager call.
    """
    key = str(device)
    if key not in _GEMM_GELU_IS_TANH:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-1, 2, (8, 16), generator=gen).float()
        w = torch.randint(-2, 3, (16, 16), generator=gen).float() / 8
        b = torch.linspace(-2.5, 2.5, 16)
        a, w, b = a.to(device), w.to(device), b.to(device)
        fused = torch._addmm_activation(b, a, w, use_gelu=True)
        pre = torch.addmm(b, a, w)
        tanh_err = (fused - F.gelu(pre, approximate="tanh")).abs().max()
        erf_err = (fused - F.gelu(pre)).abs().max()
        _GEMM_GELU_IS_TANH[key] = bool(tanh_err < erf_err)
    return _GEMM_GELU_IS_TANH[key]


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, as Wan does."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class AttentionProjections(nn.Module):
    """q/k/v/o projections with RMS q/k norms across all heads (Wan's self- and cross-attention)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.eps = cfg.eps
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)


class SelfAttention(AttentionProjections):
    """Attention of a chunk to its candidate's cached pages and to itself."""

    def forward(self, x, rope: ChunkRope, attn: ChunkAttention, layer: int):
        backend = "triton" if attn.backend == "triton" else "torch"
        q_rot, _, k_rot = qk_norm_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight, self.eps,
                                       self.num_heads, rope.cos, rope.sin, backend=backend)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        pool = attn.pool
        if attn.write_pages is not None:
            require(pool is not None, "a KV pool is needed to write the context pass")
            pool.k[layer].index_copy_(0, attn.write_pages, k_rot.to(pool.k.dtype))
            pool.v[layer].index_copy_(0, attn.write_pages, v.to(pool.v.dtype))
        if pool is None:
            out = F.scaled_dot_product_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2).to(q_rot.dtype),
                                                 v.transpose(1, 2), attn_mask=attn.dense_mask)
            out = out.transpose(1, 2)
        else:
            out = paged_attention(q_rot, k_rot, v, pool.k[layer], pool.v[layer], attn.page_table, attn.num_pages,
                                  backend=attn.backend, max_pages=attn.max_pages, row_pages=attn.row_pages)
        return self.o(out.flatten(2))


class CrossAttention(AttentionProjections):
    """Attention to the prompt, whose keys/values are computed once per prompt."""

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor], glue: str = "torch"):
        n = x.shape[0]
        if glue == "torch":
            q = self.norm_q(self.q(x))
        else:
            q = residual_norm(self.q(x), norm="rms", weight=self.norm_q.weight, eps=self.norm_q.eps, backend=glue)[1]
        q = q.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k, v = (t.expand(n, -1, -1, -1).transpose(1, 2) for t in kv)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, text_kv, rope: ChunkRope, attn: ChunkAttention, layer: int):
        # e: [N, 1 or L, 6, dim] -> six [N, 1 or L, dim] modulations
        glue = glue_backend(attn)
        if glue != "torch":
            return self._forward_fused(x, e, text_kv, rope, attn, layer, glue)
        mods = (self.modulation.float()[:, None] + e).unbind(2)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = (self.norm1(x) * (1 + scale1) + shift1).to(x.dtype)
        y = self.self_attn(h, rope, attn, layer)
        x = (x.float() + y.float() * gate1).to(x.dtype)
        x = x + self.cross_attn(self.norm3(x).to(x.dtype), text_kv)
        h = (self.norm2(x) * (1 + scale2) + shift2).to(x.dtype)
        x = (x.float() + self.ffn(h).float() * gate2).to(x.dtype)
        return x

    def _forward_fused(self, x, e, text_kv, rope: ChunkRope, attn: ChunkAttention, layer: int, glue: str):
        """The same block with its glue in five fused launches (see ``kernels/residual_norm``; four around
        the norms, one for the cross-attention q norm) and the FFN's GELU in the first GEMM's epilogue; the
        modulations are (learned row, timestep row) pairs summed in float32 inside the kernels, as the
        unfused path sums them."""
        shift1, scale1, gate1, shift2, scale2, gate2 = ((self.modulation[:, i], e[:, :, i]) for i in range(6))
        _, h = residual_norm(x, norm="layer", scale=scale1, shift=shift1, eps=self.norm1.eps, backend=glue)
        y = self.self_attn(h, rope, attn, layer)
        if isinstance(self.norm3, nn.LayerNorm):
            x, h = residual_norm(x, y, gate1, norm="layer", weight=self.norm3.weight, bias=self.norm3.bias,
                                 eps=self.norm3.eps, backend=glue)
        else:
            x, h = residual_norm(x, y, gate1, norm="none", backend=glue)
        y = self.cross_attn(h, text_kv, glue)
        x, h = residual_norm(x, y, norm="layer", scale=scale2, shift=shift2, eps=self.norm2.eps, backend=glue)
        x, _ = residual_norm(x, self._ffn_gelu_epilogue(h), gate2, norm="none", backend=glue)
        return x

    def _ffn_gelu_epilogue(self, h: torch.Tensor) -> torch.Tensor:
        """``self.ffn(h)`` with bias + tanh-GELU in the first GEMM's epilogue (cuBLASLt on CUDA), where the
        device's ``_addmm_activation`` computes Wan's tanh GELU; a GEMM and a GELU launch elsewhere."""
        fc1, fc2 = self.ffn[0], self.ffn[2]
        flat = h.flatten(0, 1)
        if gemm_gelu_is_tanh(flat.device):
            hidden = torch._addmm_activation(fc1.bias, flat, fc1.weight.t(), use_gelu=True)
        else:
            hidden = F.gelu(F.linear(flat, fc1.weight, fc1.bias), approximate="tanh")
        return fc2(hidden).view(*h.shape[:-1], -1)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, glue: str = "torch"):
        # e: [N, 1 or L, dim]
        if glue != "torch":
            rows = self.modulation
            _, h = residual_norm(x, norm="layer", scale=(rows[:, 1], e), shift=(rows[:, 0], e), eps=self.norm.eps,
                                 backend=glue)
            return self.head(h)
        shift, scale = (self.modulation.float()[:, None] + e.float()[:, :, None]).unbind(2)
        return self.head((self.norm(x) * (1 + scale) + shift).to(x.dtype))


class CausalWanDiT(nn.Module):
    def __init__(self, cfg: WanConfig, max_frames: int = 4096):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        self._max_frames = max_frames
        self._rope: Rope3D | None = None

    @property
    def rope(self) -> Rope3D:
        device = self.patch_embedding.weight.device
        if self._rope is None or self._rope.frame_cos.device != device:
            self._rope = Rope3D(self.config.head_dim, self.config.rope_theta, self._max_frames, device=device)
        return self._rope

    @torch.no_grad()
    def encode_text(self, text_states: torch.Tensor) -> TextContext:
        """text_states [B, Lt, text_dim] (already zero-padded to text_len) -> per-layer cross K/V."""
        dtype = self.patch_embedding.weight.dtype
        context = self.text_embedding(text_states.to(dtype))
        return TextContext([blk.cross_attn.text_kv(context) for blk in self.blocks])

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: TextContext,
                attn: ChunkAttention) -> torch.Tensor:
        """latents [N, C, F, H, W], timestep [N] or per frame [N, F] -> predicted flow, same shape.

        One chunk against the cache in ``attn``; with ``ChunkAttention.dense`` and a block-causal mask the
        same call runs several chunks at once (training, reference checks).
        """
        cfg = self.config
        n, c, frames, height, width = latents.shape
        pt, ph, pw = cfg.patch_size
        require(c == cfg.in_channels, f"latents have {c} channels, the model expects {cfg.in_channels}")
        require(height % ph == 0 and width % pw == 0,
                f"latent size {height}x{width} is not divisible by the patch size {ph}x{pw}")
        grid_h, grid_w = height // ph, width // pw
        dtype = self.patch_embedding.weight.dtype
        glue = glue_backend(attn)
        if glue == "torch" and latents.device.type == "cpu" and n > 1:
            # one row at a time: the CPU convolution's bits depend on the batch size (see ``_timestep_mlp``)
            x = torch.cat([self.patch_embedding(row.to(dtype)) for row in latents.split(1)]).flatten(2).transpose(1, 2)
        elif glue == "torch":
            x = self.patch_embedding(latents.to(dtype)).flatten(2).transpose(1, 2)
        else:
            x = self._patch_embedding_gemm(latents.to(dtype))
        timestep = timestep.to(x.device)
        per_frame = timestep.dim() == 2
        t_flat = timestep.reshape(-1)
        e, e_blocks = self._timestep_mlp(t_flat, dtype)
        e_blocks = e_blocks.unflatten(-1, (6, cfg.dim)).float()
        if per_frame:
            e = e.view(n, frames, -1).repeat_interleave(grid_h * grid_w, dim=1)
            e_blocks = e_blocks.view(n, frames, 6, cfg.dim).repeat_interleave(grid_h * grid_w, dim=1)
        else:
            e, e_blocks = e[:, None], e_blocks[:, None]
        tables = self.rope
        if attn.frame_positions is not None:
            cos, sin = tables.token_tables(attn.frame_positions.to(x.device), grid_h, grid_w)
        else:
            cos, sin = tables.chunk_tables(attn.frame_start.to(x.device), frames, grid_h, grid_w)
        rope = ChunkRope(cos, sin)
        for layer, block in enumerate(self.blocks):
            x = block(x, e_blocks, text.kv[layer], rope, attn, layer)
        out = self.head(x, e, glue)
        out = out.view(n, frames, grid_h, grid_w, pt, ph, pw, cfg.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(n, cfg.out_channels, frames * pt, height, width)
        return out

    def _timestep_mlp(self, t_flat: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep embedding and its six block modulations. On CPU one row at a time: GEMMs of a few rows pick
        kernels by the row count, so a batched call would make a candidate's bits depend on how many others
        share its forward (several streams batched must equal each alone); the token GEMMs are not affected."""
        def mlp(t):
            e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t).to(dtype))
            return e, self.time_projection(e)

        if t_flat.device.type != "cpu" or t_flat.shape[0] == 1:
            return mlp(t_flat)
        rows = [mlp(t_flat[i:i + 1]) for i in range(t_flat.shape[0])]
        return torch.cat([e for e, _ in rows]), torch.cat([p for _, p in rows])

    def _patch_embedding_gemm(self, latents: torch.Tensor) -> torch.Tensor:
        """The patch embedding as one GEMM over patchified latents: tokens come out contiguous [N, L, dim]
        (the convolution's [N, dim, L] would need a transposing copy of the whole stream for the fused glue)."""
        conv = self.patch_embedding
        n, c, frames, height, width = latents.shape
        pt, ph, pw = self.config.patch_size
        patches = latents.view(n, c, frames // pt, pt, height // ph, ph, width // pw, pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, -1, c * pt * ph * pw)
        return F.linear(patches, conv.weight.flatten(1), conv.bias)
