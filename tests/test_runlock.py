"""One run per output directory (bigtrain/runlock.py): a second run stops at once naming the
first, a dead run's lock is taken over, a lock refreshed by a live run on another host holds."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from bigtrain.errors import UserError
from bigtrain.runlock import OWNER_NAME, RunLock
from common import SMALL, run_cli, spawn


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(cache_dir, corpus, tmp_path):
    out = tmp_path / "run"
    args = ["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=100000", "train.save_every=5", "train.log_every=1", f"output_dir={out}"]
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # another test's leftovers
        env.pop(var, None)
    first = spawn(args, env, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "step_00000005").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        before = (out / "metrics.jsonl").stat().st_size
        second = run_cli([*args, "--resume", "auto"], cache_dir)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith(f"error: output_dir {out} is in use by another run (pid {first.pid} on host {socket.gethostname()}")
        assert "Traceback" not in second.stderr
        assert first.poll() is None and (out / "metrics.jsonl").stat().st_size >= before  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # The first run died without releasing: the next one takes the lock over and resumes.
    third = run_cli([*args[:-4], "train.max_steps=8", "train.save_every=5", "train.log_every=1", f"output_dir={out}", "--resume", "auto"], cache_dir)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over the lock of output_dir {out} from a run that is gone (pid {first.pid} on host" in third.stderr
    assert not (out / OWNER_NAME).exists()  # released at the orderly end


def write_owner(d, **fields) -> None:
    owner = {"host": "node-elsewhere", "pid": 4242, "job": None, "since": time.time() - 3600, "refreshed": time.time()}
    owner.update(fields)
    (d / OWNER_NAME).write_text(json.dumps(owner))


def test_a_live_run_on_another_host_holds_the_lock(tmp_path, monkeypatch):
    """On a shared file system the OS lock may not reach the other host: the owner's refresh decides."""
    write_owner(tmp_path)
    with pytest.raises(UserError, match=r"is in use by another run \(pid 4242 on host node-elsewhere, since "):
        RunLock.acquire(tmp_path, stale_after=60, log=lambda *a: None)
    write_owner(tmp_path, refreshed=time.time() - 120)  # stale: that run is gone
    said = []
    lock = RunLock.acquire(tmp_path, stale_after=60, log=said.append)
    assert "from a run that is gone (pid 4242 on host node-elsewhere" in said[0]
    assert json.loads((tmp_path / OWNER_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    # The same Slurm job, requeued onto another node: its own earlier incarnation.
    write_owner(tmp_path, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    RunLock.acquire(tmp_path, stale_after=60, log=lambda *a: None).release()


def test_the_owner_file_is_refreshed_while_the_run_lives(tmp_path):
    lock = RunLock.acquire(tmp_path, stale_after=60, log=lambda *a: None, refresh=0.1)
    try:
        first = json.loads((tmp_path / OWNER_NAME).read_text())["refreshed"]
        time.sleep(0.5)
        assert json.loads((tmp_path / OWNER_NAME).read_text())["refreshed"] > first
        with pytest.raises(UserError, match="in use by another run"):  # the OS lock, same host
            RunLock.acquire(tmp_path, stale_after=60, log=lambda *a: None)
    finally:
        lock.release()
