"""What a run tells: log lines, metrics.jsonl (one JSON object per line), the trackers of
train.report_to (TensorBoard, wandb, MLflow: bigtrain/trackers.py), a progress bar and a
loss-curve PNG, all from rank 0: records and the bar through `RunLog`, log lines through the
logger `setup_logging` configures.

Log lines go through the standard `logging` module (logger "bigtrain"): rank 0 shows INFO and
above, the other ranks only warnings and errors, prefixed with their rank. While the progress bar
is on screen, lines are written through tqdm so the bar stays intact.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

from bigtrain.flops import peak_memory

logger = logging.getLogger("bigtrain")


class _TqdmAwareHandler(logging.Handler):
    """stderr, through tqdm.write while a bar is shown (so the bar is redrawn below the line)."""

    def __init__(self) -> None:
        super().__init__()
        self.bar = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never end a run
            self.handleError(record)


_handler = _TqdmAwareHandler()


def setup_logging(rank: int) -> logging.Logger:
    """Configure the "bigtrain" logger for this rank (idempotent)."""
    fmt = "%(message)s" if rank == 0 else f"rank {rank}: %(message)s"
    _handler.setFormatter(logging.Formatter(fmt))
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


class RunLog:
    """Rank 0's records (metrics.jsonl, then each tracker of train.report_to) and the progress
    bar; log lines go through `setup_logging`'s logger."""

    def __init__(self, output_dir: Path, rank: int, resume_step: Optional[int] = None, trackers=None) -> None:
        self.rank = rank
        self.writer = MetricsWriter(output_dir, rank == 0, resume_step=resume_step)
        self.trackers = trackers  # bigtrain.trackers.Trackers on rank 0, else None
        self.bar = None

    def record(self, record: dict) -> None:
        self.writer.write(record)
        if self.trackers is not None:
            self.trackers.log(record)

    def open_bar(self, start: int, total: int, enabled: bool) -> None:
        if self.rank == 0 and enabled:
            from tqdm import tqdm

            self.bar = _handler.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def advance(self, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(**postfix)
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = _handler.bar = None

    def close(self, status: str = "FINISHED") -> None:
        """status (MLflow's words): FINISHED, KILLED (preempted: to be resumed) or FAILED."""
        self.close_bar()
        self.writer.close()
        if self.trackers is not None:
            self.trackers.close(status)


class MetricsWriter:
    def __init__(self, output_dir: Path, enabled: bool, resume_step: Optional[int] = None) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Records past the checkpoint belong to the interrupted attempt: drop them.
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            self._file.close()


class StepMeter:
    """The numbers that explain the steps since the last log, from host clocks alone (no device
    read: the log step's own read-back has already waited for the device, so the average over
    the interval is exact): step time, tokens/s, MFU, the fraction of time spent waiting for
    data, peak memory. MFU follows bigtrain/flops.py (the convention `bench train` uses)."""

    def __init__(self, tokens_per_step: int, world_size: int, cuda: bool, flops_per_token: float, peak_flops: Optional[float]) -> None:
        self.tokens_per_step, self.world_size, self.cuda = tokens_per_step, world_size, cuda
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._then: Optional[tuple] = None

    def start(self, step: int, data_wait: float) -> None:
        self._then = (time.perf_counter(), step, data_wait)

    def measure(self, step: int, data_wait: float) -> dict:
        """{step_time, tokens_per_s, mfu, data_wait, mem_*_gb} over the steps since `start` or
        the last `measure`; data_wait is the loader's total wait so far (seconds)."""
        now = time.perf_counter()
        then, since, waited = self._then or (now, step, data_wait)
        self._then = (now, step, data_wait)
        elapsed = max(now - then, 1e-9)
        steps = max(step - since, 1)
        out = {"step_time": elapsed / steps, "tokens_per_s": self.tokens_per_step * steps / elapsed,
               "data_wait": min(max((data_wait - waited) / elapsed, 0.0), 1.0)}
        if self.peak_flops:
            out["mfu"] = self.flops_per_token * out["tokens_per_s"] / self.world_size / self.peak_flops
        out.update(peak_memory(self.cuda, reset=True))
        return out


def _step_of(line: str) -> float:
    """A record's step; a line cut short by a crash counts as past any checkpoint (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut short (a run killed mid-write) is left out."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def plot_loss_curve(metrics_path: Path, out_png: Path) -> Optional[Path]:
    """Training loss and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"bigtrain: {Path(metrics_path).parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
