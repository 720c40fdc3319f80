"""What an evaluation returns (`Evaluation`) and how it reaches the other ranks (`Comm`), shared by
the built-in tasks (tasks.py, chat.py), a user's task (bigtrain.api) and `bigtrain eval`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Evaluation:
    record: dict  # eval_* metrics for metrics.jsonl
    line: str = ""  # one line for the log
    report: Optional[str] = None  # a longer per-class report (labeled tasks)


class Comm:
    """How an evaluation reaches the other ranks: torch.distributed in training, nothing in
    `bigtrain eval` (one process)."""

    def __init__(self, rank: int = 0, world: int = 1, device=None, data: Optional[tuple[int, int]] = None) -> None:
        import torch

        self.rank, self.world = rank, world
        # Which share of the examples this rank evaluates: (data-parallel rank, size). Ranks of a
        # tensor- or sequence-parallel group evaluate the same examples (their sums count each
        # example that many times over, in the numerator and the denominator alike).
        self.data_rank, self.data_world = data if data is not None else (rank, world)
        self.device = device if device is not None else torch.device("cpu")

    def all_reduce(self, tensor) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def all_gather_object(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def rank_slices(n: int, micro: int, world: int, rank: int) -> list[np.ndarray]:
    """Evaluation batches of this rank: every example once over all ranks, the same number of
    batches on each rank (ZeRO-3 needs every rank in every forward); -1 marks padding."""
    per_rank = -(-n // world)
    mine = np.arange(rank, n, world)
    mine = np.concatenate([mine, -np.ones(per_rank - len(mine), dtype=np.int64)]).astype(np.int64)
    return [mine[i : i + micro] for i in range(0, max(per_rank, 1), micro)]
