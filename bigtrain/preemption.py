"""Stopping cleanly on a signal or before a job's time limit, with every rank at the same step.

A rank that receives SIGUSR1/SIGTERM, or sees the deadline `BIGTRAIN_STOP_AT` (Unix seconds;
bigtrain's SLURM templates set it from the job's end time minus the grace period) coming, raises a
flag. The ranks agree through one tiny all-reduce per step that never touches the accelerator: an
8-byte tensor in host memory on a CPU (gloo) process group, read through a numpy view. It costs a
network round trip of the host thread, and no wait for the device: the GPU keeps working through
the kernels already queued. (An asynchronous version, read one step later, was tried; with it,
ranks of the Slurm tests aborted at exit now and then, "terminate called without an active
exception", a known hazard of gloo async work at interpreter exit: the synchronous flag is simpler.)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional

from bigtrain.process import release_shm_buffers

# Exit code of a rank whose peer was lost (killed, crashed, or stuck past the collective timeout).
RANK_LOST_EXIT_CODE = 4

NO_STOP, SIGNALLED, DEADLINE = 0, 1, 2


class StopSignal:
    def __init__(self, world_size: int, on_cpu: bool) -> None:
        self.world_size, self.on_cpu = world_size, on_cpu
        self.reason = ""
        self._signal: Optional[int] = None
        self._stop_at = float(os.environ["BIGTRAIN_STOP_AT"]) if os.environ.get("BIGTRAIN_STOP_AT") else None
        self._last = time.monotonic()
        self._slowest_step = 0.0
        self.watchdog = None  # a stuck rank exits on SIGTERM at once: it could not save anyway
        self._group = None
        self._flag = None

    def install(self) -> None:
        """Handle SIGUSR1/SIGTERM, and make the CPU group the flag travels on (collective: every rank)."""
        import torch
        import torch.distributed as dist

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)
        if self.world_size > 1 and self._group is None:
            self._group = dist.group.WORLD if self.on_cpu else dist.new_group(backend="gloo")
            self._tensor = torch.zeros(1, dtype=torch.int64)
            self._flag = self._tensor.numpy()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.watchdog is not None and self.watchdog.stuck:
            print(f"rank {self.watchdog.rank} is stuck (see the watchdog's stacks): exiting on signal {signum} without a checkpoint",
                  file=sys.stderr, flush=True)
            release_shm_buffers()
            os._exit(RANK_LOST_EXIT_CODE)
        self._signal = signum

    def _local(self) -> int:
        now = time.monotonic()
        self._slowest_step = max(self._slowest_step, now - self._last)
        self._last = now
        if self._signal is not None:
            return SIGNALLED
        if self._stop_at is not None and time.time() + 2 * self._slowest_step + 30 >= self._stop_at:
            return DEADLINE  # two more steps and a checkpoint might not fit before the deadline
        return NO_STOP

    def poll(self) -> bool:
        """Once per step on every rank: True when the ranks agreed to stop (at this same step)."""
        import torch.distributed as dist

        local = self._local()
        if self.world_size == 1:
            return self._decide(local)
        self._flag[0] = local
        dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, group=self._group)  # host memory, a CPU group
        return self._decide(int(self._flag[0]))

    def _decide(self, code: int) -> bool:
        if code == SIGNALLED:
            name = signal.Signals(self._signal).name if self._signal is not None else "a signal on another rank"
            self.reason = f"received {name}"
        elif code == DEADLINE:
            self.reason = "the job's time limit is near"
        return code != NO_STOP
