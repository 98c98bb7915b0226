#!/usr/bin/env bash
# The main job: the convergence benchmark. It installs what the benchmark needs (saying what before
# it does), then trains every task with every optimizer and prints the comparison. Results go to a
# fresh benchmarks/out/<timestamp>/ (git-ignored); the committed benchmarks/results/ change only
# with --update-results. Extra args go to the benchmark, e.g.
#   bash scripts/benchmark.sh --quick                      # smoke test, about a minute
#   bash scripts/benchmark.sh --tasks logreg,mnist1d-cnn --seeds 5
#   bash scripts/benchmark.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
echo "benchmark.sh: installing with pip: torch==2.13.0, then this package with its 'bench' extra"
echo "  (prodigyopt, dadaptation, mnist1d, scikit-learn, matplotlib, tqdm, pytorch_optimizer, prodigy-plus-schedule-free)"
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[bench]"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "benchmark.sh: running as root: 'apt-get update' and 'apt-get install dataset-fashion-mnist'"
        echo "  (Debian's Fashion-MNIST, for the fmnist-* tasks; set KPRODIGY_NO_APT=1 to skip)"
        if [ "${KPRODIGY_NO_APT:-0}" = 1 ]; then
            echo "benchmark.sh: KPRODIGY_NO_APT=1: not installing it"
        else
            (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
                || echo "dataset-fashion-mnist not installed: the fmnist-* tasks fall back to scikit-learn digits"
        fi
    else
        echo "benchmark.sh: /usr/share/datasets/fashion-mnist is absent and apt is not usable as this user:"
        echo "  the fmnist-* tasks fall back to scikit-learn digits (install Debian's dataset-fashion-mnist to use it)"
    fi
fi
exec python3 benchmarks/convergence.py "$@"
