#!/usr/bin/env bash
# Install what the tests need (the torch pin first, then the package with its test and integration
# extras: the real HF Trainer, accelerate and Lightning run in the tests), then lint, type-check,
# build the docs site in strict mode (scripts/docs.sh) and run the test suite.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[test,integration]"
python3 -m ruff check .
python3 -m mypy kprodigy
bash scripts/docs.sh
python3 -m pytest -q "$@"
