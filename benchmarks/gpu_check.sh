#!/usr/bin/env bash
# The GPU check: on one CUDA device, the CUDA tests, the step benchmark (whose "peak extra" column
# is torch.cuda.max_memory_allocated there) and the memory table, into one output folder with a
# results file, gpu_check.md, that names the device. Aim: under 8 minutes (each stage has a limit).
#
# Written on a machine without a GPU: NOT YET RUN on one. CI checks the CUDA branches on fake CUDA
# tensors instead (tests/test_cuda_fake.py); this script is what a GPU machine runs.
#
# Usage, from anywhere (it runs in the repository root, with it on PYTHONPATH; needs torch with
# CUDA, pytest, hypothesis, prodigyopt; the benchmark's other peers are skipped when missing):
#   bash benchmarks/gpu_check.sh                 # into benchmarks/out/gpu-<timestamp>/ (git-ignored)
#   bash benchmarks/gpu_check.sh /tmp/gpu        # into /tmp/gpu/
#   UPDATE_RESULTS=1 bash benchmarks/gpu_check.sh  # also benchmarks/results/step_speed_cuda.md (commit it)
# Exit status: 0 if every stage passed, 1 if one failed or ran out of time, 2 without a CUDA device.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-benchmarks/out/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.md"
start=$(date +%s)

if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA device visible to torch; nothing run" | tee "$RESULTS"
    exit 2
fi

python - "$RESULTS" <<'EOF'
import platform, subprocess, sys
import torch
dev = torch.device("cuda")
p = torch.cuda.get_device_properties(dev)
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
except OSError:
    commit, dirty = "unknown", ""
with open(sys.argv[1], "w") as f:
    f.write(f"# GPU check, {p.name}\n\n")
    f.write(f"- device: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
            f"{p.multi_processor_count} SMs\n")
    f.write(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}\n")
    f.write(f"- kprodigy commit {commit or 'unknown'}{' (with uncommitted changes)' if dirty else ''}\n\n")
    f.write("| stage | exit | time | command |\n|---|---|---|---|\n")
EOF

status=0
stage() {  # name, time limit (s), command...: its output in $OUT/<name>.log, a row in the results
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "gpu_check.sh: $name (at most ${limit} s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "(stopped after ${limit} s)" >>"$OUT/$name.log"
    echo "| $name | $rc$([ $rc -eq 124 ] && echo ' (time limit)') | $(($(date +%s) - t0)) s | \`$*\` |" >>"$RESULTS"
    [ $rc -eq 0 ] || status=1
    tail -n 3 "$OUT/$name.log"
}

# 1. the CUDA tests: fake and real CUDA, capturable (CUDA graph capture), and any test file that
#    asks for a CUDA device
cuda_tests=$(grep -l "cuda.is_available()" tests/test_*.py | sort -u)
# shellcheck disable=SC2086
stage tests 200 python -m pytest -q -p no:cacheprovider -rs tests/test_capturable.py tests/test_cuda_fake.py \
    tests/test_cuda_real.py $cuda_tests

# 2. the step benchmark on CUDA (full sizes; 3 interleaved rounds)
if [ "${UPDATE_RESULTS:-0}" = 1 ]; then
    stage step_speed 270 python benchmarks/step_speed.py --device cuda --rounds 3 --update-results
    cp benchmarks/results/step_speed_cuda.md benchmarks/results/step_speed_cuda.png "$OUT/" 2>/dev/null
else
    stage step_speed 270 python benchmarks/step_speed.py --device cuda --rounds 3 --out "$OUT"
fi

# 3. the memory table (state words per parameter, slice_p, per-parameter stepping: counted from
#    tensor sizes, so the same on any machine; kept here so that one run has every table)
stage trainer_memory 60 python benchmarks/trainer_memory.py

{
    echo
    echo "Total $(($(date +%s) - start)) s; logs and files in \`$OUT\`."
    echo
    echo "## Tests"
    echo
    echo '```'
    grep -E "passed|failed|error|SKIPPED" "$OUT/tests.log" | tail -n 20
    echo '```'
    echo
    if [ -f "$OUT/step_speed_cuda.md" ]; then
        echo "## Step time"
        echo
        sed '1s/^# /### /' "$OUT/step_speed_cuda.md"
        echo
    fi
    echo "## Memory"
    echo
    cat "$OUT/trainer_memory.log"
} >>"$RESULTS"
echo "gpu_check.sh: results in $RESULTS (exit $status)"
exit $status
