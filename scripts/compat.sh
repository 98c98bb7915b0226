#!/usr/bin/env bash
# The supported torch range, proven: the test suite at the oldest torch (pyproject's `torch>=`)
# and at the newest release, each in its own virtualenv, and a report naming the versions, the
# machine, the date and the commit.
#
#   bash scripts/compat.sh                      # every end below; report into benchmarks/out/
#   bash scripts/compat.sh min max              # some ends only
#   bash scripts/compat.sh --update-results     # report into benchmarks/results/compat.md (committed;
#                                               # one file per end in benchmarks/results/compat/)
#
# Ends (name python torch): see ENDS below. PyPI's torch wheels for Linux are CUDA builds: each end
# downloads about 3-5 GB (several minutes) the first time; then the suite takes about 5-7 min per
# end on a 2-core CPU. So this is not part of CI (scripts/test.sh, pinned torch). The virtualenvs
# live in $KPRODIGY_COMPAT_VENVS (default ~/.cache/kprodigy-compat) and are reused: what is already
# installed at the right version is not installed again (scripts/_deps.py decides).
# The test extras are pinned to releases that need Python 3.11+; on an older Python the script
# installs the same packages unpinned (the newest that Python gets) and says so (FALLBACK) in its
# output and in the report.
# Needs the python3.X interpreters named below on PATH (pyenv, deadsnakes, ...).
# If pip answers ResolutionImpossible for a torch pin, a pip constraints file may cap torch on this
# machine (`pip config list`: global.constraint); `PIP_CONSTRAINT=/dev/null bash scripts/compat.sh`
# lifts it for one run.
set -euo pipefail
cd "$(dirname "$0")/.."
MIN_TORCH=$(sed -n 's/^dependencies = \["torch>=\([0-9.]*\)"\].*/\1/p' pyproject.toml)
ENDS=(
    "min 3.11 $MIN_TORCH"     # the oldest torch pyproject.toml admits
    "min-py310 3.10 $MIN_TORCH"  # and on the oldest Python it admits
    "max 3.13 2.15.0"         # the newest torch release on PyPI when last run, on the newest Python tested
)
VENVS=${KPRODIGY_COMPAT_VENVS:-$HOME/.cache/kprodigy-compat}
update=0
want=()
for a in "$@"; do
    case "$a" in
        --update-results) update=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) want+=("$a") ;;
    esac
done
if [ $update = 1 ]; then
    dir=benchmarks/results/compat
else
    dir=benchmarks/out/compat-$(date +%Y%m%d-%H%M%S)
fi
mkdir -p "$dir"
report=$dir.md
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- kprodigy tests pyproject.toml || echo ' + uncommitted changes')"
total_start=$(date +%s)
for end in "${ENDS[@]}"; do
    read -r name py torch <<<"$end"
    if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
    echo "== compat.sh: end '$name': Python $py, torch $torch"
    interp=$(command -v "python$py" || true)
    if [ -n "$interp" ] && ! "$interp" -c "" 2>/dev/null; then interp=""; fi  # e.g. a pyenv shim of no version
    if [ -z "$interp" ] && command -v pyenv >/dev/null; then  # pyenv's newest $py.x, if installed
        interp=$(ls -d "$(pyenv root)"/versions/"$py".*/bin/python 2>/dev/null | sort -V | tail -1 || true)
    fi
    if [ -z "$interp" ]; then
        echo "   python$py not found (PATH, pyenv): end skipped"
        printf '%s\n' "<!-- row: | $name | $py | $torch | - | not run: python$py not found | - | $(date +%Y-%m-%d) | $commit | -->" \
            >"$dir/$name.md"
        continue
    fi
    venv="$VENVS/$name-py$py-torch$torch"
    [ -x "$venv/bin/python" ] || "$interp" -m venv "$venv"
    vpy="$venv/bin/python"
    # the extras' pins need Python 3.11+ (scikit-learn 1.9.1, matplotlib 3.11.2, ...): older Pythons get
    # the same packages unpinned (the newest releases that Python can have), said in the report
    unpinned=""
    extras="pinned (pyproject.toml)"
    if ! "$vpy" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
        unpinned="--unpinned"
        extras="UNPINNED (the pins need Python 3.11+)"
        echo "   FALLBACK: the pinned test extras need Python 3.11+: installing the same packages unpinned"
    fi
    mapfile -t missing < <("$vpy" scripts/_deps.py --extras test,integration --torch "$torch" $unpinned)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "   installing: ${missing[*]}"
        [[ " ${missing[*]} " == *" torch==$torch "* ]] && echo "   (torch==$torch from PyPI: a CUDA build, 3-5 GB, minutes)"
        "$vpy" -m pip install -q --disable-pip-version-check "torch==$torch"
        if [ -z "$unpinned" ]; then
            "$vpy" -m pip install -q --disable-pip-version-check "torch==$torch" -e ".[test,integration]"
        else
            mapfile -t loose < <("$vpy" scripts/_deps.py --extras test,integration --torch "$torch" --unpinned --no-self)
            "$vpy" -m pip install -q --disable-pip-version-check "torch==$torch" "${loose[@]}"
            "$vpy" -m pip install -q --disable-pip-version-check --no-deps -e .
        fi
    fi
    got=$("$vpy" -c "import torch, platform; print(torch.__version__, platform.python_version())" 2>/dev/null | tail -1)
    echo "   running the suite with torch/Python: $got"
    log=$(mktemp)
    t0=$(date +%s)
    set +e
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$vpy" -m pytest -q -p no:cacheprovider >"$log" 2>&1
    rc=$?
    set -e
    secs=$(( $(date +%s) - t0 ))
    summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed)" "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    tail -3 "$log"
    result="rc $rc: ${summary:-no summary line (see the log)}"
    skips=$(grep -E "^(SKIPPED|FAILED|ERROR)" "$log" | sed 's/^/    /' || true)
    {
        echo "<!-- row: | $name | ${got#* } | ${got%% *} | $extras | $result | $(( secs / 60 )) min $(( secs % 60 )) s | $(date +%Y-%m-%d) | $commit | -->"
        echo "### $name (Python ${got#* }, torch ${got%% *})"
        echo
        echo "Installed test packages: $("$vpy" -m pip list --format=freeze 2>/dev/null | grep -iE '^(pytest|hypothesis|prodigyopt|transformers|accelerate|lightning|scikit-learn|matplotlib|numpy)==' | tr '\n' ' ')"
        echo
        echo "Skipped, failed and errored (pytest -ra):"
        echo
        echo "${skips:-    (none)}"
        echo
    } >"$dir/$name.md"
    rm -f "$log"
done
{
    echo "# Torch compatibility: the test suite at both ends of the supported range"
    echo
    echo "Generated by \`bash scripts/compat.sh$( [ $update = 1 ] && echo ' --update-results')\`; do not edit."
    echo
    echo "Machine: $(nproc)-core $(uname -m) CPU, $(uname -s), shared with other work; no GPU used (CPU-only tests:"
    echo "the CUDA wheels' GPU paths are not exercised). Code: kprodigy $(python3 -c 'import re; print(re.search(r"__version__ = \"(.*?)\"", open("kprodigy/__init__.py").read()).group(1))'); each row names its date and commit (an end run alone"
    echo "rewrites its own row: \`bash scripts/compat.sh min\`). Last run: $(date +%Y-%m-%d), commit $commit, $(( ($(date +%s) - total_start) / 60 )) min."
    echo "Supported range stated in pyproject.toml: torch>=$MIN_TORCH, $(sed -n 's/^requires-python = "\(.*\)"/Python \1/p' pyproject.toml)."
    echo
    echo "| end | Python | torch | test extras | pytest result | suite time | date | commit |"
    echo "|---|---|---|---|---|---|---|---|"
    for end in "${ENDS[@]}"; do
        read -r name _ _ <<<"$end"
        if [ -f "$dir/$name.md" ]; then sed -n 's/^<!-- row: \(.*\) -->$/\1/p' "$dir/$name.md"; fi
    done
    echo
    for end in "${ENDS[@]}"; do
        read -r name _ _ <<<"$end"
        if [ -f "$dir/$name.md" ]; then sed '1{/^<!-- row:/d}' "$dir/$name.md"; fi
    done
} >"$report"
echo "compat.sh: report written to $report"
