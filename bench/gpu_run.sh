#!/usr/bin/env bash
# The whole GPU check as one command, within about 8 minutes on an H100/H200.
#
#   bench/gpu_run.sh OUT [--dry-run]
#
# Steps, most important first; each has its own timeout, cut to what is left of the run's budget (a step
# that no longer fits is skipped and says so). A failing step is recorded and the run goes on.
#   env        GPU, driver, versions, optional packages; installs this checkout offline if needed
#   attention  bench_attention.py: the paged kernels against gathered SDPA (flash / cuDNN), N = 1 and 4
#   chunk      bench_chunk.py: one chunk, N = 1 and 4, eager and CUDA graphs
#   serving    bench_serving.py: 1 and 4 concurrent streams batched against the same run one after another
#   e2e        bench_e2e.py: a 5 s video, stream_t1 and none, eager and graphs
#   gpu_tests  pytest -m gpu, autotuning off, a timeout per test
#   reference  bench_reference.py --require-match: speed-up over the reference way, same decisions
#   vae        bench_vae_dtype.py: the Wan VAE decode in bf16 against float32 (needs diffusers)
# OUT receives three files: summary.md (printed at the end), results.tgz (every step's log and result
# files) and run.log. --dry-run runs the same steps at tiny sizes on a CPU (CI runs it).
# Environment: PYTHON (default python3), GPU_RUN_BUDGET_S (default 470), GPU_RUN_STEPS (a subset, in order).
set -uo pipefail

# The attention providers to time; bench_attention.py's own list decides which of these exist.
ATTENTION_BACKENDS="triton triton_rope sdpa_flash sdpa_cudnn sdpa"

usage() { echo "usage: bench/gpu_run.sh OUT [--dry-run]" >&2; exit 2; }
case $# in
    1) dry_run=0 ;;
    2) [ "$2" = "--dry-run" ] || usage; dry_run=1 ;;
    *) usage ;;
esac
out=$1
py=${PYTHON:-python3}
budget=${GPU_RUN_BUDGET_S:-470}
steps=${GPU_RUN_STEPS:-env attention chunk serving e2e gpu_tests reference vae}
export PYTHONUNBUFFERED=1
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
results="$work/results"
mkdir -p "$results"
exec > >(tee "$out/run.log") 2>&1
tee_pid=$!
start=$(date +%s)
status=0
rows=""
notes=""

if [ $dry_run -eq 1 ]; then
    sizes="--tiny --warmup 0 --repeat 1"
    seconds=1 chunks=2
else
    sizes=""
    seconds=5 chunks=7
fi

left() { echo $((budget - ($(date +%s) - start))); }

step() {  # step NAME TIMEOUT_S NOTE CMD...: run with a timeout, log to results/NAME.log, add a summary row
    local name=$1 limit=$2 note=$3
    shift 3
    local remaining
    remaining=$(left)
    if [ "$remaining" -lt 5 ]; then
        rows+="| $name | skipped (budget spent) | 0 | $note |"$'\n'
        status=1
        return
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "== $name (timeout ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    if [ "$(type -t "$1")" = function ]; then  # runs in this shell (what it exports stays)
        "$@" > "$results/$name.log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" > "$results/$name.log" 2>&1
    fi
    rc=$?
    tail -n 40 "$results/$name.log"
    local took=$(($(date +%s) - t0)) result="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result="TIMEOUT after ${limit}s"
        status=1
    elif [ $rc -ne 0 ]; then
        result="FAILED (exit $rc)"
        status=1
    fi
    echo "== $name: $result in ${took}s"
    rows+="| $name | $result | $took | $note |"$'\n'
}

has_module() {  # found on the path, without importing it
    "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" > /dev/null 2>&1
}

install() {  # this checkout importable as streamt1_engine (with its kernels), without the network
    local check="import streamt1_engine, streamt1_engine.kernels.paged_attention, os, sys; \
sys.exit(0 if os.path.realpath(streamt1_engine.__file__).startswith(os.path.realpath('$repo') + os.sep) else 1)"
    "$py" -c "$check" 2> /dev/null && { echo "streamt1_engine already installed from this checkout"; return 0; }
    if "$py" -m pip install -q --no-deps --no-build-isolation -e "$repo" && "$py" -c "$check"; then
        return 0
    fi
    # No pip or setuptools: a shadow package tree on PYTHONPATH maps kernels/ to streamt1_engine.kernels.
    local shadow="$work/pythonpath/streamt1_engine"
    mkdir -p "$shadow"
    for entry in "$repo"/streamt1_engine/*; do ln -sf "$entry" "$shadow/"; done
    ln -sfn "$repo/kernels" "$shadow/kernels"
    export PYTHONPATH="$work/pythonpath${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install failed: using PYTHONPATH=$work/pythonpath"
    "$py" -c "$check"
}

environment() {
    date -u +%FT%TZ
    git -C "$repo" rev-parse HEAD 2> /dev/null || echo "commit unknown"
    if command -v nvidia-smi > /dev/null; then
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    else
        echo "no nvidia-smi"
    fi
    install || return 1
    timeout 60 "$py" - << 'EOF'
import importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
for name in ("triton", "diffusers", "av", "nvtx", "flash-attn", "xformers", "transformers", "pytest-timeout"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "missing")
EOF
}

attention_backends() {  # the wanted providers that bench_attention.py offers, in our order
    "$py" - "$ATTENTION_BACKENDS" << 'EOF'
import ast, sys
tree = ast.parse(open("bench/bench_attention.py").read())  # read, not imported: no torch start-up
offered = {c.value for node in tree.body if isinstance(node, ast.Assign)
           and any(getattr(t, "id", None) == "KERNELS" for t in node.targets)
           for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
if not offered:  # not a literal: import it after all
    sys.path.insert(0, "bench")
    import bench_attention
    offered = set(bench_attention.KERNELS)
wanted = sys.argv[1].split()
print(" ".join(b for b in wanted if b in offered))
missing = [b for b in wanted if b not in offered]
if missing:
    print("not offered by bench_attention.py:", " ".join(missing), file=sys.stderr)
EOF
}

case " $steps " in
    *" env "*) ;;
    *) install > "$results/install.log" 2>&1 ||
           { rows+="| install | FAILED | 0 | see install.log |"$'\n'; status=1; } ;;
esac
for name in $steps; do
    case $name in
        env)
            step env 60 "versions; offline install of this checkout" environment
            has_module av || notes+="- no av: no video files are written; no number depends on it"$'\n'
            has_module nvtx || notes+="- no nvtx: NVTX ranges use torch's own bindings; no number depends on it"$'\n'
            has_module flash_attn || notes+="- no flash-attn: not timed (SDPA's own kernels are)"$'\n'
            ;;
        attention)
            if ! has_module triton; then
                rows+="| attention | skipped (no triton) | 0 | no kernel numbers |"$'\n'
                continue
            fi
            backends=$(attention_backends 2> "$work/backends.err")
            [ -s "$work/backends.err" ] && notes+="- attention: $(cat "$work/backends.err")"$'\n'
            step attention 100 "providers: ${backends:-none}" \
                "$py" bench/bench_attention.py --n 1 4 --backends ${backends:-triton} $sizes \
                --out "$results/attention" ;;
        chunk) step chunk 100 "N = 1 4, eager + graphs" \
            "$py" bench/bench_chunk.py --n 1 4 --modes eager graphs $sizes --out "$results/chunk" ;;
        serving) step serving 90 "1 and 4 streams, stream_t1 B=2 K=2 and none, 3 chunks, eager" \
            "$py" bench/bench_serving.py --streams 1 4 --chunks $([ $dry_run -eq 1 ] && echo 1 || echo 3) $sizes \
            --out "$results/serving" ;;
        e2e)
            vae="" vae_note="Wan2.1 VAE architecture, random weights"
            [ $dry_run -eq 1 ] && vae_note="tiny sizes: weight-free VAE"
            if ! has_module diffusers; then
                vae="--vae light" vae_note="--vae light"
                notes+="- e2e, reference: no diffusers, so --vae light: the VAE decode is left out of their times"$'\n'
            fi
            step e2e 120 "${seconds} s video, $vae_note" \
                "$py" bench/bench_e2e.py --seconds "$seconds" --searches stream_t1 none --modes eager graphs $vae \
                ${sizes:+--tiny} --out "$results/e2e" ;;
        gpu_tests)
            per_test=""
            if has_module pytest_timeout; then per_test="--timeout=90"; else
                notes+="- gpu_tests: no pytest-timeout, only the step's own timeout applies"$'\n'; fi
            step gpu_tests 150 "STREAMT1_TRITON_AUTOTUNE=0 ${per_test:+, 90 s per test}" \
                env STREAMT1_TRITON_AUTOTUNE=0 "$py" -m pytest -m gpu -q -rs $per_test tests ;;
        reference)
            vae="" vae_note="Wan2.1 VAE architecture"
            [ $dry_run -eq 1 ] && vae_note="tiny sizes: weight-free VAE"
            has_module diffusers || { vae="--vae light" vae_note="--vae light"; }
            step reference 100 "${chunks} chunks, $vae_note" \
                "$py" bench/bench_reference.py --require-match --chunks "$chunks" $vae ${sizes:+--tiny --warmup 0} \
                --out "$results/reference" ;;
        vae)
            if has_module diffusers; then
                if [ $dry_run -eq 1 ]; then vae_sizes="--tiny --n 1 --chunks 1 --latent 3 4 --warmup 0 --repeat 1"
                else vae_sizes="--arch wan2.1 --latent 60 104 --n 2 --chunks 2"; fi
                step vae 60 "bf16 vs float32 decode" "$py" bench/bench_vae_dtype.py $vae_sizes --out "$results/vae"
            else
                rows+="| vae | skipped (no diffusers) | 0 | no VAE numbers |"$'\n'
            fi ;;
        *) echo "unknown step: $name" >&2; exit 2 ;;
    esac
done

total=$(($(date +%s) - start))
{
    dry_note=" (dry run: tiny sizes, CPU; numbers only show that it works)"
    echo "# GPU run $(date -u +%F)$([ $dry_run -eq 1 ] && echo "$dry_note")"
    echo
    echo '```'
    sed -n '1,40p' "$results/env.log" 2> /dev/null | grep -v '^Obtaining\|^  ' || echo "(no env step)"
    echo '```'
    echo
    echo "| step | result | seconds | what |"
    echo "|---|---|---|---|"
    printf '%s' "$rows"
    echo
    echo "Total ${total}s of a ${budget}s budget; every step's log and result files are in results.tgz."
    [ -n "$notes" ] && { echo; echo "What the numbers leave out:"; echo; printf '%s' "$notes"; }
    for name in attention chunk e2e reference vae; do
        for md in "$results/$name"/*.md; do
            [ -f "$md" ] && { echo; cat "$md"; }
        done
    done
    if [ -f "$results/gpu_tests.log" ]; then
        echo
        echo "## pytest -m gpu"
        echo
        echo '```'
        tail -n 25 "$results/gpu_tests.log"
        echo '```'
    fi
} > "$out/summary.md"
cp "$out/summary.md" "$results/summary.md"
tar czf "$out/results.tgz" -C "$work" results
rm -rf "$work"
echo
cat "$out/summary.md"
exec >&- 2>&-
wait "$tee_pid"
exit $status
