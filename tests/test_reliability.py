"""Faults injected into real runs: killed saves, damaged checkpoints, killed and stuck ranks,
non-finite losses. Each run is a real bigtrain process (2 ranks on gloo where ranks matter);
the fault comes from BIGTRAIN_FAULT (bigtrain/faults.py), everything around it is real.
RELIABILITY.md reports the figures these tests print (pytest -s).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from common import SMALL

# The exit code README.md ("Exit codes") and RELIABILITY.md document for a job that lost a rank,
# killed or stuck past the collective timeout (bigtrain.trainer.RANK_LOST_EXIT_CODE).
RANK_LOST_EXIT_CODE = 4

pytestmark = pytest.mark.slow


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def module_weights(ckpt: Path) -> dict:
    return torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_killed_save_and_damaged_checkpoints_resume_from_the_last_good_one(cli, corpus, tmp_path):
    out = tmp_path / "run"
    args = ["train", f"data.train_files={corpus}", *SMALL, f"output_dir={out}", "train.max_steps=6", "train.save_every=1",
            "train.keep_last=10", "train.log_every=1"]
    # SIGKILL in the middle of saving step 6: every file written, nothing sealed yet.
    r = cli(args, env_extra={"BIGTRAIN_FAULT": "kill_in_save@6"})
    assert r.returncode == -9, r.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert not (ckpts / "step_00000006").exists() and (ckpts / ".tmp-step_00000006").is_dir()
    assert (ckpts / "latest").read_text() == "step_00000005"
    reference = losses(out)[6]  # logged before the save began: the uninterrupted run's final loss
    # Damage the two newest complete checkpoints: a truncated shard, a deleted file.
    shard = ckpts / "step_00000005" / "mp_rank_00_model_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (ckpts / "step_00000004" / "rng_rank0.pt").unlink()

    t0 = time.monotonic()
    r = cli([*args, "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000005 is damaged: mp_rank_00_model_states.pt has" in r.stderr
    assert "step_00000004 is damaged: rng_rank0.pt is missing" in r.stderr
    assert "resumed from" in r.stderr and "step_00000003 at step 3" in r.stderr
    final = losses(out)[6]
    print(f"\nkilled save + 2 damaged checkpoints: resumed from step 3 (3 steps lost) in {time.monotonic() - t0:.1f}s; "
          f"final loss {final:.6f} vs uninterrupted {reference:.6f}")
    assert final == reference  # RELIABILITY.md: bitwise the uninterrupted run's final loss
    # The killed save's leftovers are gone and every checkpoint is whole again.
    assert not list(ckpts.glob(".tmp-*"))
    from bigtrain.checkpoint import check_checkpoint, list_checkpoints

    assert [p.name for p in list_checkpoints(ckpts)] == [f"step_{s:08d}" for s in range(1, 7)]
    assert all(check_checkpoint(p) is None for p in list_checkpoints(ckpts))


@pytest.fixture(scope="module")
def two_rank_reference(cli, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "reference"
    args = ["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=6", "train.save_every=2", "train.log_every=1", "--nproc", "2"]
    r = cli([*args, f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return args, losses(out)


def test_killed_rank_ends_the_job_naming_it_and_resume_finishes_the_same(cli, two_rank_reference, tmp_path):
    args, reference = two_rank_reference
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = cli([*args, f"output_dir={out}"], env_extra={"BIGTRAIN_FAULT": "kill@5:1"}, timeout=300)
    elapsed = time.monotonic() - t0
    code, stderr = r.returncode, r.stderr
    lost = [line for line in r.stderr.splitlines() if "error: rank 0: lost rank 1 during step 5" in line]
    assert lost, r.stderr[-3000:]
    assert "step_00000004" in lost[0] and "--resume auto" in lost[0]
    r2 = cli([*args, f"output_dir={out}", "--resume", "auto"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed from" in r2.stderr and "at step 4" in r2.stderr
    got = losses(out)
    print(f"\nrank 1 SIGKILLed at step 5: job ended after {elapsed:.1f}s (incl. startup); 0 steps lost beyond the checkpoint at 4; "
          f"final loss {got[6]:.6f} vs uninterrupted {reference[6]:.6f}")
    # The steps the resumed run recomputed repeat the uninterrupted run's losses exactly.
    assert [got[s] for s in (5, 6)] == [reference[s] for s in (5, 6)], (got, reference)
    # Checked last, so a wrong code does not hide the checks above: the job's exit code is the
    # documented one for a lost rank, whichever rank's exit the launcher sees first.
    assert code == RANK_LOST_EXIT_CODE, (code, stderr[-3000:])


def test_losing_rank_0_is_reported_by_rank_1_and_resume_takes_over_its_lock(cli, two_rank_reference, tmp_path):
    """Rank 0 (the one holding the output directory's lock and writing metrics) is SIGKILLed: rank 1
    names it, the job exits with the lost-rank code, the dead owner's lock is taken over on resume."""
    args, reference = two_rank_reference
    out = tmp_path / "run"
    r = cli([*args, f"output_dir={out}"], env_extra={"BIGTRAIN_FAULT": "kill@5:0"}, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    lost = [line for line in lines if line.startswith("error: rank 1: lost rank 0")]
    assert lost and "during step 5" in lost[0] and "step_00000004" in lost[0] and "--resume auto" in lost[0], r.stderr[-3000:]
    assert r.returncode == RANK_LOST_EXIT_CODE, (r.returncode, r.stderr[-3000:])
    from bigtrain.checkpoint import check_checkpoint

    assert check_checkpoint(out / "checkpoints" / "step_00000004") is None
    assert (out / ".bigtrain.lock.json").is_file()  # rank 0 died holding it
    r2 = cli([*args, f"output_dir={out}", "--resume", "auto"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "taking over" in r2.stderr and "at step 4" in r2.stderr, r2.stderr[-3000:]
    got = losses(out)
    assert [got[s] for s in (5, 6)] == [reference[s] for s in (5, 6)], (got, reference)


def test_stuck_rank_gets_stacks_from_every_rank_and_a_bounded_exit(cli, two_rank_reference, tmp_path):
    args, _ = two_rank_reference
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = cli([*args, f"output_dir={out}", "deepspeed.timeout_minutes=0.25", "train.watchdog_min_seconds=3"],
            env_extra={"BIGTRAIN_FAULT": "hang@3:1:600"}, timeout=300)
    elapsed = time.monotonic() - t0
    assert r.returncode == RANK_LOST_EXIT_CODE, (r.returncode, r.stderr[-4000:])
    err = r.stderr
    # Each rank's watchdog dumped its own stacks: rank 1 inside the injected sleep, rank 0 in a collective.
    assert "watchdog: rank 1: step 3 has run" in err and "watchdog: rank 0: step 3 has run" in err, err[-4000:]
    assert "faults.py" in err and "at_step_start" in err
    assert "lost rank 1 during step 3" in err
    assert elapsed < 150, elapsed  # a 15 s collective timeout, not the 600 s hang
    print(f"\nrank 1 stuck at step 3: stacks from both ranks, job ended after {elapsed:.1f}s (collective timeout 15s)")


def test_nonfinite_losses_are_skipped_named_and_stop_with_a_checkpoint(cli, corpus, tmp_path):
    out = tmp_path / "skip"
    args = ["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=12", "train.save_every=1", "train.keep_last=20",
            "train.log_every=1", "train.max_nonfinite_steps=3"]
    # Step 5: a finite loss whose gradients are NaN (ZeRO-0 fp32: bigtrain's own device-side check).
    r = cli([*args, f"output_dir={out}"], env_extra={"BIGTRAIN_FAULT": "nan_loss@3+6+7,nan_grad@5"})
    assert r.returncode == 3, r.stderr[-3000:]
    err = r.stderr
    assert "step 3: the loss is non-finite on rank 0; the batch's sample ids: [" in err and "step skipped (1 in a row" in err
    assert "step 5: the gradients are non-finite (the loss is finite on every rank); the batch's sample ids: [" in err
    stop = [line for line in err.splitlines() if line.startswith("error: training stopped at step 7")]
    assert stop and "3 non-finite steps in a row" in stop[0] and "step_00000007" in stop[0], err[-3000:]
    recs = records(out)
    assert [x["step"] for x in recs if x.get("nonfinite_loss")] == [3, 6, 7]
    assert [x["step"] for x in recs if x.get("nonfinite_grad")] == [5]
    skipped = [x for x in recs if x.get("skipped_step")]
    assert [x["step"] for x in skipped] == [3, 5, 6, 7]
    assert all(len(x["sample_ids"]) == 4 == len(set(x["sample_ids"])) for x in skipped)
    assert sorted(losses(out)) == [1, 2, 4]  # skipped steps have no loss; nothing after the stop
    ckpts = out / "checkpoints"
    assert not (ckpts / "step_00000008").exists()
    # The count of skipped steps is part of the state each checkpoint keeps (a resume goes on from it).
    assert [json.loads((ckpts / f"step_0000000{s}" / "trainer_state.json").read_text())["skipped_steps"] for s in (2, 3, 5, 7)] == [0, 1, 2, 4]
    # Skipped steps never touched the weights: the checkpoint at the stop holds step 4's weights.
    w4, w7 = module_weights(ckpts / "step_00000004"), module_weights(ckpts / "step_00000007")
    w2 = module_weights(ckpts / "step_00000002")
    assert all(torch.equal(w4[k], w7[k]) for k in w4)
    assert not all(torch.equal(w2[k], w4[k]) for k in w2)  # step 4 itself did train

    out2 = tmp_path / "stop"
    r = cli([*args, f"output_dir={out2}", "train.on_nonfinite=stop"], env_extra={"BIGTRAIN_FAULT": "nan_loss@2"})
    assert r.returncode == 3
    assert "error: training stopped at step 2" in r.stderr and "train.on_nonfinite=stop" in r.stderr
    w1, w2 = module_weights(out2 / "checkpoints" / "step_00000001"), module_weights(out2 / "checkpoints" / "step_00000002")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_nonfinite_loss_on_one_rank_in_a_later_micro_batch_is_skipped_everywhere(cli, corpus, tmp_path):
    """NaN on rank 1 only, in the second micro-batch of step 3 (grad_accum=2, ZeRO-2): every rank
    skips the step (DeepSpeed's overflow check sees the reduced gradients), the report names rank 1
    and the 16 samples of the global batch, and the weights after step 3 are step 2's. Step 4:
    rank 0's first micro-batch has a finite loss but NaN gradients: skipped too, reported as such."""
    out = tmp_path / "one_rank"
    args = ["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=5", "train.save_every=1", "train.keep_last=20",
            "train.log_every=1", "train.grad_accum=2", "deepspeed.zero_stage=2", f"output_dir={out}", "--nproc", "2"]
    r = cli(args, env_extra={"BIGTRAIN_FAULT": "nan_loss@3:1:1,nan_grad@4:0:0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3: the loss is non-finite on rank 1; the batch's sample ids: [" in r.stderr
    assert "step 4: the gradients are non-finite (the loss is finite on every rank)" in r.stderr
    recs = records(out)
    skipped = [x for x in recs if x.get("skipped_step")]
    assert [x["step"] for x in skipped] == [3, 4] and all(len(set(x["sample_ids"])) == 16 for x in skipped)
    assert [x["step"] for x in recs if x.get("nonfinite_grad")] == [4]
    assert sorted(losses(out)) == [1, 2, 5]
    w2, w3, w4, w5 = (module_weights(out / "checkpoints" / f"step_0000000{s}") for s in (2, 3, 4, 5))
    assert all(torch.equal(w2[k], w3[k]) and torch.equal(w2[k], w4[k]) for k in w2)
    assert not all(torch.equal(w4[k], w5[k]) for k in w4)  # step 5 trains again
