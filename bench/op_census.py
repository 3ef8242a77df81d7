"""What does one eager forward of one chunk launch, and how many bytes do its non-GEMM kernels move?

Runs the DiT on the ``meta`` device (no GPU, no memory, seconds at full Wan2.1-1.3B size) under a
``TorchDispatchMode`` that records every ATen op the forward issues, and a ``TorchFunctionMode`` that sees
``scaled_dot_product_attention`` as the one attention launch it is on CUDA (on meta it would decompose).

What counts:

- **launches**: one per ATen op that computes something (views, reshapes that alias and ``empty`` are free);
  one per call of the engine's own Triton kernels. A few ATen ops launch two kernels on CUDA; that is not
  modelled.
- **bytes**: what each launch must at least read and write: every input and output once, a broadcast
  (stride-0) dimension once, an ``index_copy_`` only its source rows. The paged-attention kernel reads the
  distinct pages of the page table (``unique_pages``), not the whole pool.
- **GEMM FLOPs**: 2 M N K of every ``mm``/``addmm``/``bmm``/convolution; attention FLOPs apart.

The engine's Triton kernels cannot run on meta, so the census *forces the CUDA dispatch*: the chunk's
``ChunkAttention.backend`` is ``triton`` (which is what selects the fused kernels on a GPU) and the kernel
entry points the model calls (``FUSED_ENTRY_POINTS``) are replaced, for the duration of the census, by
stand-ins that record one launch of that kernel and return outputs of the right shape, computed on meta
by the torch reference with the census paused. ``--paths unfused`` counts the plain-PyTorch path of every op.

    python bench/op_census.py                      # 1.3B, N = 1 and 4, fused and unfused
    python bench/op_census.py --tiny --n 1 --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, _git_commit, markdown_table, model_config, stream_config  # noqa: E402

aten = torch.ops.aten

GEMM_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten._addmm_activation.default, aten.convolution.default}
# Ops that allocate or alias without a kernel of their own.
FREE_OPS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
            aten.new_empty.default, aten.new_empty_strided.default, aten._unsafe_view.default,
            aten.lift_fresh.default, aten.detach.default}
# Names in streamt1_engine.model.wan that call a fused Triton kernel when given a non-torch backend.
FUSED_ENTRY_POINTS = ("paged_attention", "qk_norm_rope", "residual_norm")
ATTENTION_KERNELS = {"paged_attention"}
# Ceilings used to turn counts into times (measured on an H200: device copy, bf16 GEMM on random data).
COPY_TB_S = 4.3
GEMM_TFLOP_S = 790.0


def footprint(t: torch.Tensor) -> int:
    """Bytes a kernel must touch to read or write ``t`` once (broadcast dimensions count once)."""
    elems = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return elems * t.element_size() if t.numel() else 0


def _tensors(tree) -> list[torch.Tensor]:
    out = []
    for item in tree:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(_tensors(item))
        elif isinstance(item, dict):
            out.extend(_tensors(list(item.values())))
    return out


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _gemm_flops(func, args, out) -> float:
    if func is aten.convolution.default:
        weight = args[1]
        return 2.0 * out.numel() * math.prod(weight.shape[1:])
    a, b = (args[0], args[1]) if func in (aten.mm.default, aten.bmm.default) else (args[1], args[2])
    return 2.0 * out.numel() * a.shape[-1]


@dataclass
class Launch:
    op: str
    kind: str  # gemm | attention | fused | cast | elementwise
    nbytes: int
    flops: float = 0.0


@dataclass
class Census:
    """Launches recorded by :func:`count_ops`, with totals by kind and by op."""

    launches: list[Launch] = field(default_factory=list)

    def total(self, *kinds: str, what: str = "launches") -> float:
        rows = [r for r in self.launches if not kinds or r.kind in kinds]
        return len(rows) if what == "launches" else sum(getattr(r, what) for r in rows)

    @property
    def non_gemm_launches(self) -> int:
        return int(self.total("attention", "fused", "cast", "elementwise"))

    @property
    def non_gemm_bytes(self) -> int:
        return int(self.total("attention", "fused", "cast", "elementwise", what="nbytes"))

    def by_op(self) -> list[dict]:
        groups: dict[tuple[str, str], list[Launch]] = defaultdict(list)
        for r in self.launches:
            groups[(r.kind, r.op)].append(r)
        rows = [{"kind": kind, "op": op, "launches": len(rs), "gb": sum(r.nbytes for r in rs) / 1e9,
                 "gflop": sum(r.flops for r in rs) / 1e9} for (kind, op), rs in groups.items()]
        return sorted(rows, key=lambda r: (r["kind"] == "gemm", -r["gb"], -r["launches"]))

    def summary(self) -> dict:
        gemm_flops = self.total("gemm", what="flops")
        attn_flops = self.total("attention", what="flops")
        return {
            "non_gemm_launches": self.non_gemm_launches,
            "non_gemm_gb": self.non_gemm_bytes / 1e9,
            "attention_launches": int(self.total("attention")),
            "attention_gb": self.total("attention", what="nbytes") / 1e9,
            "other_launches": int(self.total("fused", "cast", "elementwise")),
            "other_gb": self.total("fused", "cast", "elementwise", what="nbytes") / 1e9,
            "cast_launches": int(self.total("cast")),
            "cast_gb": self.total("cast", what="nbytes") / 1e9,
            "gemm_launches": int(self.total("gemm")),
            "gemm_tflop": gemm_flops / 1e12,
            "attention_tflop": attn_flops / 1e12,
            "other_ms_at_copy_bw": self.total("fused", "cast", "elementwise", what="nbytes") / (COPY_TB_S * 1e9),
            "gemm_ms_at_peak": gemm_flops / (GEMM_TFLOP_S * 1e9),
        }


class _Recorder(TorchDispatchMode):
    def __init__(self, census: Census):
        super().__init__()
        self.census = census
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or func in FREE_OPS or _is_view(func):
            return out
        name = func.overloadpacket.__name__
        outs = _tensors([out])
        ins = _tensors(list(args) + list(kwargs.values()))
        if func in GEMM_OPS:
            nbytes = sum(map(footprint, ins)) + sum(map(footprint, outs))
            self.census.launches.append(Launch(name, "gemm", nbytes, _gemm_flops(func, args, outs[0])))
            return out
        writes_self = bool(func._schema.returns) and func._schema.returns[0].alias_info is not None
        if name in ("index_copy_", "index_put_"):
            src = ins[-1]
            nbytes = 2 * footprint(src) + sum(footprint(t) for t in ins[1:-1])
        elif name in ("fill_", "zero_"):
            nbytes = footprint(ins[0])
        elif writes_self:  # in place: self read and written, the other inputs read
            nbytes = sum(map(footprint, ins)) + footprint(ins[0])
        else:
            nbytes = sum(map(footprint, ins)) + sum(map(footprint, outs))
        cast = (name == "_to_copy" and outs[0].dtype != ins[0].dtype) or (
            name == "copy_" and len(ins) > 1 and ins[0].dtype != ins[1].dtype)
        self.census.launches.append(Launch(name, "cast" if cast else "elementwise", nbytes))
        return out


class _AttentionAsOneLaunch(TorchFunctionMode):
    """SDPA is one kernel on CUDA (flash / cuDNN / efficient); on meta it would decompose into many ops."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        b, h, lq, d = q.shape
        # The flash / cuDNN kernels write [B, Lq, H, D] memory and return it transposed.
        out = q.new_empty(b, lq, h, v.shape[-1]).transpose(1, 2)
        ins = [q, k, v] + ([kwargs["attn_mask"]] if kwargs.get("attn_mask") is not None else [])
        nbytes = sum(map(footprint, ins)) + footprint(out)
        flops = 4.0 * b * h * lq * k.shape[-2] * d
        if not self.recorder.paused:
            self.recorder.census.launches.append(Launch("scaled_dot_product_attention", "attention", nbytes, flops))
        return out


@contextlib.contextmanager
def count_ops(census: Census, *, unique_pages: int | None = None):
    """Record into ``census`` every launch of the code run inside; fused entry points count as one launch."""
    import streamt1_engine.model.wan as wan

    recorder = _Recorder(census)
    originals = {name: getattr(wan, name) for name in FUSED_ENTRY_POINTS if hasattr(wan, name)}

    def stand_in(name, original):
        def call(*args, **kwargs):
            if kwargs.get("backend", "torch") == "torch":
                return original(*args, **kwargs)
            recorder.paused += 1
            try:
                if name in ATTENTION_KERNELS:
                    out = torch.empty_like(args[0])  # [N, Lq, H, D] like the queries
                else:
                    out = original(*args, **{**kwargs, "backend": "torch"})
            finally:
                recorder.paused -= 1
            recorder.census.launches.append(_fused_launch(name, args, out, unique_pages))
            return out
        return call

    for name, original in originals.items():
        setattr(wan, name, stand_in(name, original))
    try:
        with _AttentionAsOneLaunch(recorder), recorder:
            yield census
    finally:
        for name, original in originals.items():
            setattr(wan, name, original)


def _fused_launch(name: str, args, out, unique_pages: int | None) -> Launch:
    ins = _tensors(list(args))
    outs = _tensors([out])
    if name not in ATTENTION_KERNELS:
        return Launch(name, "fused", sum(map(footprint, ins)) + sum(map(footprint, outs)))
    q, k_chunk, _, k_pool, v_pool, page_table = args[:6]
    n, lq, h, d = q.shape
    page_bytes = footprint(k_pool[0]) + footprint(v_pool[0])
    pages = unique_pages if unique_pages is not None else page_table.numel()
    small = [t for t in ins if t is not k_pool and t is not v_pool]
    nbytes = sum(map(footprint, small)) + footprint(out) + pages * page_bytes
    kv_tokens = page_table.shape[1] * k_pool.shape[1] + k_chunk.shape[1]
    return Launch(name, "attention", nbytes, 4.0 * n * h * lq * kv_tokens * d)


# -- one chunk forward on meta ------------------------------------------------------------------------------
def chunk_forward_inputs(cfg, stream, n: int, *, fused: bool = True, context_pass: bool = False,
                         dtype=torch.bfloat16, model=None, device="meta"):
    """(model, forward arguments, distinct pages read) of one forward of ``n`` candidates of one chunk at the
    steady state of a long stream: a full sink (shared) and a full window per beam (``n // 2`` beams of
    B = 2 children, as Stream-T1 at B = 2). What is built once per process is built here, not counted."""
    import streamt1_engine.model.wan as wan

    device = torch.device(device)
    if model is None:
        with torch.device(device):
            model = wan.CausalWanDiT(cfg).to(dtype)
    beams = max(1, n // 2)
    sink, window = stream.max_sink_pages, stream.window_pages
    parents = [i * beams // n for i in range(n)]
    # Page ids: sink 0..sink-1 shared; beam b's window after them; a fresh page per candidate for writes.
    table = [list(range(sink)) + [sink + b * window + j for j in range(window)] for b in parents]
    num_pool = sink + beams * window + n
    grid_h, grid_w = stream.latent_height // cfg.patch_size[1], stream.latent_width // cfg.patch_size[2]
    pool = wan.KVPool.allocate(cfg, num_pool, stream.chunk_frames * grid_h * grid_w, device, dtype)
    write = torch.arange(sink + beams * window, num_pool, device=device) if context_pass else None
    attn = wan.ChunkAttention(pool, torch.tensor(table, dtype=torch.int32).to(device),
                              torch.full((n,), sink + window, dtype=torch.int32).to(device),
                              torch.full((n,), 40 * stream.chunk_frames, dtype=torch.long).to(device), write,
                              backend="triton" if fused else "torch")
    latents = torch.randn(n, cfg.in_channels, stream.chunk_frames, stream.latent_height, stream.latent_width,
                          device=device, dtype=dtype)
    timestep = torch.full((n,), 500.0, device=device)
    with torch.no_grad():
        text = model.encode_text(torch.randn(1, cfg.text_len, cfg.text_dim, device=device))
    if hasattr(wan, "gemm_gelu_is_tanh"):
        wan.gemm_gelu_is_tanh(device)  # probed once per process
    model.rope.spatial_tables(grid_h, grid_w)  # tables built once per process
    return model, (latents, timestep, text, attn), len({p for row in table for p in row})


def chunk_forward_census(cfg, stream, n: int, *, fused: bool = True, context_pass: bool = False,
                         dtype=torch.bfloat16, model=None, device="meta") -> Census:
    """The census of one forward (see :func:`chunk_forward_inputs`); ``device`` other than meta runs it for
    real (the tests compare the two)."""
    model, args, unique_pages = chunk_forward_inputs(cfg, stream, n, fused=fused, context_pass=context_pass,
                                                     dtype=dtype, model=model, device=device)
    census = Census()
    with torch.no_grad(), count_ops(census, unique_pages=unique_pages):
        model(*args)
    return census


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1, 4], help="candidates per forward")
    p.add_argument("--paths", nargs="+", choices=["unfused", "fused"], default=["unfused", "fused"])
    p.add_argument("--context-pass", action="store_true", help="the survivors' forward that writes pages")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the census is fast at 1.3B too)")
    p.add_argument("--top", type=int, default=12, help="ops listed per census")
    p.add_argument("--out", default=None, help="directory for op_census.{csv,json,md}")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg, stream = model_config(args.tiny), stream_config(args.tiny)
    rows, details = [], []
    for n in args.n:
        for path in args.paths:
            census = chunk_forward_census(cfg, stream, n, fused=path == "fused", context_pass=args.context_pass)
            rows.append({"n": n, "path": path, **census.summary()})
            details.append(f"### N = {n}, {path}\n\n" + markdown_table(
                census.by_op()[: args.top], ["kind", "op", "launches", "gb", "gflop"]))
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": "meta (counted, no GPU)", "torch": torch.__version__, "triton": None, "cuda": None,
           "python": platform.python_version(), "git_commit": _git_commit(), "tiny": args.tiny,
           "command": " ".join(["python", "bench/op_census.py", *args.argv]), "dtype": "bf16",
           "attention_backend": "triton kernels counted (fused) / torch (unfused)"}
    notes = [f"{'tiny' if args.tiny else 'Wan2.1-1.3B'} shapes, {stream.chunk_frames}-frame chunk at "
             f"{stream.latent_height}x{stream.latent_width} latent, sink {stream.max_sink_pages} pages + window "
             f"{stream.window_pages} pages per beam, {'context pass' if args.context_pass else 'denoising step'}",
             f"ms columns: other (non-GEMM, non-attention) bytes at {COPY_TB_S} TB/s; GEMM FLOPs at "
             f"{GEMM_TFLOP_S} TFLOP/s"]
    report = Report("op_census", "Launches and bytes of one chunk forward (meta-device census)", env, rows,
                    columns=list(rows[0]), notes=notes)
    paths = report.emit(args.out)
    by_op = "\n".join(details)
    print(by_op)
    if paths:
        with open(paths["md"], "a") as f:
            f.write("\n" + by_op)
    return rows


if __name__ == "__main__":
    main()
