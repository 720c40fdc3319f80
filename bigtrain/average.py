"""`bigtrain average RUN_DIR --last N | --steps S1,S2,... -o OUT`: the mean of several checkpoints.

Averaging the weights of the last few checkpoints of a pretraining run (a "model soup" of one run,
like an EMA taken late) is a cheap and well-known gain at the end of training. The result is a
Hugging Face model directory, like `bigtrain export`'s:

    mean[name] = (w_1[name] + ... + w_N[name]) / N

over the checkpoints' fp32 master weights (what `bigtrain export` writes), summed in float64 and
written as float32, so N=1 gives the export bit for bit. Any layout the export reads works (ZeRO
0-3, tensor- and expert-parallel checkpoints). Memory is bounded as in the export: one parameter of
each checkpoint at a time, written shard by shard. Only committed checkpoints are used (a
`.tmp-` directory is no checkpoint), and each is checked against its manifest first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from bigtrain.errors import UserError


class _Mean:
    """One parameter's mean over the checkpoints, computed when the export writer asks for it."""

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.shape = parts[0].shape

    def contiguous(self):
        import torch

        total = None
        for part in self.parts:
            t = part.contiguous().to(torch.float64)
            total = t if total is None else total.add_(t)
        return (total / len(self.parts)).to(torch.float32)


def choose(run_dir: str, last: Optional[int], steps: Optional[str]) -> list[Path]:
    """The committed checkpoints to average, oldest first: the last N, or the given steps."""
    from bigtrain.checkpoint import check_checkpoint, list_checkpoints, tag_for

    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        raise UserError(f"average: {run_dir} has no checkpoints/ directory (give a run's output_dir)")
    have = list_checkpoints(root)
    if (last is None) == (steps is None):
        raise UserError("average: give either --last N or --steps S1,S2,...")
    if steps is not None:
        if not re.fullmatch(r"\d+(,\d+)*", steps):
            raise UserError(f"average: --steps must be step numbers separated by commas, got {steps!r}")
        chosen = [root / tag_for(int(s)) for s in dict.fromkeys(steps.split(","))]
        missing = [c.name for c in chosen if c not in have]
        if missing:
            raise UserError(f"average: {root} has no checkpoint {', '.join(missing)} (it has: {', '.join(c.name for c in have) or 'none'})")
    else:
        if last < 1 or last > len(have):
            raise UserError(f"average: --last must be between 1 and the {len(have)} checkpoint(s) in {root}, got {last}")
        chosen = have[-last:]
    for ckpt in chosen:
        problem = check_checkpoint(ckpt)
        if problem is not None:
            raise UserError(f"average: checkpoint {ckpt} is damaged: {problem}")
    return sorted(chosen, key=lambda c: int(c.name.split("_")[1]))


def average(run_dir: str, out_dir: str, last: Optional[int] = None, steps: Optional[str] = None, overwrite: bool = False,
            trust: bool = False, log=print) -> Path:
    """Write the mean of the chosen checkpoints' weights into `out_dir` (a Hugging Face directory)."""
    from bigtrain.export import DEFAULT_MAX_SHARD_BYTES, checkpoint_weights, write_model

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"average: {out} exists and is not empty (pass --overwrite to replace it)")
    chosen = choose(run_dir, last, steps)
    log(f"average: {len(chosen)} checkpoint(s): {', '.join(c.name for c in chosen)}")
    weights = [checkpoint_weights(c, trust, what="average") for c in chosen]
    first = weights[0]
    for w, ckpt in zip(weights[1:], chosen[1:]):
        if w.names != first.names or any(tuple(w.lazy[n].shape) != tuple(first.lazy[n].shape) for n in first.names):
            raise UserError(f"average: checkpoint {ckpt} holds other parameters than {chosen[0]} (another model): cannot average them")
    mean = {n: _Mean([w.lazy[n] for w in weights]) for n in first.names}
    return write_model(weights[-1], mean, out, DEFAULT_MAX_SHARD_BYTES)
