#!/usr/bin/env bash
# Create or update .venv with bigtrain and its dependencies. Used by `make demo` and `make test`.
# On a machine without a GPU, where torch is missing, a CPU build of torch is installed first:
# a plain `pip install torch` would pull a multi-GB CUDA build. GPU users keep their own torch.
#
# Every other package takes its version from constraints.txt (the set a green `make test` used),
# so a clone keeps working whatever is released upstream. BIGTRAIN_DEPS=latest (`make test-latest`,
# in its own .venv-latest) takes the newest release of everything instead, torch excepted.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
TORCH_PIN=$(grep '^torch==' constraints.txt)
CONSTRAINTS="$VENV/constraints.txt"
PIP=("$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")
case "${BIGTRAIN_DEPS:-pinned}" in
  pinned) grep -v '^torch==' constraints.txt > "$CONSTRAINTS" ;;
  latest) : > "$CONSTRAINTS"; PIP+=(--upgrade --upgrade-strategy eager) ;;
  *) echo "setup: error: BIGTRAIN_DEPS must be pinned or latest, got '${BIGTRAIN_DEPS}'" >&2; exit 2 ;;
esac

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "$TORCH_PIN"
  else
    echo "setup: no GPU found: installing a CPU build of torch" >&2
    "${PIP[@]}" "$TORCH_PIN" 2>/dev/null \
      || "${PIP[@]}" "$TORCH_PIN" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# The torch that is there stays (a GPU user's own build, or the one just installed).
echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" >> "$CONSTRAINTS"
# DeepSpeed builds against the torch already installed (no second torch download in an isolated build).
"${PIP[@]}" "setuptools>=64" wheel packaging ninja numpy psutil py-cpuinfo pydantic hjson msgpack tqdm
"${PIP[@]}" --no-build-isolation deepspeed
"${PIP[@]}" --no-build-isolation -e ".[test]"
echo "${BIGTRAIN_DEPS:-pinned}" > "$VENV/.bigtrain-deps"  # tests/test_layout.py checks a pinned environment against constraints.txt
# DeepSpeed JIT-builds its CPU Adam (used by optimizer offload) on first use, which takes minutes:
# on a machine without a GPU, build it once here rather than inside the first offloaded run.
# Its shared-memory all-reduce too (every multi-rank CPU run loads it). Built with the environment's
# own ninja, the one bigtrain's processes find first once .venv/bin is on PATH (the tests put it
# there): two ninja versions rebuild each other's ops.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  PATH="$(cd "$VENV/bin" && pwd):$PATH" DS_ACCELERATOR=cpu "$PY" -c "
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
CPUAdamBuilder().load(verbose=False)
ShareMemCommBuilder().load(verbose=False)" >/dev/null 2>&1 \
    || echo "setup: warning: could not pre-build DeepSpeed's CPU ops (they will be built on first use)" >&2
fi
