"""One run per output directory: rank 0 holds `output_dir/.bigtrain.lock` for the run's whole life.

Two locks, because either alone fails somewhere:
- an OS lock (`fcntl.flock`, exclusive, non-blocking) on `.bigtrain.lock`: exact, and released by
  the kernel when the process dies however it dies, but not reliable across hosts on every
  shared file system (NFS without lockd, some parallel file systems);
- `.bigtrain.lock.json`, naming the owner (host, pid, Slurm job, start time) and when it last
  refreshed it (a daemon thread rewrites it, atomically, every `refresh` seconds): on another
  host, an owner whose refresh is older than `stale_after` seconds is dead.

A second run stops at once, touching nothing. A lock whose owner is gone (same host: its pid no
longer exists; another host: its refresh is stale; or the same Slurm job, requeued) is taken
over with a message, so a requeued Slurm job continues without help. The lock is taken before the checkpoint to resume from is
chosen, so that choice cannot race with another run's pruning.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from bigtrain.errors import UserError

LOCK_NAME = ".bigtrain.lock"
OWNER_NAME = ".bigtrain.lock.json"


def _owner(since: float) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"), "since": since, "refreshed": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    job = f", job {info['job']}" if info.get("job") else ""
    return f"pid {info.get('pid')} on host {info.get('host')}{job}, since {since}"


class RunLock:
    """The lock of one output directory, held from `acquire` to `release`."""

    def __init__(self, output_dir: Path, fd: int, refresh: float) -> None:
        self.owner_path, self._fd, self._refresh = Path(output_dir) / OWNER_NAME, fd, refresh
        self._since = time.time()
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._keep_fresh, name="bigtrain-run-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, output_dir: Path, stale_after: float, log: Callable = print, refresh: Optional[float] = None) -> "RunLock":
        """Take the lock of `output_dir` or raise UserError naming the run that holds it."""
        output_dir = Path(output_dir)
        fd = os.open(output_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        info = _read(output_dir / OWNER_NAME)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"output_dir {output_dir} is in use by another run ({_describe(info)})") from None
        if info and not _owner_gone(info, stale_after):
            os.close(fd)  # the OS lock was free, yet the owner lives on another host: a shared file system
            raise UserError(f"output_dir {output_dir} is in use by another run ({_describe(info)})")
        if info:
            log(f"taking over the lock of output_dir {output_dir} from a run that is gone ({_describe(info)})")
        return cls(output_dir, fd, refresh if refresh is not None else max(1.0, stale_after / 4))

    def _write(self) -> None:
        tmp = self.owner_path.with_name(f"{OWNER_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_owner(self._since)))
        os.replace(tmp, self.owner_path)

    def _keep_fresh(self) -> None:
        while not self._stop.wait(self._refresh):
            try:
                self._write()
            except OSError:
                pass  # a full disk must not end the run here; the next save reports it

    def release(self) -> None:
        """Remove the lock (an orderly end); a killed run leaves it, for the next one to take over."""
        if self._fd < 0:
            return
        self._stop.set()
        try:
            self.owner_path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = -1


def lock_owner(output_dir: Path, stale_after: float = 300.0) -> Optional[tuple[dict, bool]]:
    """(the owner record, whether its run is alive) of output_dir's lock; None when no run holds it
    (never taken, or released by an orderly end). For readers such as `bigtrain report`."""
    path = Path(output_dir) / OWNER_NAME
    if not path.is_file():
        return None
    info = _read(path)
    return info, not _owner_gone(info, stale_after)


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _owner_gone(info: dict, stale_after: float) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if job and info.get("job") == job:
        return True  # this very job before its requeue
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return info["pid"] == os.getpid() or not _pid_alive(info["pid"])
    return time.time() - float(info.get("refreshed", 0)) > stale_after
