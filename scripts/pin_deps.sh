#!/usr/bin/env bash
# Write constraints.txt from a virtual environment whose `make test` just passed: the exact version
# of every package in it. `make pin` runs this on .venv; after `make test-latest` passed, run
# `make pin VENV=.venv-latest` to move the pinned set forward, then `make test` and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
{
  echo "# The dependency set of a green 'make test' (pip constraints; written by scripts/pin_deps.sh from $VENV)."
  echo "# make demo / make test / .ci/run install exactly these; 'make test-latest' tries the newest releases."
  echo "# torch is pinned without its local build tag: the CPU build here, the CUDA build on a GPU machine."
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^#' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > constraints.txt
echo "pin: wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages from $VENV)"
