"""Local multi-process launch: `bigtrain train --nproc N` starts N ranks of itself on this machine.

The ranks are started directly, as torchrun does, with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT in their environment: one Python process per rank and this one waiting. (It used
to go through DeepSpeed's launcher, which adds two more Python processes that each import
DeepSpeed: seconds per run, and nothing the ranks need. `deepspeed --num_gpus N --module bigtrain`
still works and is tested.)

The parent's duties:
- SIGUSR1 and SIGTERM sent to it reach every rank as SIGUSR1, so they finish the step, save a
  checkpoint and exit with the preemption code. Ranks still running `stop_grace` seconds later
  (default STOP_GRACE, `--stop-grace`) are killed, each named on stderr: a rank stuck in a
  collective must not hold the allocation until the scheduler's time limit (torchrun's agent
  escalates the same way).
- When a rank dies, the others get time to notice (their next collective fails and they exit with
  the lost-rank code, naming the rank) before they are stopped (`_wait_all`).
- The exit code is the most telling one among the ranks: a bigtrain code (2 bad input, 3 diverged,
  4 a rank lost, 5 a checkpoint could not be written, 75 preempted) before any other non-zero
  code, else 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bigtrain.process import free_port, has_cuda

TERM_AFTER = 10.0
GRACE_SECONDS = 60.0
# After a forwarded stop signal: long enough to finish a step and write a checkpoint.
STOP_GRACE = 300.0
# Exit codes that say what happened, most specific first.
TELLING_CODES = (2, 4, 5, 3, 75)


def under_launcher() -> bool:
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or int(env.get("SLURM_NTASKS", "1") or 1) > 1


def rank_env(base: dict, rank: int, nproc: int, port: int) -> dict:
    env = dict(base)
    if not has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    # Each rank gets an even share of the cores instead of every rank spawning one thread per core.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # LOCAL_SIZE, CROSS_RANK and CROSS_SIZE are what DeepSpeed's launcher also sets (its CPU accelerator
    # counts devices from LOCAL_SIZE).
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), LOCAL_SIZE=str(nproc), CROSS_RANK="0", CROSS_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def exit_code(codes: list) -> int:
    """One exit code for the job from the ranks' codes (None: still running, treated as killed)."""
    for telling in TELLING_CODES:
        if telling in codes:
            return telling
    return next((c if c is not None and c > 0 else 1 for c in codes if c != 0), 0)


def start_rank(argv: list[str], env: dict) -> subprocess.Popen:
    """One rank: `python -u -m bigtrain <argv>` with the rank's environment. (The test suite's
    fork server replaces this in the launchers it forks, tests/forkserver.py.)"""
    return subprocess.Popen([sys.executable, "-u", "-m", "bigtrain", *argv], env=env)


def relaunch(nproc: int, argv: list[str], stop_grace: float | None = None) -> int:
    """Start `nproc` ranks of `bigtrain <argv>` on this machine and wait for them."""
    port = free_port()
    procs = [start_rank(argv, rank_env(os.environ, r, nproc, port)) for r in range(nproc)]
    signalled: list[float] = []  # when the first stop signal was forwarded

    def forward(signum, frame) -> None:  # noqa: ARG001
        print(f"bigtrain: received {signal.Signals(signum).name}: asking every rank to finish its step, save and stop",
              file=sys.stderr, flush=True)
        signalled[:] = signalled or [time.monotonic()]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGUSR1)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return exit_code(_wait_all(procs, signalled, STOP_GRACE if stop_grace is None else stop_grace))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _kill_running(procs: list, why: str) -> list:
    for rank, p in enumerate(procs):
        if p.poll() is None:
            print(f"bigtrain: rank {rank} (pid {p.pid}) still running {why}: killing it", file=sys.stderr, flush=True)
            p.kill()
    return [p.wait() for p in procs]


def _wait_all(procs: list, signalled: list, stop_grace: float) -> list:
    """Wait for every rank. Once one has failed, the others get TERM_AFTER seconds to end by
    themselves, then SIGTERM (a stuck rank exits at once on it, see trainer.StopSignal), then
    SIGKILL after GRACE_SECONDS. Once a stop signal was forwarded (`signalled` holds its time),
    ranks still running after `stop_grace` seconds get SIGKILL."""
    failed_at, termed = None, False
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if signalled and time.monotonic() - signalled[0] > stop_grace:
            return _kill_running(procs, f"{stop_grace:g}s after the stop signal")
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        waited = time.monotonic() - failed_at if failed_at is not None else 0.0
        if waited > TERM_AFTER and not termed:
            termed = True
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if waited > GRACE_SECONDS:
            return _kill_running(procs, f"{GRACE_SECONDS:.0f}s after another rank failed")
        time.sleep(0.1)
