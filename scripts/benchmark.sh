#!/usr/bin/env bash
# The main job: the convergence benchmark. It first says what it will install and how long the run
# will take, installs only what is missing (nothing on a second run), then trains every task with
# every optimizer and prints the comparison. Results go to a fresh benchmarks/out/<timestamp>/
# (git-ignored); the committed benchmarks/results/ change only with --update-results. Any
# fallback (Fashion-MNIST absent: scikit-learn's digits instead) is announced in the header, in
# the summary and in the results file. Extra args go to the benchmark, e.g.
#   bash scripts/benchmark.sh --quick                      # smoke test (README: how long it takes)
#   bash scripts/benchmark.sh --tasks logreg,mnist1d-cnn --seeds 5
#   bash scripts/benchmark.sh --help
# Environment: KPRODIGY_NO_APT=1 never runs apt-get (Fashion-MNIST is then used only if present).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0
FASHION=/usr/share/datasets/fashion-mnist
start=$(date +%s)

# 1. pip: only what is missing (torch at $TORCH, this checkout, the 'bench' extra)
mapfile -t missing < <(python3 scripts/_deps.py --extras bench --torch "$TORCH")
if [ ${#missing[@]} -eq 0 ]; then
    echo "benchmark.sh: torch $TORCH, this package and its 'bench' extra are installed: nothing to install"
else
    echo "benchmark.sh: installing with pip (missing or at another version): ${missing[*]}"
    for m in "${missing[@]}"; do
        if [ "$m" = "torch==$TORCH" ]; then
            echo "  torch: with pip's default settings on Linux the CUDA build (about 20 NVIDIA packages, several GB;"
            echo "  minutes to download). Install the build you want first to avoid it: see the README."
        fi
    done
    echo "  the 'bench' extra: prodigyopt, dadaptation, mnist1d, scikit-learn, matplotlib, tqdm, pytorch_optimizer,"
    echo "  prodigy-plus-schedule-free (tens of MB with what they need)"
    python3 -m pip install -q --disable-pip-version-check "${missing[@]}"
fi

# 2. Fashion-MNIST (Debian's dataset-fashion-mnist) for the fmnist-* tasks
if [ ! -d "$FASHION" ]; then
    if [ "${KPRODIGY_NO_APT:-0}" = 1 ]; then
        echo "benchmark.sh: KPRODIGY_NO_APT=1: not installing Debian's dataset-fashion-mnist; without it"
        echo "  FALLBACK: the fmnist-* tasks train on scikit-learn's digits (the header and results say so)"
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "benchmark.sh: $FASHION is absent; running as root: 'apt-get update' and"
        echo "  'apt-get install dataset-fashion-mnist' (about 30 MB; set KPRODIGY_NO_APT=1 to skip)"
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
            || echo "benchmark.sh: FALLBACK: dataset-fashion-mnist not installed: the fmnist-* tasks train on scikit-learn's digits"
    else
        echo "benchmark.sh: $FASHION is absent and apt-get is not usable as this user:"
        echo "  FALLBACK: the fmnist-* tasks train on scikit-learn's digits (install Debian's dataset-fashion-mnist for the real task)"
    fi
fi
echo "benchmark.sh: setup took $(( $(date +%s) - start )) s; the benchmark prints its own estimate next"

# 3. the benchmark (its header: tasks, runs, estimated time, fallbacks)
python3 benchmarks/convergence.py "$@"
echo "benchmark.sh: done in $(( $(date +%s) - start )) s, setup included"
