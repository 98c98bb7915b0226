#!/usr/bin/env bash
# Build the documentation site (docs/ + mkdocs.yml) in strict mode: any warning (a broken link,
# a page missing from the nav, an API name mkdocstrings cannot find) fails the build.
# Installs the packages of the 'docs' extra of pyproject.toml that are missing (not the package itself:
# mkdocstrings reads the docstrings from the source tree). Usage:
#   bash scripts/docs.sh            # build into a temporary folder, removed afterwards (what CI runs)
#   bash scripts/docs.sh site       # build into ./site (git-ignored) to look at it
#   python3 -m mkdocs serve         # live preview while writing
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t missing < <(python3 scripts/_deps.py --extras docs --no-self --no-torch)
if [ ${#missing[@]} -gt 0 ]; then
    echo "docs.sh: installing with pip: ${missing[*]}"
    python3 -m pip install -q --disable-pip-version-check "${missing[@]}"
fi
if [ $# -ge 1 ]; then
    site="$1"
else
    site="$(mktemp -d)"
    trap 'rm -rf "$site"' EXIT
fi
# not --quiet: it hides the warnings from --strict as well, and the build would then pass anyway
log="$(mktemp)"
if ! NO_MKDOCS_2_WARNING=1 python3 -m mkdocs build --strict --site-dir "$site" >"$log" 2>&1; then
    grep -v "^INFO" "$log" || true
    rm -f "$log"
    echo "docs build failed (mkdocs build --strict)" >&2
    exit 1
fi
grep -v "^INFO" "$log" || true
rm -f "$log"
echo "docs built (strict) into $site"
