"""A full disk mid-save: the run ends on every rank with one sentence and exit code 5, the partial
checkpoint removed, the last good one and metrics.jsonl intact; after space is freed,
`--resume auto` continues with the straight run's losses.

The single-rank case fills a real tmpfs (root mounts one); where that cannot be mounted it falls
back to BIGTRAIN_FAULT=enospc_in_save and says so. The two-rank case injects ENOSPC on rank 1
only, so the ranks must agree on a failure only one of them saw."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from common import SMALL, run_cli, spawn

pytestmark = pytest.mark.slow


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def train(out: Path, corpus, cache_dir, extra: list[str], env_extra: dict | None = None, log: Path | None = None):
    """One run, waited for; with `log`: the process, not waited for (common.spawn), its output in `log`
    (outside the file system the test fills)."""
    args = ["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=10", "train.save_every=5",
            "train.log_every=1", "train.eval_every=100", f"output_dir={out}", *extra]
    if log is None:
        return run_cli(args, cache_dir, env_extra=env_extra)
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # another test's leftovers
        env.pop(var, None)
    return spawn(args, env, log)


def finished(p, log: Path) -> subprocess.CompletedProcess:
    """A spawned run, waited for: its exit code and output (stderr and stdout together)."""
    code = p.wait(timeout=300)
    return subprocess.CompletedProcess([], code, "", log.read_text())


def mount_tmpfs(where: Path, mb: int) -> bool:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(where)], capture_output=True, text=True)
    return r.returncode == 0


def fill(fs: Path, leave: int) -> Path:
    """Write zeros into `fs` until only about `leave` bytes are free."""
    filler = fs / "filler"
    with filler.open("wb") as f:
        while (free := os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize) > leave:
            f.write(b"\0" * min(1 << 20, free - leave))
            f.flush()
    return filler


def check_failed_save(r, out: Path, reason: str, failed: int = 10, good: int = 5, trained: int = 10) -> None:
    assert r.returncode == 5, r.stderr[-3000:]
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"error: could not write checkpoint step {failed} to {out / 'checkpoints'}: {reason}"), last
    assert (f"the last good checkpoint is step {good} ({out / 'checkpoints' / f'step_{good:08d}'}). "
            "Free space, then continue with --resume auto") in last
    assert "Traceback" not in r.stderr
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == [f"step_{good:08d}"], ckpts  # no .tmp- left
    assert sorted(losses(out)) == list(range(1, trained + 1))  # every trained step is in metrics.jsonl


def test_full_disk_mid_save_then_resume(tmp_path, corpus, cache_dir, record_property):
    fs = tmp_path / "fs"
    real = mount_tmpfs(fs, 48)
    record_property("full_disk", "tmpfs" if real else "BIGTRAIN_FAULT=enospc_in_save")
    print(f"full disk by: {'a 48 MB tmpfs' if real else 'fault injection (no tmpfs could be mounted)'}")
    out = (fs if real else tmp_path) / "run"
    try:
        if real:
            # Step 7 waits 4 s: time to fill the disk after the step-5 checkpoint.
            p = train(out, corpus, cache_dir, [], {"BIGTRAIN_FAULT": "hang@7:0:4"}, log=tmp_path / "log.txt")
            deadline = time.monotonic() + 180
            while not (out / "checkpoints" / "step_00000005").is_dir():
                assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
                time.sleep(0.1)
            filler = fill(fs, leave=256 << 10)
            r = finished(p, tmp_path / "log.txt")
            check_failed_save(r, out, "rank 0: no space left on the device")
            filler.unlink()
        else:
            r = train(out, corpus, cache_dir, [], {"BIGTRAIN_FAULT": "enospc_in_save@10:0"})
            check_failed_save(r, out, "rank 0: no space left on the device")
        straight = losses(out)
        again = train(out, corpus, cache_dir, ["--resume", "auto"])
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from {out / 'checkpoints' / 'step_00000005'} at step 5" in again.stderr
        resumed = losses(out)
        assert all(resumed[s] == straight[s] for s in range(6, 11)), (resumed, straight)
    finally:
        if real:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def test_full_disk_during_a_background_write(tmp_path, corpus, cache_dir):
    """train.async_save: the disk fills while step 8's checkpoint is written in the background
    (its snapshot and bigtrain's small files fit; DeepSpeed's files do not). The failure is reported
    at the next point the loop can act (step 9's log), as a synchronous save's would be: exit 5,
    one sentence, the partial checkpoint removed, step 4's intact."""
    fs = tmp_path / "fs"
    if not mount_tmpfs(fs, 48):
        pytest.skip(reason="no tmpfs could be mounted (the fault-injected full disk is the synchronous test's)")
    out = fs / "run"
    try:
        p = train(out, corpus, cache_dir, ["train.async_save=true", "train.save_every=4"], {"BIGTRAIN_FAULT": "hang@6:0:4"}, log=tmp_path / "log.txt")
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "step_00000004").is_dir():
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.1)
        fill(fs, leave=256 << 10)
        r = finished(p, tmp_path / "log.txt")
        check_failed_save(r, out, "rank 0: no space left on the device", failed=8, good=4, trained=9)
        started = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step_00000008"' in line]
        assert started and started[0].get("checkpoint_background"), started  # the write had begun in the background
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def test_a_save_failing_on_one_rank_ends_every_rank(tmp_path, corpus, cache_dir):
    out = tmp_path / "run"
    r = train(out, corpus, cache_dir, ["deepspeed.zero_stage=2", "--nproc", "2"], {"BIGTRAIN_FAULT": "enospc_in_save@10:1"})
    check_failed_save(r, out, "rank 1: no space left on the device")
