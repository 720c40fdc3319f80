#!/usr/bin/env bash
# Create or update .venv with bigtrain and its dependencies. Used by `make demo` and `make test`.
# On a machine without a GPU, where torch is missing, a CPU build of torch is installed first:
# a plain `pip install torch` would pull a multi-GB CUDA build. GPU users keep their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    echo "setup: no GPU found: installing a CPU build of torch" >&2
    "${PIP[@]}" "torch==2.13.0" 2>/dev/null \
      || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# DeepSpeed builds against the torch already installed (no second torch download in an isolated build).
"${PIP[@]}" "setuptools>=64" wheel packaging ninja numpy psutil py-cpuinfo pydantic hjson msgpack tqdm
"$PY" -c "import deepspeed" 2>/dev/null || "${PIP[@]}" --no-build-isolation deepspeed
"${PIP[@]}" --no-build-isolation -e ".[test]"
# DeepSpeed JIT-builds its CPU Adam (used by optimizer offload) on first use, which takes minutes:
# on a machine without a GPU, build it once here rather than inside the first offloaded run.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  DS_ACCELERATOR=cpu "$PY" -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)" >/dev/null 2>&1 \
    || echo "setup: warning: could not pre-build DeepSpeed's CPU Adam op (it will be built on first use)" >&2
fi
