"""Start N local ranks of a Python script directly, without DeepSpeed's launcher.

`python -m deepspeed.launcher.runner` starts a runner and a launch process, each importing
DeepSpeed (several seconds of CPU per run) before the ranks start. The tests only need what the
launcher gives each rank: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (plus
LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, which DeepSpeed's CPU accelerator reads). Imported as
`ranks` (tests/ is on sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import forkserver

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")


def free_port() -> int:
    from bigtrain.process import free_port as bigtrain_free_port  # below the ephemeral range: see there

    return bigtrain_free_port()


def launch_ranks(argv: list[str], nproc: int, env_extra: dict | None = None, timeout: float = 900,
                 grace: float = 60) -> subprocess.CompletedProcess:
    """Run `sys.executable *argv` as `nproc` ranks on this machine (DS_ACCELERATOR=cpu, gloo,
    OMP_NUM_THREADS=1 unless env_extra says otherwise) and wait for all of them.

    returncode: 0 if every rank exited 0, else the code of the first rank seen to fail (in time;
    negative for a signal). Once a rank has failed the others get `grace` seconds to end, as under
    a launcher, then are killed (their -9 does not replace the first failure's code).
    stdout/stderr: every rank's output in rank order, each line prefixed with `[rank R] `.
    Past `timeout` seconds every rank is killed and subprocess.TimeoutExpired is raised, carrying
    the output so far.
    """
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    base.update(env_extra or {})
    base.update(WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_SIZE=str(nproc), CROSS_RANK="0", CROSS_SIZE="1")
    cmd = [sys.executable, *map(str, argv)]
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        outs = [(open(os.path.join(logs, f"{r}.out"), "w+"), open(os.path.join(logs, f"{r}.err"), "w+")) for r in range(nproc)]
        procs = []
        try:
            for r in range(nproc):
                env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
                procs.append(_start(cmd, env, outs[r]))
            first_failure = _wait(procs, outs, cmd, timeout, grace)
            return subprocess.CompletedProcess(cmd, first_failure, _joined(outs, 0), _joined(outs, 1))
        finally:
            _kill(procs)
            for p in procs:
                p.wait()
            for pair in outs:
                for f in pair:
                    f.close()


def _start(cmd: list[str], env: dict, out: tuple):
    if forkserver.available():  # the same rank, forked from the suite's pre-imported server
        with open(os.devnull) as devnull:
            return forkserver.start(cmd[1:], env, tempfile.gettempdir(), devnull.fileno(), out[0].fileno(), out[1].fileno())
    return subprocess.Popen(cmd, env=env, stdout=out[0], stderr=out[1], stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir())


def _wait(procs, outs, cmd, timeout: float, grace: float) -> int:
    t0 = time.monotonic()
    first_failure, failed_at = 0, None
    while True:
        codes = [p.poll() for p in procs]
        if failed_at is None:
            bad = [c for c in codes if c not in (None, 0)]
            if bad:
                first_failure, failed_at = bad[0], time.monotonic()
        if all(c is not None for c in codes):
            return first_failure
        now = time.monotonic()
        if now - t0 > timeout:
            _kill(procs)
            raise subprocess.TimeoutExpired(cmd, timeout, output=_joined(outs, 0), stderr=_joined(outs, 1))
        if failed_at is not None and now - failed_at > grace:
            _kill(procs)
        time.sleep(0.2)


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()


def _joined(outs, which: int) -> str:
    parts = []
    for r, pair in enumerate(outs):
        f = pair[which]
        f.flush()
        f.seek(0)
        parts += [f"[rank {r}] {line}\n" for line in f.read().splitlines()]
    return "".join(parts)
