#!/usr/bin/env bash
# What CI runs: install what the tests need (only what is missing: torch at the pin, this checkout,
# its 'test' and 'integration' extras; the real HF Trainer, accelerate and Lightning run in the
# tests), then lint, type-check, build the docs site in strict mode (scripts/docs.sh) and run the
# test suite. It says what it will install and how long it takes before it starts.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0
start=$(date +%s)
mapfile -t missing < <(python3 scripts/_deps.py --extras test,integration --torch "$TORCH")
echo "test.sh: ruff, mypy, the docs build (scripts/docs.sh) and the test suite (pytest, about 1,600 tests):"
echo "  2-10 min on a 2-core x86_64 CPU (README: about 2-4 min lightly loaded, up to 10 min under load)"
if [ ${#missing[@]} -eq 0 ]; then
    echo "test.sh: torch $TORCH, this package and its 'test' and 'integration' extras are installed: nothing to install"
else
    echo "test.sh: installing with pip (missing or at another version): ${missing[*]}"
    for m in "${missing[@]}"; do
        if [ "$m" = "torch==$TORCH" ]; then
            echo "  torch: with pip's default settings on Linux the CUDA build (about 20 NVIDIA packages, several GB)"
        fi
    done
    echo "  the 'test' and 'integration' extras: pytest, hypothesis, prodigyopt, ruff, mypy, a Jupyter stack"
    echo "  (nbclient, ipykernel, nbconvert), matplotlib, scikit-learn, transformers, accelerate, Lightning, ...:"
    echo "  about 1.8 GB of downloads and installed files into an environment that has torch (README)"
    python3 -m pip install -q --disable-pip-version-check "${missing[@]}"
fi
python3 -m ruff check .
python3 -m mypy kprodigy
bash scripts/docs.sh
python3 -m pytest -q "$@"
echo "test.sh: done in $(( $(date +%s) - start )) s"
