"""What a run tells: log lines, metrics.jsonl (one JSON object per line), TensorBoard, a progress
bar and a loss-curve PNG, all from rank 0: records and the bar through `RunLog`, log lines through
the logger `setup_logging` configures.

Log lines go through the standard `logging` module (logger "bigtrain"): rank 0 shows INFO and
above, the other ranks only warnings and errors, prefixed with their rank. While the progress bar
is on screen, lines are written through tqdm so the bar stays intact.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

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
    """Rank 0's metrics.jsonl + TensorBoard and the progress bar (log lines: `setup_logging`)."""

    def __init__(self, output_dir: Path, rank: int, resume_step: Optional[int] = None) -> None:
        self.rank = rank
        self.writer = MetricsWriter(output_dir, rank == 0, resume_step=resume_step)
        self.bar = None

    def record(self, record: dict) -> None:
        self.writer.write(record)

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

    def close(self) -> None:
        self.close_bar()
        self.writer.close()


class MetricsWriter:
    def __init__(self, output_dir: Path, enabled: bool, resume_step: Optional[int] = None) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Records past the checkpoint belong to the interrupted attempt: drop them.
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"))
        except Exception:  # noqa: BLE001 - TensorBoard is optional; metrics.jsonl is the record
            self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled or self._file.closed:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
