"""A quiet training step (no log, eval, save or stop) reads nothing back from the device.

Each run wraps torch's reading methods (.item, .tolist, .cpu, .numpy, bool, float, int) on the
training thread and charges every call to the step in progress and to the package that made it
(tests/helpers/count_device_reads.py). Real ranks on gloo, real DeepSpeed. A NaN loss injected at
a quiet step must still be caught, skipped and reported, at the next step that reads.
"""

from __future__ import annotations

import json

import pytest

from common import REPO, SMALL
from ranks import launch_ranks

pytestmark = pytest.mark.slow

STEPS = 6
NAN_STEP = 3


@pytest.mark.parametrize("variant", [
    # ZeRO-0 fp32: bigtrain's own device-side skip (fused AdamW's found_inf), with gradient accumulation.
    ["deepspeed.zero_stage=0", "train.grad_accum=2"],
    # ZeRO-2: DeepSpeed's own overflow check decides (its reads are counted apart).
    ["deepspeed.zero_stage=2"],
    # A mixture of experts with expert parallelism: the router's numbers stay on the device too.
    ["model.preset=mixtral-tiny", "deepspeed.zero_stage=1", "deepspeed.expert_parallel=2"],
], ids=["zero0_accum2", "zero2", "moe_ep2"])
def test_quiet_steps_read_nothing_from_the_device(variant, corpus, cache_dir, tmp_path):
    out = tmp_path / "counts.json"
    small = [a for a in SMALL if not a.startswith("model.config.")] if "model.preset=mixtral-tiny" in variant else SMALL  # GPT-2's keys
    args = [REPO / "tests/helpers/count_device_reads.py", out, f"data.train_files={corpus}", *small, f"train.max_steps={STEPS}",
            "train.log_every=100", "train.eval_every=100", "train.save_every=100", f"output_dir={tmp_path / 'run'}", *variant]
    r = launch_ranks(args, 2, env_extra={"BIGTRAIN_CACHE": str(cache_dir), "BIGTRAIN_FAULT": f"nan_loss@{NAN_STEP}"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(out.read_text())
    steps = {int(s): c for s, c in counts["steps"].items()}
    print(f"\n{variant}: device reads per step by package: {steps}")
    for step in range(1, STEPS):
        assert steps.get(step, {}).get("bigtrain", 0) == 0, (step, counts["where"].get(str(step)))
    # The counter does see bigtrain's reads: the last step logs, evaluates and saves.
    assert steps[STEPS].get("bigtrain", 0) > 0
    # The NaN at a quiet step was skipped and named when the last step read the verdicts.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in records if x.get("skipped_step")]
    assert [x["step"] for x in skipped] == [NAN_STEP] and skipped[0]["nonfinite_loss"] and len(skipped[0]["sample_ids"]) == 8 * (2 if "train.grad_accum=2" in variant else 1)
    last = [x for x in records if "loss" in x][-1]
    assert last["step"] == STEPS and last["skipped_steps"] == 1 and last["grad_norm"] > 0
