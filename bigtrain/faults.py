"""Fault injection for the reliability tests (tests/test_reliability.py, RELIABILITY.md).

`BIGTRAIN_FAULT` holds comma-separated faults; unset (always, outside tests) nothing happens.
  kill_in_save@S         SIGKILL rank 0 after every rank wrote checkpoint S, before it is sealed
  kill@S:R               SIGKILL rank R when step S starts
  crash@S:R              rank R raises an exception nothing handles when step S starts (a crash
                         that unwinds: atexit handlers run, unlike kill)
  hang@S:R:SECONDS       rank R sleeps SECONDS when step S starts (a stuck rank)
  nan_loss@S[+S2...]     the loss of steps S, S2, ... is NaN on every rank (a loss spike);
  nan_loss@S:R[:M]       ... on rank R only (and only its micro-batch M of the step)
  nan_grad@S[+S2...][:R[:M]]  the same steps' gradients are NaN while their loss stays finite
                         (loss + 0*sqrt(0*loss): value unchanged, d/dloss = NaN)
  kill_in_prepare@T      SIGKILL the `bigtrain data prepare` process running task T, mid-task
  enospc_in_save@S:R     rank R's write of checkpoint S fails with ENOSPC (a full disk, where no
                         small file system can be mounted for the test)
  slow_data@MS           building each global batch takes MS milliseconds longer (slow storage)
  slow_save@S:SECONDS[:R]  the background writer of checkpoint S (train.async_save) waits SECONDS
                         before writing (on rank R only, or every rank): slow storage
  attn_check_fail        the fused-attention self-check fails its first case (a GPU where the
                         kernel is wrong: bigtrain/kernels/selfcheck.py)
Each fault is the narrowest stand-in for the real event: everything around it runs as it would.
"""

from __future__ import annotations

import functools
import os
import signal
import time


def _faults() -> dict[str, list[list[str]]]:
    """The faults of this process's BIGTRAIN_FAULT. Read at each call, not once at import: the
    test suite's fork server imports bigtrain before a child's environment is set."""
    return _parse(os.environ.get("BIGTRAIN_FAULT") or "")


@functools.lru_cache(maxsize=8)
def _parse(spec: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for item in filter(None, spec.split(",")):
        name, _, args = item.strip().partition("@")
        out.setdefault(name, []).append(args.split(":"))
    return out


def maybe_kill_in_save(step: int) -> None:
    for args in _faults().get("kill_in_save", []):
        if int(args[0]) == step:
            os.kill(os.getpid(), signal.SIGKILL)


def at_step_start(step: int, rank: int) -> None:
    faults = _faults()
    for args in faults.get("kill", []):
        if int(args[0]) == step and int(args[1]) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
    for args in faults.get("crash", []):
        if int(args[0]) == step and int(args[1]) == rank:
            raise RuntimeError(f"BIGTRAIN_FAULT crash@{step}:{rank}")
    for args in faults.get("hang", []):
        if int(args[0]) == step and int(args[1]) == rank:
            time.sleep(float(args[2]))


def data_delay() -> None:
    for args in _faults().get("slow_data", []):
        time.sleep(float(args[0]) / 1000)


def slow_save(step: int, rank: int) -> None:
    for args in _faults().get("slow_save", []):
        if int(args[0]) == step and (len(args) < 3 or int(args[2]) == rank):
            time.sleep(float(args[1]))


def nan_loss_steps(kind: str = "nan_loss") -> dict[int, tuple]:
    """{step: (rank or None, micro-batch index or None)} of the nan_loss (or nan_grad) faults."""
    out = {}
    for args in _faults().get(kind, []):
        rank = int(args[1]) if len(args) > 1 else None
        micro = int(args[2]) if len(args) > 2 else None
        out.update({int(s): (rank, micro) for s in args[0].split("+")})
    return out


def nan_here(nan_steps: dict, step: int, rank: int, micro: int) -> bool:
    """Does the fault hit this micro-batch (nan_loss@S, @S:R or @S:R:M; the same for nan_grad)?"""
    if step not in nan_steps:
        return False
    want_rank, want_micro = nan_steps[step]
    return (want_rank is None or want_rank == rank) and (want_micro is None or want_micro == micro)


def in_prepare_task(task: int) -> None:
    for args in _faults().get("kill_in_prepare", []):
        if int(args[0]) == task:
            os.kill(os.getpid(), signal.SIGKILL)


def maybe_enospc_in_save(step: int, rank: int) -> None:
    import errno

    for args in _faults().get("enospc_in_save", []):
        if int(args[0]) == step and int(args[1]) == rank:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def attn_check_fails() -> bool:
    return "attn_check_fail" in _faults()
