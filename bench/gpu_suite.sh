#!/usr/bin/env bash
# Every check and measurement a GPU run should make, in stages that can each run as their own command.
#
#   bench/gpu_suite.sh OUT_DIR [STAGE ...]
#
# Stages (default: all, in this order):
#   setup      install this checkout without touching the network (--no-deps --no-build-isolation) and
#              write env.txt (GPU, driver, torch / triton / CUDA / Python versions, commit, date)
#   check      pytest -m gpu (bf16 kernels at 1.3B shapes, CUDA-graph capture == eager) and
#              kernel_resources.py --require-fit on the machine's own triton
#   kernels    bench_attention.py (fused kernel vs gathered SDPA / flash-attn / xformers, N = 1 2 4 8),
#              bench_qk_norm_rope.py and bench_sink_merge.py (fused vs PyTorch reference)
#   chunk      bench_chunk.py (per-chunk latency, eager vs graphs, MFU)
#   e2e        bench_e2e.py --seconds 5 (Stream-T1 B=2 K=2 and N=1 streaming, eager vs graphs)
#   memory     bench_memory.py (peak memory vs N, flat over 40 chunks)
#   reference  bench_reference.py --require-match (speed-up over the reference way, same decisions)
#   e2e30      bench_e2e.py --seconds 30 --modes graphs
#   pack       OUT_DIR.tar.gz of everything written
# Each stage logs to OUT_DIR/<stage>.log; the bench scripts write their CSV/JSON/markdown into OUT_DIR.
# Without diffusers the end-to-end stages use --vae light (the VAE is then left out of the numbers).
set -uo pipefail
out=${1:?usage: bench/gpu_suite.sh OUT_DIR [STAGE ...]}
shift
stages=${*:-setup check kernels chunk e2e memory reference e2e30 pack}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$out"
status=0

run() {  # run NAME CMD...: tee the output into OUT_DIR/NAME.log, remember a failure, go on
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$out/$name.log"
    "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

vae_args() {  # the scripts' own default (the Wan VAE architecture on a GPU) needs diffusers
    "$py" -c "import diffusers" 2>/dev/null || echo "--vae light"
}

for stage in $stages; do
    case $stage in
        setup)
            run setup "$py" -m pip install -q --no-deps --no-build-isolation -e .
            {
                date -u +%FT%TZ
                git rev-parse HEAD 2>/dev/null
                nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
                "$py" -c "import platform, torch, triton; print('python', platform.python_version(), '| torch', \
torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
                "$py" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
            } > "$out/env.txt"
            cat "$out/env.txt" ;;
        check)
            run check "$py" -m pytest -m gpu -q -rs tests
            run kernel_resources "$py" bench/kernel_resources.py --require-fit --out "$out" ;;
        kernels)
            run attention "$py" bench/bench_attention.py --out "$out"
            run qk_norm_rope "$py" bench/bench_qk_norm_rope.py --out "$out"
            run sink_merge "$py" bench/bench_sink_merge.py --out "$out" ;;
        chunk) run chunk "$py" bench/bench_chunk.py --out "$out" ;;
        e2e) run e2e "$py" bench/bench_e2e.py --seconds 5 $(vae_args) --out "$out" ;;
        memory) run memory "$py" bench/bench_memory.py $(vae_args) --out "$out" ;;
        reference) run reference "$py" bench/bench_reference.py --require-match $(vae_args) --out "$out" ;;
        e2e30) run e2e30 "$py" bench/bench_e2e.py --seconds 30 --modes graphs $(vae_args) --out "$out/30s" ;;
        pack) tar czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" && echo "wrote $out.tar.gz" ;;
        *) echo "unknown stage: $stage (see the header of $0)" >&2; exit 2 ;;
    esac
done
exit $status
