"""Hangs and lost ranks: a per-rank step watchdog, and naming the ranks a failed collective lost.

Every collective has a timeout (deepspeed.timeout_minutes), so a dead or stuck peer ends the
job instead of hanging it. Before that timeout fires, each rank's watchdog sees its own step
running far longer than the recent median and prints every thread's Python stack
(faulthandler): the stuck rank shows where it is stuck, the waiting ranks show the collective
they wait in. When a collective then fails, the survivors check in through the rendezvous
store; a rank that does not check in within a few seconds is the one that was lost.
"""

from __future__ import annotations

import faulthandler
import statistics
import sys
import threading
import time
from collections import deque
from typing import Optional


class StepWatchdog:
    """Dumps this rank's stacks once per step that runs longer than
    max(min_seconds, factor x the median of the last 50 steps)."""

    def __init__(self, rank: int, factor: float, min_seconds: float, poll_seconds: float = 0.5) -> None:
        self.rank, self.factor, self.min_seconds, self.poll = rank, factor, min_seconds, poll_seconds
        self._durations: deque = deque(maxlen=50)
        self._step: Optional[int] = None
        self._started = 0.0
        self.stuck = False  # the current step is overdue and its stacks were dumped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bigtrain-watchdog", daemon=True)

    def start(self) -> "StepWatchdog":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def step_started(self, step: int) -> None:
        self._started, self._step, self.stuck = time.monotonic(), step, False

    def step_finished(self) -> None:
        if self._step is not None:
            self._durations.append(time.monotonic() - self._started)
        self._step = None

    def limit(self) -> float:
        median = statistics.median(self._durations) if len(self._durations) >= 3 else 0.0
        return max(self.min_seconds, self.factor * median)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            step = self._step
            if step is None or self.stuck:
                continue
            elapsed = time.monotonic() - self._started
            if elapsed > self.limit():
                self.stuck = True
                median = statistics.median(self._durations) if self._durations else float("nan")
                print(f"watchdog: rank {self.rank}: step {step} has run {elapsed:.1f}s (median step {median:.2f}s); "
                      f"its Python stacks follow", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()


def lost_ranks(rank: int, world_size: int, wait_seconds: float = 5.0) -> Optional[list[int]]:
    """After a failed collective: the ranks that do not check in within `wait_seconds`.

    None when the rendezvous store itself is gone (it lives on the rank-0 host).
    """
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    try:
        store = c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(wait_seconds, 1.0)))
        store.set(f"bigtrain/alive/{rank}", "1")
        deadline = time.monotonic() + wait_seconds
        while True:
            present = {r for r in range(world_size) if store.check([f"bigtrain/alive/{r}"])}
            if len(present) == world_size or time.monotonic() > deadline:
                return [r for r in range(world_size) if r not in present]
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - an unreachable store is itself the diagnosis
        return None


class RankLost(Exception):
    """A collective failed because another rank is gone or stuck."""

    def __init__(self, step: int, lost: Optional[list], cause: BaseException) -> None:
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        who = (f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))}") if lost else "rank 0 (its rendezvous store is unreachable)"
        super().__init__(f"lost {who} during step {step}: it stopped answering (the collective failed with: {first})")


def raise_if_rank_lost(error: RuntimeError, step: int, rank: int, world_size: int) -> None:
    """If a peer is gone, raise RankLost naming it; otherwise return (the error is our own)."""
    if world_size == 1:
        return
    lost = lost_ranks(rank, world_size)
    if lost is None or lost:
        raise RankLost(step, lost, error) from error
