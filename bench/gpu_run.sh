#!/usr/bin/env bash
# The whole GPU check as one command, within 7 minutes on an H100 (estimated from FLOP counts).
#
#   bench/gpu_run.sh OUT [--dry-run]
#   bench/gpu_run.sh --dry-run            (OUT: a new temporary folder)
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
# files) and run.log. Every bench script also writes its rows as it measures them (<name>.rows.jsonl): a step
# killed by its timeout still shows what it measured. --dry-run runs the same steps at tiny sizes on a CPU (CI
# runs it) and, before each, prints the step's full-size FLOPs and estimated H100 seconds (the scripts'
# --estimate); the plan table and its total (at most 7 minutes) open the summary.
# .whl/ (carried, never committed; bench/fetch_gpu_wheels.sh fills it): wheels the GPU image lacks (diffusers,
# av and their missing requirements), installed offline into a temp folder put on PYTHONPATH.
# Environment: PYTHON (default python3), GPU_RUN_BUDGET_S (default 420), GPU_RUN_STEPS (a subset, in order),
# GPU_RUN_WHEELS (default .whl).
set -uo pipefail

# The attention providers to time; bench_attention.py's own list decides which of these exist.
ATTENTION_BACKENDS="triton triton_rope sdpa_flash sdpa_cudnn sdpa"

usage() { echo "usage: bench/gpu_run.sh OUT [--dry-run]  (or: bench/gpu_run.sh --dry-run)" >&2; exit 2; }
case $# in
    1) if [ "$1" = "--dry-run" ]; then dry_run=1 out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run_out.XXXXXX")
       else dry_run=0 out=$1; fi ;;
    2) [ "$2" = "--dry-run" ] || usage; dry_run=1 out=$1 ;;
    *) usage ;;
esac
case $out in -*) usage ;; esac
py=${PYTHON:-python3}
plan_limit=420  # seconds: the whole run, estimated, on an H100
budget=${GPU_RUN_BUDGET_S:-$plan_limit}
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
plan_status=0
rows=""
notes=""

sizes="--tiny --warmup 0 --repeat 1"  # appended in a dry run: argparse keeps the last value of an option

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

plan() {  # plan NAME TIMEOUT CMD...: the step's full-size estimate (CMD --estimate) as a line of plan.txt
    local name=$1 limit=$2
    shift 2
    local line
    line=$(timeout 120 "$@" --estimate 2>> "$results/plan.err" | grep '^estimate ' | tail -n 1)
    [ -n "$line" ] || line="estimate {\"step\": \"$name\", \"seconds\": null}"
    echo "$name $limit ${line#estimate }" >> "$results/plan.txt"
    echo "== $name estimate: ${line#estimate }"
}

plan_fixed() {  # plan_fixed NAME TIMEOUT: the assumed estimate of a step with no FLOP count (run_plan.py)
    echo "$1 $2 $("$py" bench/run_plan.py fixed "$1" | sed 's/^estimate //')" >> "$results/plan.txt"
}

bench() {  # bench NAME TIMEOUT NOTE "RUN_ARGS" "DRY_ARGS" CMD...: a bench script's step. CMD is the full-size
    # run (what the plan estimates), RUN_ARGS what this machine changes (e.g. --vae light without diffusers),
    # DRY_ARGS the tiny sizes of a dry run (which also plans the step first)
    local name=$1 limit=$2 note=$3 run_args=$4 dry_args=$5
    shift 5
    if [ $dry_run -eq 1 ]; then
        plan "$name" "$limit" "$@"
        step "$name" "$limit" "$note" "$@" $run_args $dry_args
    else
        step "$name" "$limit" "$note" "$@" $run_args
    fi
}

has_module() {  # found on the path, without importing it
    "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" > /dev/null 2>&1
}

install() {  # this checkout importable as streamt1_engine (with its kernels), without the network
    local check="import streamt1_engine, streamt1_engine.kernels.paged_attention, os, sys; \
sys.exit(0 if os.path.realpath(streamt1_engine.__file__).startswith(os.path.realpath('$repo') + os.sep) else 1)"
    # checked from outside the checkout, as the bench scripts import it (their folder first, not the repo's)
    if (cd "$work" && "$py" -c "$check") 2> /dev/null; then
        echo "streamt1_engine already installed from this checkout"
        return 0
    fi
    if (cd "$work" && "$py" -c "import streamt1_engine") 2> /dev/null; then
        echo "streamt1_engine is installed from another checkout: left as it is, this one goes first on PYTHONPATH"
    elif "$py" -m pip install -q --no-deps --no-build-isolation -e "$repo" && (cd "$work" && "$py" -c "$check"); then
        return 0
    fi
    # No pip or setuptools: a shadow package tree on PYTHONPATH maps kernels/ to streamt1_engine.kernels.
    local shadow="$work/pythonpath/streamt1_engine"
    mkdir -p "$shadow"
    for entry in "$repo"/streamt1_engine/*; do ln -sf "$entry" "$shadow/"; done
    ln -sfn "$repo/kernels" "$shadow/kernels"
    export PYTHONPATH="$work/pythonpath${PYTHONPATH:+:$PYTHONPATH}"
    echo "using PYTHONPATH=$work/pythonpath"
    (cd "$work" && "$py" -c "$check")
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

carried_wheels() {  # .whl/*.whl (carried to the GPU machine): those the image lacks, installed offline into a
    # temp folder put on PYTHONPATH (a distribution the image already has is left as the image has it)
    local site="$work/site" wheel dist ok=0 kept="" failed=""
    for wheel in "$wheels"/*.whl; do
        [ -f "$wheel" ] || continue
        dist=$(basename "$wheel" | cut -d- -f1)
        if "$py" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" > /dev/null 2>&1; then
            kept+=" $dist"
        elif "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$wheel"; then ok=$((ok + 1)); else failed+=" $(basename "$wheel")"; fi
    done
    [ $ok -gt 0 ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "carried wheels: $ok installed into $site${kept:+; already here:$kept}"\
"${failed:+; not installable here:$failed}"
    [ -z "$failed" ]
}

wheels=${GPU_RUN_WHEELS:-$repo/.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
    carried_wheels > "$results/wheels.log" 2>&1 || notes+="- $(tail -n 1 "$results/wheels.log")"$'\n'
    tail -n 1 "$results/wheels.log"
fi
case " $steps " in
    *" env "*) ;;
    *) install > "$results/install.log" 2>&1 ||
           { rows+="| install | FAILED | 0 | see install.log |"$'\n'; status=1; } ;;
esac
for name in $steps; do
    case $name in
        env)
            [ $dry_run -eq 1 ] && plan_fixed env 60
            step env 60 "versions; offline install of this checkout" environment
            has_module av ||
                notes+="- no av (skipped: no av): no video files are written, the reference has no MP4 round trips"$'\n'
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
            bench attention 60 "providers: ${backends:-none}" "" "$sizes" \
                "$py" bench/bench_attention.py --n 1 4 --backends ${backends:-triton} --out "$results/attention" ;;
        chunk) bench chunk 100 "N = 1 4, eager + graphs, 1 warm-up + 3 timed" "" "$sizes" \
            "$py" bench/bench_chunk.py --n 1 4 --modes eager graphs --warmup 1 --repeat 3 --out "$results/chunk" ;;
        serving) bench serving 90 "1 and 4 streams, stream_t1 B=2 K=2 and none, 2 chunks, eager" "" \
            "$sizes --chunks 1" "$py" bench/bench_serving.py --streams 1 4 --chunks 2 --out "$results/serving" ;;
        e2e)
            vae="" vae_note="5 s video, Wan2.1 VAE architecture, random weights"
            [ $dry_run -eq 1 ] && vae_note="1 s video at tiny sizes: weight-free VAE"
            if ! has_module diffusers; then
                vae="--vae light" vae_note="--vae light (skipped: no diffusers)"
                notes+="- e2e, reference: skipped: no diffusers, so --vae light: no VAE decode in their times"$'\n'
            fi
            bench e2e 120 "$vae_note" "$vae" "--tiny --seconds 1" \
                "$py" bench/bench_e2e.py --seconds 5 --searches stream_t1 none --modes eager graphs \
                --out "$results/e2e" ;;
        gpu_tests)
            per_test=""
            if has_module pytest_timeout; then per_test="--timeout=90"; else
                notes+="- gpu_tests: no pytest-timeout, only the step's own timeout applies"$'\n'; fi
            [ $dry_run -eq 1 ] && plan_fixed gpu_tests 150
            step gpu_tests 150 "STREAMT1_TRITON_AUTOTUNE=0 ${per_test:+, 90 s per test}" \
                env STREAMT1_TRITON_AUTOTUNE=0 "$py" -m pytest -m gpu -q -rs $per_test tests ;;
        reference)
            vae="" vae_note="3 chunks, Wan2.1 VAE architecture"
            [ $dry_run -eq 1 ] && vae_note="2 chunks at tiny sizes"
            has_module diffusers || { vae="--vae light" vae_note="--vae light (skipped: no diffusers)"; }
            has_module av || vae_note+="; MP4 round trips skipped: no av"
            bench reference 100 "$vae_note; decisions compared where deterministic" "$vae" \
                "--tiny --warmup 0 --chunks 2" \
                "$py" bench/bench_reference.py --require-match --chunks 3 --out "$results/reference" ;;
        vae)
            if has_module diffusers; then
                bench vae 60 "bf16 vs float32 decode" "" \
                    "--tiny --arch tiny --n 1 --chunks 1 --latent 3 4 --warmup 0 --repeat 1" \
                    "$py" bench/bench_vae_dtype.py --arch wan2.1 --latent 60 104 --n 2 --chunks 2 --out "$results/vae"
            else
                [ $dry_run -eq 1 ] && plan_fixed vae 60
                rows+="| vae | skipped: no diffusers | 0 | no VAE numbers |"$'\n'
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
    if [ -f "$results/plan.txt" ]; then
        echo
        "$py" bench/run_plan.py table "$results/plan.txt" "$plan_limit" || plan_status=1
    fi
    [ -n "$notes" ] && { echo; echo "What the numbers leave out:"; echo; printf '%s' "$notes"; }
    for name in attention chunk serving e2e reference vae; do
        for md in "$results/$name"/*.md; do
            [ -f "$md" ] && { echo; cat "$md"; }
        done
        for partial in "$results/$name"/*.rows.jsonl; do  # a step that ended before its report
            [ -f "$partial" ] && [ ! -f "${partial%.rows.jsonl}.md" ] &&
                { echo; "$py" bench/run_plan.py partial "$partial"; }
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
[ $plan_status -eq 0 ] || status=1
exit $status
