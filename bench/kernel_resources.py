#!/usr/bin/env python
"""Do the Triton kernels' configs fit the GPU? Registers, spills and shared memory, without a GPU.

Every kernel is compiled ahead of time for one CUDA architecture (default sm_90, H100/H200) with each of its
launch configs (all autotune configs of the paged-attention kernel), at the argument types and
specialisations of a real Wan2.1-1.3B launch: the wrappers are called on meta tensors of the real shapes and
the launch they would make is recorded instead of run. Triton's bundled ptxas compiles and cuobjdump reports
the resource usage. A config that spills registers to local memory, or needs more shared memory than one
block may have, is reported as not fitting (``--require-fit`` turns that into exit status 1).

These are compiler outputs, not timings: they say which configs can run and at what occupancy, not which is
fastest (``bench_attention.py`` on a GPU does that).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Interpreter mode would swap the kernels and their configs for the CPU ones: compile the real ones.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, environment  # noqa: E402

# Shared memory per block (opt-in maximum) and per SM, bytes, by compute capability.
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SMEM_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472}
REGISTERS_PER_SM = 65536
WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}
BLOCKS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
_TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                    torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}


class LaunchRecorder:
    """Stands in for a kernel object: ``kernel[grid](*args, **kwargs)`` records the call instead of running."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
        return launch


def record_launch(module, attr: str, call):
    """Run ``call()`` with ``module.attr`` replaced by a recorder; returns the one (args, kwargs) it launched."""
    original = getattr(module, attr)
    recorder = LaunchRecorder()
    setattr(module, attr, recorder)
    try:
        call()
    finally:
        setattr(module, attr, original)
    if len(recorder.calls) != 1:
        raise RuntimeError(f"{module.__name__}.{attr}: expected one launch, recorded {len(recorder.calls)}")
    return recorder.calls[0]


def specialise(fn, args: tuple, kwargs: dict):
    """Triton's signature for a launch: pointer/int/float types, ``1`` folded to a constant, and 16-byte
    divisibility hints for pointers (meta tensors stand for aligned allocations) and for ints divisible by 16."""
    from triton.runtime.jit import JITFunction

    assert isinstance(fn, JITFunction)
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for {missing}")
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if name in constexpr_names:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            raise TypeError(f"{fn.__name__}.{name}: bool kernel arguments are not supported here")
        elif isinstance(value, int):
            if value == 1:
                signature[name], constants[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: unsupported argument {type(value).__name__}")
    return signature, constants, attrs


def _cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path}; this triton build has no CUDA tools")
    return path


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"could not read resource usage from cuobjdump output:\n{text}")
    return {k.lower(): int(v) for k, v in fields.items()}


def _nvdisasm() -> Path:
    return _cuobjdump().with_name("nvdisasm")


_SASS_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def sass_loops(sass: str) -> list[dict]:
    """Innermost loops of a SASS listing, in program order: one per backward branch whose body holds no
    other loop. ``instructions``: the body's length (label to branch, inclusive), i.e. what one iteration
    issues per thread; ``mma``: tensor-core instructions in it (HGMMA on Hopper, HMMA before)."""
    instructions, labels, branches = [], {}, []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instr = _SASS_INSTR.search(line)
        if instr:
            target = _SASS_BRANCH.search(instr.group(1))
            if target:
                branches.append((len(instructions), target.group(1)))
            instructions.append(instr.group(1))
    spans = [(labels[t], i) for i, t in branches if t in labels and labels[t] < i]
    inner = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [{"start": a, "instructions": b - a + 1,
             "mma": sum(1 for ins in instructions[a:b + 1] if re.search(r"\bH[G]?MMA\b", ins))}
            for a, b in sorted(inner)]


def key_tile_instructions(cubin: bytes) -> dict:
    """Instructions per key tile of the page loop (the first innermost loop with matmuls) and of the own-chunk
    loop (the last one), from the cubin's SASS, and their ratio."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(_nvdisasm()), "-c", f.name], capture_output=True, text=True, check=True).stdout
    loops = [loop for loop in sass_loops(sass) if loop["mma"] > 0]
    if len(loops) < 2:
        raise RuntimeError(f"expected a page loop and an own-chunk loop with matmuls, found {len(loops)}")
    page, chunk = loops[0]["instructions"], loops[-1]["instructions"]
    return {"page_loop_instr": page, "chunk_loop_instr": chunk, "page_vs_chunk": round(page / chunk, 3)}


def compile_config(fn, args, kwargs, meta: dict, num_warps: int, num_stages: int, arch: int,
                   count_loops: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = specialise(fn, args, {**kwargs, **meta})
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    seconds = time.perf_counter() - start
    usage = resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    matrix = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    shared = int(kernel.metadata.shared)
    spill = usage.get("stack", 0) + usage.get("local", 0)
    regs_per_block = -(-usage["reg"] // 8) * 8 * 32 * num_warps
    blocks_per_sm = min(REGISTERS_PER_SM // regs_per_block, WARPS_PER_SM[arch] // num_warps, BLOCKS_PER_SM[arch],
                        SMEM_PER_SM[arch] // (shared + 1024))
    fits = spill == 0 and shared <= SMEM_PER_BLOCK[arch] and blocks_per_sm >= 1
    row = {"registers": usage["reg"], "spill_bytes": spill, "shared_kib": round(shared / 1024, 1),
           "blocks_per_sm": blocks_per_sm, "matrix_ops": matrix, "fits": fits, "compile_s": round(seconds, 2)}
    if count_loops:
        row.update(key_tile_instructions(kernel.asm["cubin"]))
    return row


# -- the launches, at Wan2.1-1.3B shapes -------------------------------------------------------------------
def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def paged_attention_launches(dtype, configs=None, n=4, pages=8, layers=30, pool_pages=40, frame_tokens=1560, heads=12,
                             head_dim=128):
    """The engine's kernel over the post-RoPE pool."""
    from streamt1_engine.kernels.paged_attention import fused

    lq = 3 * frame_tokens
    k_pool = _meta(layers, pool_pages, lq, heads, head_dim, dtype=dtype)[layers - 1]
    v_pool = _meta(layers, pool_pages, lq, heads, head_dim, dtype=dtype)[layers - 1]
    call_args = (_meta(n, lq, heads, head_dim, dtype=dtype), _meta(n, lq, heads, head_dim, dtype=dtype),
                 _meta(n, lq, heads, head_dim, dtype=dtype), k_pool, v_pool,
                 _meta(n, pages, dtype=torch.int32), _meta(n, dtype=torch.int32))
    args, kwargs = record_launch(fused, "_paged_attn_fwd_tuned", lambda: fused.paged_attention_triton(*call_args))
    for config in configs or fused.AUTOTUNE_CONFIGS:
        label = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
        yield ("paged_attention", label, fused._paged_attn_fwd, args, kwargs, dict(config.kwargs),
               config.num_warps, config.num_stages)


def paged_attention_rope_launches(dtype, configs=None, n=4, pages=8, layers=30, pool_pages=40, frame_tokens=1560,
                                  heads=12, head_dim=128, max_frames=4096):
    """The previous kernel (pre-RoPE pool, keys rotated in the page loop), kept for the A/B."""
    from streamt1_engine.kernels.paged_attention import fused_rope

    lq = 3 * frame_tokens
    k_pool = _meta(layers, pool_pages, lq, heads, head_dim, dtype=dtype)[layers - 1]
    v_pool = _meta(layers, pool_pages, lq, heads, head_dim, dtype=dtype)[layers - 1]
    half = head_dim // 2
    call_args = (_meta(n, lq, heads, head_dim, dtype=dtype), _meta(n, lq, heads, head_dim, dtype=dtype),
                 _meta(n, lq, heads, head_dim, dtype=dtype), k_pool, v_pool,
                 _meta(n, pages, dtype=torch.int32), _meta(n, dtype=torch.int32),
                 _meta(pool_pages, dtype=torch.int32), _meta(max_frames, half, dtype=torch.float32),
                 _meta(max_frames, half, dtype=torch.float32), _meta(frame_tokens, half, dtype=torch.float32),
                 _meta(frame_tokens, half, dtype=torch.float32), frame_tokens)
    args, kwargs = record_launch(fused_rope, "_paged_attn_rope_fwd_tuned",
                                 lambda: fused_rope.paged_attention_triton_rope(*call_args))
    for config in configs or fused_rope.AUTOTUNE_CONFIGS:
        label = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
        yield ("paged_attention_rope", label, fused_rope._paged_attn_rope_fwd, args, kwargs, dict(config.kwargs),
               config.num_warps, config.num_stages)


def sink_merge_launches(dtype, configs=None, layers=30, pool_pages=40, tokens=4680, heads=12, head_dim=128):
    from streamt1_engine.kernels.sink_merge import fused

    pools = [_meta(layers, pool_pages, tokens, heads, head_dim, dtype=dtype) for _ in range(2)]
    tables = [_meta(4096, head_dim // 2, dtype=torch.float32) for _ in range(2)]
    args, kwargs = record_launch(fused, "_sink_merge_kernel", lambda: fused.sink_merge_triton_(
        *pools, _meta(pool_pages, dtype=torch.int32), _meta(4, 5, dtype=torch.int32), 0.9, *tables))
    yield _plain_launch("sink_merge", fused._sink_merge_kernel, args, kwargs)


def qk_norm_rope_launches(dtype, configs=None, n=4, length=4680, heads=12, head_dim=128):
    from streamt1_engine.kernels.qk_norm_rope import fused

    dim = heads * head_dim
    call_args = (_meta(n, length, dim, dtype=dtype), _meta(n, length, dim, dtype=dtype), _meta(dim, dtype=dtype),
                 _meta(dim, dtype=dtype), 1e-6, heads, _meta(n, length, head_dim // 2, dtype=torch.float32),
                 _meta(n, length, head_dim // 2, dtype=torch.float32))
    args, kwargs = record_launch(fused, "_qk_norm_rope_kernel", lambda: fused.qk_norm_rope_triton(*call_args))
    yield _plain_launch("qk_norm_rope", fused._qk_norm_rope_kernel, args, kwargs)


def _plain_launch(name, fn, args, kwargs):
    kwargs = dict(kwargs)
    num_warps, num_stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
    label = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper() and "BLOCK" in k)
    return name, label or "-", fn, args, kwargs, {}, num_warps, num_stages


def parse_config(text: str):
    """``128x64/8/3`` -> a paged-attention config BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3."""
    import triton

    match = re.fullmatch(r"(\d+)x(\d+)/(\d+)/(\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"config {text!r} is not BLOCK_MxBLOCK_N/num_warps/num_stages, "
                                         "e.g. 128x64/8/3")
    block_m, block_n, warps, stages = map(int, match.groups())
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


KERNELS = {"paged_attention": paged_attention_launches, "paged_attention_rope": paged_attention_rope_launches,
           "sink_merge": sink_merge_launches, "qk_norm_rope": qk_norm_rope_launches}
# Kernels with a page loop and an own-chunk loop, whose per-key-tile instruction counts are compared.
ATTENTION_KERNELS = ("paged_attention", "paged_attention_rope")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_PER_BLOCK),
                   help="CUDA compute capability to compile for (90: H100/H200)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=sorted(KERNELS))
    p.add_argument("--config", dest="configs", action="append", type=parse_config, default=None,
                   metavar="M x N/W/S", help="paged-attention config to check instead of the autotune list, "
                   "as BLOCK_MxBLOCK_N/num_warps/num_stages (e.g. 128x64/8/3); repeatable")
    p.add_argument("--require-fit", action="store_true", help="exit with status 1 if any config does not fit")
    p.add_argument("--out", default=None, help="directory for CSV/JSON/markdown results (default: print only)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _cuobjdump()
    except (ImportError, FileNotFoundError) as exc:
        print(f"kernel_resources: cannot compile ahead of time: {exc}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for name in args.kernels:
        for kernel, label, fn, launch_args, kwargs, meta, warps, stages in KERNELS[name](dtype, args.configs):
            row = {"kernel": kernel, "config": label, "num_warps": warps, "num_stages": stages}
            try:
                row.update(compile_config(fn, launch_args, kwargs, meta, warps, stages, args.arch,
                                          count_loops=kernel in ATTENTION_KERNELS))
            except Exception as exc:  # a config that does not compile is a result, not a crash
                row.update(fits=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            rows.append(row)
            print(f"{kernel:16s} {label:28s} w{warps} s{stages}: " +
                  ", ".join(f"{k}={row[k]}" for k in ("registers", "spill_bytes", "shared_kib", "blocks_per_sm",
                                                       "matrix_ops", "page_loop_instr", "chunk_loop_instr",
                                                       "page_vs_chunk", "fits", "error") if k in row), flush=True)
    env = environment(argparse.Namespace(device=torch.device("cpu"), tiny=False, dtype=args.dtype,
                                         backend="triton", argv=args.argv), __file__)
    env["device"] = f"no GPU: compiled ahead of time for sm_{args.arch}"
    columns = ["kernel", "config", "num_warps", "num_stages", "registers", "spill_bytes", "shared_kib",
               "blocks_per_sm", "matrix_ops", "page_loop_instr", "chunk_loop_instr", "page_vs_chunk", "fits",
               "compile_s", "error"]
    notes = [f"shared-memory limit per block on sm_{args.arch}: {SMEM_PER_BLOCK[args.arch] / 1024:.0f} KiB; "
             f"blocks_per_sm is the register/shared-memory bound (an estimate, not a measurement); "
             "matrix_ops is the tensor-core instruction in the PTX (wgmma: Hopper's asynchronous MMA).",
             "page_loop_instr / chunk_loop_instr: SASS instructions per thread in one iteration (one key tile) of "
             "the innermost page loop and of the own-chunk loop (nvdisasm of the cubin); page_vs_chunk is their "
             "ratio (1.0: a cached key costs what one of the chunk's own keys costs).",
             "Compiler output only: which configs can run, not which is fastest."]
    Report("kernel_resources", "Kernel resources (ahead-of-time compile)", env, rows, columns, notes).emit(args.out)
    bad = [r for r in rows if not r["fits"]]
    if bad and args.require_fit:
        print(f"{len(bad)} config(s) do not fit sm_{args.arch}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
