"""fp16 loss scaling around DeepSpeed: skipped steps logged with the scale, a clean stop at the floor.

DeepSpeed refuses fp16 on CPU; these runs train in fp32 through the real engine while the trainer
watches DeepSpeed's real DynamicLossScaler fed overflows at chosen steps (see the helper). The
fp16 run itself is checked on GPU by bench/gpu_check.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from common import REPO, SMALL

DIVERGED = 3  # bigtrain.trainer.DIVERGED_EXIT_CODE, as documented in the README


def run(tmp_path, cache_dir, corpus, init, floor, hysteresis, overflows, steps, save_every):
    out = tmp_path / "run"
    args = [str(init), str(floor), str(hysteresis), ",".join(map(str, overflows)), f"data.train_files={corpus}", *SMALL,
            f"train.max_steps={steps}", f"train.save_every={save_every}", "train.log_every=1", "train.eval_every=1000", f"output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(BIGTRAIN_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "tests/helpers/fp16_scripted_overflows.py"), *args],
                       capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=600)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    return r, out, records, checkpoints


def expected_scales(init, floor, hysteresis, overflows):
    """DeepSpeed's documented rule: halve after `hysteresis` overflows in a row (never below the floor)."""
    scale, left, out = init, hysteresis, []
    for step in overflows:
        before = scale
        if left == 1:
            scale = max(scale / 2, floor)
        else:
            left -= 1
        out.append((step, before, scale))
    return out


def skipped(records):
    return [(r["step"], r["loss_scale_before"], r["loss_scale"]) for r in records if r.get("skipped_step")]


def test_overflows_are_logged_then_the_floor_stops_the_run(tmp_path, cache_dir, corpus):
    # Overflows at step 2 (recovered from), then at 5, 6, ...: the scale 8 -> 4 -> 2 -> 1 reaches the floor at step 6.
    r, out, records, checkpoints = run(tmp_path, cache_dir, corpus, 8, 1, 1, [2, 5, 6, 7, 8], steps=10, save_every=4)
    assert r.returncode == DIVERGED, r.stderr[-3000:]
    assert skipped(records) == expected_scales(8, 1, 1, [2, 5, 6])
    for step, before, after in skipped(records):
        assert f"step {step}: fp16 gradients overflowed, step skipped; loss scale {before:g} -> {after:g}" in r.stderr
    # Stopped at step 6 without saving over the last good checkpoint (step 4).
    assert checkpoints == ["step_00000004"]
    last = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(last) == 1 and "loss scale fell to its minimum (1) at step 6" in last[0] and "step_00000004" in last[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert max(rec["step"] for rec in records if "loss" in rec) == 6  # losses up to the stop are kept
    assert not (out / "model").exists()


def test_deepspeed_raising_at_the_floor_is_a_clean_stop(tmp_path, cache_dir, corpus):
    # Scale already at the floor: DeepSpeed's scaler raises on the first overflow (step 3).
    r, out, records, checkpoints = run(tmp_path, cache_dir, corpus, 1, 1, 1, [3], steps=6, save_every=2)
    assert r.returncode == DIVERGED, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "step 3 overflowed" in errors[0] and "step_00000002" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert checkpoints == ["step_00000002"]


def test_hysteresis_skips_without_lowering_and_training_finishes(tmp_path, cache_dir, corpus):
    r, out, records, checkpoints = run(tmp_path, cache_dir, corpus, 8, 1, 2, [3, 4], steps=6, save_every=6)
    assert r.returncode == 0, r.stderr[-3000:]
    assert skipped(records) == expected_scales(8, 1, 2, [3, 4]) == [(3, 8, 8), (4, 8, 4)]
    assert checkpoints == ["step_00000006"] and (out / "model" / "config.json").exists()
