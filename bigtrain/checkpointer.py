"""The trainer's checkpoint policy: which checkpoint to resume from, when a save is the best one,
and what survives pruning. The files themselves (layout, manifest, crash safety, safe loading)
are bigtrain.checkpoint's.

Resume: rank 0 chooses (the newest checkpoint that matches its manifest; damaged ones skipped with
the reason) before anything is overwritten, and broadcasts its choice once the process group is
up, so the other ranks never re-verify a checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from bigtrain import checkpoint as ckpt_io
from bigtrain import tasks


class Checkpointer:
    def __init__(self, output_dir: Path, rank: int, keep_last: int, best_metric: Optional[str]) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.rank, self.keep_last = rank, keep_last
        self.best_metric = best_metric  # kept and exported instead of the last one (None: the last)
        self.best: Optional[dict] = None
        self.best_report: Optional[str] = None
        self.resume_from: Optional[Path] = None
        self.saver = None  # bigtrain.async_save.AsyncSaver with train.async_save

    # ------------------------------------------------------------------ resume

    def choose(self, resume: Optional[str], log: Callable[[str], None]) -> Optional[Path]:
        """Rank 0, before the process group exists: the checkpoint to resume from (or None)."""
        self.resume_from = ckpt_io.choose_resume(resume, self.root, log)
        if resume == "auto" and self.resume_from is None and ckpt_io.list_checkpoints(self.root):
            log("--resume auto: no complete checkpoint left: starting from step 0")
        return self.resume_from

    def share_choice(self) -> Optional[Path]:
        """Every rank, once the group is up: rank 0's choice."""
        import torch.distributed as dist

        box = [str(self.resume_from) if self.resume_from is not None else None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        self.resume_from = Path(box[0]) if box[0] is not None else None
        if self.resume_from is not None:
            self.best = ckpt_io.read_best(self.root)
        return self.resume_from

    def load(self, engine, universal: bool, trust: bool) -> dict:
        return ckpt_io.load(engine, self.resume_from, self.rank, universal=universal, trust=trust)

    # ------------------------------------------------------------------ saving

    def save(self, engine, state: dict, hf_config, tokenizer) -> Path:
        return ckpt_io.save(engine, self.root, state, self.rank, hf_config, tokenizer, self.keep_last)

    def write_in_background(self, engine, enabled: bool) -> None:
        """train.async_save: `start_save` saves are written by a background thread (bigtrain/async_save.py)."""
        if enabled:
            from bigtrain.async_save import AsyncSaver

            self.saver = AsyncSaver(engine, self.root, self.rank, self.keep_last)

    def start_save(self, state: dict, hf_config, tokenizer, note: dict) -> Path:
        """The blocking part of a background save; `land` commits it later (bigtrain/async_save.py)."""
        return self.saver.start(state, hf_config, tokenizer, note)

    def in_flight(self) -> bool:
        return self.saver is not None and self.saver.pending is not None

    def land(self, wait: bool):
        """The background save, committed (None: none in flight, or not written yet and not `wait`)."""
        if not self.in_flight():
            return None
        return self.saver.wait() if wait else self.saver.poll()

    def join_writer(self) -> None:
        """This rank's writer is done (no collective: any exit path)."""
        if self.saver is not None:
            self.saver.join()

    def _beats_best(self, record: dict) -> bool:
        """Is this evaluation better than the best so far? (On a tie, the lower eval loss wins.)"""
        if not self.best_metric or self.best_metric not in record:
            return False
        old = self.best["value"] if self.best else None
        tie = old is not None and record[self.best_metric] == old
        better = tasks.metric_is_better(self.best_metric, record[self.best_metric], old)
        return better or (tie and record.get("eval_loss", math.inf) < self.best.get("eval_loss", math.inf))

    def is_best(self, record: dict) -> bool:
        return self._beats_best(record)

    def mark_best(self, ckpt: Path, record: dict, step: int, report: Optional[str]) -> None:
        """`ckpt` holds the best evaluation so far, unless one that committed since is better (a
        background save commits after later evaluations were judged)."""
        if not self._beats_best(record):
            return
        self.best = {"tag": ckpt.name, "metric": self.best_metric, "value": record[self.best_metric], "step": step,
                     "eval_loss": record.get("eval_loss")}
        self.best_report = report
        if self.rank == 0:
            ckpt_io.write_best(self.root, self.best)

    def export_source(self) -> tuple[Path, Optional[str]]:
        """What to export at the end: the best checkpoint when there is one, else the latest."""
        if self.best is not None and (self.root / self.best["tag"]).is_dir():
            b = self.best
            return self.root / b["tag"], f"best {b['metric']} {b['value']:.4f} at step {b['step']}: exporting {self.root / b['tag']}"
        return self.root, None

    def latest(self) -> Optional[Path]:
        """The newest whole checkpoint, for a message: files and sizes checked, not re-hashed
        (every rank may ask, and hashing a large checkpoint takes minutes)."""
        for ckpt in reversed(ckpt_io.list_checkpoints(self.root)):
            if ckpt_io.check_checkpoint(ckpt, checksums=False) is None:
                return ckpt
        return None
