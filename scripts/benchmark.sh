#!/usr/bin/env bash
# The main job: install what the convergence benchmark needs (CPU torch pin first, then the
# package with its bench extras, and Fashion-MNIST from Debian when apt is usable), then train
# every task with every optimizer and print the comparison. Extra args go to the benchmark,
# e.g. `bash scripts/benchmark.sh --quick` or `--tasks logreg,mnist1d-cnn --seeds 5`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[bench]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
        || echo "dataset-fashion-mnist not installed: the vision tasks fall back to scikit-learn digits"
fi
python3 benchmarks/convergence.py "$@"
