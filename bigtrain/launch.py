"""Local multi-process launch: `bigtrain train --nproc N` re-runs itself under the deepspeed launcher."""

from __future__ import annotations

import os
import subprocess
import sys

from bigtrain.engine import free_port, has_cuda


def under_launcher() -> bool:
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or int(env.get("SLURM_NTASKS", "1") or 1) > 1


def relaunch(nproc: int, argv: list[str]) -> int:
    """Start `nproc` ranks of `bigtrain <argv>` on this machine through DeepSpeed's launcher."""
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
    return subprocess.call(cmd, env=env)
