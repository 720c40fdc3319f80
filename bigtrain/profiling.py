"""`train.profile: {start: S, steps: N}`: a torch.profiler trace of steps S .. S+N-1 on every rank.

Each rank writes output_dir/profile/rank{R}_steps{S}-{E}.json, a Chrome trace (open it in
https://ui.perfetto.dev or chrome://tracing), and on CUDA rank{R}_memory.pickle, a memory
snapshot for https://pytorch.org/memory_viz. Inside the trace every step is a range
"bigtrain.step N" holding its parts, "bigtrain.forward", "bigtrain.backward" and
"bigtrain.optimizer_step" (one each per micro-batch: StepRunner names them), around the
operators torch records.
The run goes on after the window; the profiler is idle (not even imported) outside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bigtrain.api import Callback


class StepProfiler(Callback):
    """Starts torch.profiler before step `start`, stops it and writes the traces after the last."""

    def __init__(self, start: int, steps: int, first_step: int, output_dir: Path, rank: int, cuda: bool, log) -> None:
        self.start, self.end = start, start + steps - 1
        self.first_step = first_step  # the step this attempt starts at (after a resume: checkpoint + 1)
        self.dir, self.rank, self.cuda, self.log = Path(output_dir) / "profile", rank, cuda, log
        self.prof = None
        self._ranges: list = []
        self.last_done = first_step - 1

    def on_train_start(self, state) -> None:  # noqa: ARG002
        if self.start <= self.first_step <= self.end:  # a resume inside the window traces the rest of it
            self._begin(self.first_step)

    def on_step_end(self, state, result) -> None:  # noqa: ARG002
        step = self.last_done = state.step
        if self.prof is None:
            if step + 1 == self.start:
                self._begin(step + 1)
            return
        self._close_range()
        if step >= self.end:
            self._finish()
        else:
            self._open_range(f"bigtrain.step {step + 1}")

    def _begin(self, step: int) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self.prof.start()
        self.first_traced = step
        self._open_range(f"bigtrain.step {step}")

    def _open_range(self, name: str) -> None:
        from torch.autograd.profiler import record_function

        r = record_function(name)
        r.__enter__()
        self._ranges.append(r)

    def _close_range(self) -> None:
        if self._ranges:
            self._ranges.pop().__exit__(None, None, None)

    def _finish(self) -> Optional[Path]:
        import torch

        while self._ranges:
            self._close_range()
        self.prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"rank{self.rank}_steps{self.first_traced}-{self.end}.json"
        self.prof.export_chrome_trace(str(trace))
        self.prof = None
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"rank{self.rank}_memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.log(f"profile of steps {self.first_traced}-{self.end}: {trace} (open in https://ui.perfetto.dev)"
                 + (f"; memory snapshot {self.dir / f'rank{self.rank}_memory.pickle'} (https://pytorch.org/memory_viz)" if self.cuda else ""))
        return trace

    def close(self) -> None:
        """The run ended inside the window (a stop, a divergence): write what was traced."""
        if self.prof is not None:
            self.end = self.last_done
            self._finish()
