"""The trainer runs its model through bigtrain_triton (Triton interpreter on CPU), segment ids included,
and gets the per-step losses of the same trainer with plain-PyTorch attention in the kernel's place."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import SMALL

HERE = Path(__file__).resolve().parent
STEPS = 4
# Stated tolerance: every step's loss within 1e-5 (relative) of the reference attention's. Both
# compute attention in fp32 (the kernel with exact `ieee` dots), so they differ only in summation
# order; a wrong forward, a wrong gradient (it changes every later step's loss) or a document
# mask that leaks is far outside it (the cross-document run below must miss it by 100x).
RTOL = 1e-5


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _run_reference(args: list[str], cache: Path, env_extra: dict) -> subprocess.CompletedProcess:
    """`bigtrain ARGS` with the kernel replaced by plain-PyTorch attention (train_reference_attention.py)."""
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache), PYTHONUNBUFFERED="1", **env_extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(HERE / "train_reference_attention.py"), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tempfile.gettempdir())


def test_training_through_the_fused_kernel_with_packed_documents(cli, cache_dir, tmp_path):
    # Many short documents, so every packed block holds several and per-document masking matters.
    docs = tmp_path / "docs.jsonl"
    rows = [{"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"} for i in range(600)]
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # No dropout anywhere: the kernel's attention dropout (Philox) has no plain-PyTorch twin.
    common = [f"data.train_files={docs}", *SMALL, "data.seq_len=32", "model.config.n_layer=1", f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_batches=1",
              "model.config.attn_pdrop=0.0", "model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0"]
    env = {"TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else {}
    fused, ref, crossing = tmp_path / "fused", tmp_path / "ref", tmp_path / "sdpa"
    r = cli(["train", *common, "model.attn_implementation=bigtrain_triton", f"output_dir={fused}"], env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    stats_file = tmp_path / "ref_attention.json"
    r = _run_reference(["train", *common, "model.attn_implementation=bigtrain_triton", f"output_dir={ref}"], cache_dir,
                       {**env, "BIGTRAIN_REF_ATTN_STATS": str(stats_file)})
    assert r.returncode == 0, r.stderr[-3000:]
    # sdpa: the trainer gives it no segment ids, so it attends across documents.
    r = cli(["train", *common, "model.attn_implementation=sdpa", f"output_dir={crossing}"])
    assert r.returncode == 0, r.stderr[-3000:]

    a, b, c = _losses(fused), _losses(ref), _losses(crossing)
    print(f"\nper-step losses: fused {a}\n  reference {b}\n  sdpa across documents {c}")
    assert len(a) == len(b) == len(c) == STEPS and all(math.isfinite(x) for x in a)
    # The reference really served the attention, every call with packed documents.
    stats = json.loads(stats_file.read_text())
    assert stats["calls"] > 0 and stats["calls_with_segments"] == stats["calls"], stats
    assert stats["max_segments_in_a_row"] >= 2, stats
    # Packed rows have no padding: the trainer's all-ones mask never reaches the kernel.
    assert stats["calls_with_padding_mask"] == 0, stats
    # The documents' bounds: computed by the trainer once per batch, handed to every attention call.
    assert stats["calls_with_bounds"] == stats["calls"] and stats["bounds_computed"] >= STEPS, stats
    assert stats["calls"] == stats["bounds_computed"] * 1, stats  # one layer (model.config.n_layer=1)
    # Same seed, init and data: the fused kernel's per-step losses are the reference's.
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= RTOL * abs(y), (step, x, y, a, b)
    # The tolerance tells per-document attention from attention across documents.
    assert max(abs(x - y) / abs(y) for x, y in zip(c, b)) > 100 * RTOL, (c, b)
    assert a[-1] < a[0]
