#!/usr/bin/env bash
# GPU check of bigtrain's Triton attention, in one run of under 8 minutes on one H200:
#   0. bigtrain bench attention --check  (the self-check a run makes before it trusts the kernel, in
#                                          fp16/bf16, head_dim 64/128, GQA 1/4: a broken kernel shows
#                                          here in seconds, not as a timeout later; OUTDIR/selfcheck.txt)
#   1. bigtrain bench attention          (TFLOP/s, OUTDIR/attention_bench.json rewritten after every
#                                          shape + .png): the targets' grid only: bf16, d128, causal,
#                                          seq 4k/8k/16k, one packed case (8 documents per row), fwd and
#                                          fwd+bwd, both backward variants (atomic dQ and deterministic)
#                                          against SDPA flash/cuDNN, autotuning on as in training
#   2. pytest -m gpu tests/kernels       (kernel vs float64 reference in fp16/bf16, both backwards,
#                                          determinism, dropout)
#   3. a 50-step bigtrain training run with model.attn_implementation=bigtrain_triton (bf16),
#      then a 30-step fp16 run (loss scaling; skipped steps logged)
#   4. bigtrain bench train: tokens/s, MFU and peak memory for llama-1b (bf16, seq 2048)
# Step time limits (45 + 180 + 100 + 50 + 40 + 60 s = 475 s) keep the worst case under 8 minutes.
# Step 0 checks the default tiles (autotuning off, as the GPU tests run); the training run of step 3
# makes its own self-check with autotuning on, as every user's first run does. Step 1 runs with TRITON_PRINT_AUTOTUNING=1: the log names each chosen tile config.
# OUTDIR/summary.txt (also the log's first line once the run ends): forward TFLOP/s at 4k/8k/16k
# against SDPA, fwd+bwd of both backwards, the self-check and the GPU tests' pass/fail.
# and records the GPU name and torch/triton/transformers versions in OUTDIR/env.json.
#
# Usage: bench/gpu_check.sh OUTDIR            (from anywhere; PYTHON=python3 by default)
#
# The GPU box has torch, triton and transformers but not deepspeed or datasets (needed by step 3).
# Build their wheels on a machine with package access with /work/shared/gpu/fetch-wheels.sh DIR
# (read its header), carry DIR along, and either install them as its header says:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
# or run this script with WHEELS=DIR, which does exactly that. Without them step 3 reports why it
# could not run; steps 1-2 do not need them.
#
# bigtrain is not installed on the box: the script stages the package as pyproject.toml maps it
# (bigtrain/ with its kernels, ds_configs/, slurm/) in a temporary directory (removed on exit) and
# runs everything from $OUTDIR so the source tree's bigtrain/ (without the templates) cannot shadow it.
# Knobs: BENCH_AUTOTUNE=0 benchmarks the first tile of each architecture's list instead of
# autotuning (less compile time), BENCH_ARGS overrides the benchmark's arguments. Every step writes
# its own result file as soon as it finishes, so a run cut short keeps what it measured.
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

if [[ -n "${WHEELS:-}" ]]; then
  stamp "installing wheels from $WHEELS into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# Staged outside OUTDIR and removed however the script ends (a run killed at its time limit
# used to return ~45 staged files that crowded out the results).
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/bigtrain-stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
cp -r "$REPO/bigtrain" "$STAGE/bigtrain"
[[ -d "$REPO/ds_configs" ]] && cp -r "$REPO/ds_configs" "$STAGE/bigtrain/ds_configs"
[[ -d "$REPO/slurm" ]] && cp -r "$REPO/slurm" "$STAGE/bigtrain/slurm_templates"
export PYTHONPATH="$STAGE"${PYTHONPATH:+:$PYTHONPATH}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET
cd "$OUT"

stamp "environment -> $OUT/env.json"
"$PY" - <<'PYEOF'
import json, platform, subprocess
env = {"python": platform.python_version()}
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                        "--format=csv,noheader"], capture_output=True, text=True,
                                       timeout=30).stdout.strip()
except Exception as e:  # noqa: BLE001
    env["nvidia_smi"] = f"unavailable: {e}"
for mod in ("torch", "triton", "transformers", "deepspeed", "datasets"):
    try:
        env[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001
        env[mod] = f"missing ({type(e).__name__})"
import torch
env["cuda"] = torch.version.cuda
env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
env["capability"] = list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
json.dump(env, open("env.json", "w"), indent=1)
print(json.dumps(env, indent=1))
PYEOF

status=0

stamp "0/4 self-check (bigtrain bench attention --check) -> $OUT/selfcheck.txt"
BIGTRAIN_ATTN_AUTOTUNE=0 timeout 45 "$PY" -m bigtrain.bench.attention --check --dtypes fp16 bf16 --head-dims 64 128 --gqa 1 4 | tee "$OUT/selfcheck.txt"
rc=${PIPESTATUS[0]}; [[ $rc -ne 0 ]] && { stamp "self-check FAILED (rc=$rc): the kernel is wrong or cannot launch here"; status=1; }

stamp "1/4 attention benchmark (targets: bf16 d128 causal 4k-16k, packed documents, both backwards)"
BENCH_ARGS=${BENCH_ARGS:-"--dtypes bf16 --head-dims 128 --causal yes --seqlens 4096 8192 16384 --docs 1 8 --backends bigtrain_triton bigtrain_triton_det sdpa_flash sdpa_cudnn --modes fwd fwd+bwd --warmup 3 --reps 10"}
# shellcheck disable=SC2086
TRITON_PRINT_AUTOTUNING=1 BIGTRAIN_ATTN_AUTOTUNE=${BENCH_AUTOTUNE:-1} timeout 180 "$PY" -m bigtrain.bench.attention $BENCH_ARGS \
  --json "$OUT/attention_bench.json" --plot "$OUT/attention_bench.png"
rc=$?; [[ $rc -ne 0 ]] && { stamp "benchmark FAILED (rc=$rc)"; status=1; }

stamp "2/4 pytest -m gpu tests/kernels"
timeout 100 "$PY" -m pytest -m gpu "$REPO/tests/kernels" -c "$REPO/pyproject.toml" --rootdir "$REPO" \
  -p no:cacheprovider -q -rA --junitxml="$OUT/gpu_tests.xml"
rc=$?; [[ $rc -ne 0 ]] && { stamp "gpu tests FAILED (rc=$rc)"; status=1; }

stamp "3/4 training run with model.attn_implementation=bigtrain_triton"
if ! "$PY" -m bigtrain train --help >/dev/null 2>&1; then
  stamp "SKIPPED: 'python -m bigtrain train' is not available here (CLI absent or its dependencies missing:"
  "$PY" -m bigtrain train --help 2>&1 | tail -3
  stamp "deepspeed/datasets? see the header of this script for the wheels)"
  echo "absent" > "$OUT/train_status.txt"
else
  timeout 50 "$PY" -m bigtrain train model.preset=tiny train.max_steps=50 \
    model.attn_implementation=bigtrain_triton deepspeed.precision=bf16 output_dir="$OUT/train_run" --overwrite
  rc=$?
  echo "rc=$rc" > "$OUT/train_status.txt"
  [[ $rc -ne 0 ]] && { stamp "training run FAILED (rc=$rc)"; status=1; }
  # fp16 (DeepSpeed refuses it on CPU): dynamic loss scaling; the first steps usually overflow at
  # the initial scale 2^16, and every skipped step must appear in metrics.jsonl with its scale.
  stamp "3b/4 fp16 training run (skipped steps -> OUTDIR/train_fp16/metrics.jsonl)"
  timeout 40 "$PY" -m bigtrain train model.preset=tiny train.max_steps=30 \
    deepspeed.precision=fp16 output_dir="$OUT/train_fp16" --overwrite
  rc=$?
  echo "rc=$rc skipped_steps=$(grep -c skipped_step "$OUT/train_fp16/metrics.jsonl" 2>/dev/null)" > "$OUT/train_fp16_status.txt"
  [[ $rc -ne 0 ]] && { stamp "fp16 training run FAILED (rc=$rc)"; status=1; }
fi

# 4. training throughput and MFU on one GPU (bf16, seq 2048, bigtrain_triton): gpt2-xl and llama-1b.
stamp "4/4 bigtrain bench train (llama-1b; bf16, seq_len 2048, bigtrain_triton)"
if [[ -f "$OUT/train_status.txt" ]] && ! grep -q absent "$OUT/train_status.txt"; then
  for preset in llama-1b; do
    timeout 60 "$PY" -m bigtrain bench train model.preset=$preset data.seq_len=2048 deepspeed.precision=bf16 \
      model.attn_implementation=bigtrain_triton train.micro_batch_size=4 deepspeed.activation_checkpointing=false \
      --steps 10 --warmup 3 --json "$OUT/bench_train_$preset.json"
    rc=$?; [[ $rc -ne 0 ]] && { stamp "bench train $preset FAILED (rc=$rc)"; status=1; }
  done
else
  stamp "SKIPPED: needs the training dependencies (see step 3)"
fi

stamp "summary -> $OUT/summary.txt"
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
parts = []
check = (out / "selfcheck.txt").read_text() if (out / "selfcheck.txt").is_file() else ""
parts.append("self-check " + ("pass" if "every case passed" in check else "FAIL" if check else "missing"))
try:
    rows = json.loads((out / "attention_bench.json").read_text())["results"]
except (OSError, ValueError, KeyError):
    rows = []
def tf(backend, seq, mode, docs=1):
    v = [r.get(mode) for r in rows if r["backend"] == backend and r["seq"] == seq and r["docs"] == docs and r.get(mode)]
    return f"{v[0]:.0f}" if v else "-"
for seq in (4096, 8192, 16384):
    parts.append(f"fwd@{seq // 1024}k {tf('bigtrain_triton', seq, 'fwd')} vs flash {tf('sdpa_flash', seq, 'fwd')}/cudnn {tf('sdpa_cudnn', seq, 'fwd')}")
parts.append(f"fwd+bwd@8k atomic {tf('bigtrain_triton', 8192, 'fwd+bwd')} det {tf('bigtrain_triton_det', 8192, 'fwd+bwd')} TFLOP/s")
xml = (out / "gpu_tests.xml").read_text() if (out / "gpu_tests.xml").is_file() else ""
m = re.search(r'tests="(\d+)"[^>]*', xml)
fails = sum(int(x) for x in re.findall(r'(?:failures|errors)="(\d+)"', xml[:500]))
parts.append(f"gpu tests {'missing' if not m else ('pass' if not fails else f'{fails} FAILED')}")
line = "SUMMARY: " + "; ".join(parts)
(out / "summary.txt").write_text(line + "\n")
print(line)
PYEOF

rm -rf "$STAGE"
stamp "done, status=$status; results in $OUT"
# The summary also as the log's first line (tee has written everything above by now).
sleep 1; { cat "$OUT/summary.txt"; cat "$LOG"; } > "$LOG.new" && mv "$LOG.new" "$LOG"
exit $status
