"""Local multi-process launch: `bigtrain train --nproc N` re-runs itself under the deepspeed launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from bigtrain.engine import free_port, has_cuda


def under_launcher() -> bool:
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or int(env.get("SLURM_NTASKS", "1") or 1) > 1


def _rank_processes(root_pid: int) -> list:
    """The training ranks below the launcher (not the launcher processes themselves)."""
    import psutil

    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for p in kids:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "bigtrain" in cmd and "deepspeed.launcher.runner" not in cmd and "deepspeed.launcher.launch" not in cmd:
            ranks.append(p)
    return ranks


def relaunch(nproc: int, argv: list[str]) -> int:
    """Start `nproc` ranks of `bigtrain <argv>` on this machine through DeepSpeed's launcher.

    SIGUSR1 and SIGTERM sent to this process reach the ranks as SIGUSR1, so they finish the
    step, save a checkpoint and exit with the preemption code (DeepSpeed's launcher would kill
    them on SIGTERM without a checkpoint).
    """
    env = dict(os.environ)
    if not has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    # Each rank gets an even share of the cores instead of every rank spawning one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [
        sys.executable, "-u", "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "--no_local_rank", "--module", "bigtrain", *argv,
    ]
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame) -> None:  # noqa: ARG001
        for p in _rank_processes(proc.pid):
            try:
                p.send_signal(signal.SIGUSR1)
            except Exception:  # noqa: BLE001 - a rank that already exited needs nothing
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
