"""One optimizer step, and the guard that decides whether training goes on.

`StepRunner.run` takes one step's micro-batches through the DeepSpeed engine (forward,
backward, step) and returns what the step left on the device: its loss and whether its update
was applied. It reads nothing back from the device, so on a GPU the host can queue the next
micro-batch while the current one runs. A step whose gradients hold inf or NaN never changes
the weights, and that is decided on the device too:

  ZeRO 1-3, any precision   DeepSpeed checks the gradient norm and skips the step itself
  bf16 (any stage)          DeepSpeed's bf16 `check_grad_overflow` (on by default)
  fp16 (any stage)          DeepSpeed's dynamic loss scaler skips overflowing steps
  fp32 at ZeRO-0            no DeepSpeed check: `DeviceSkip` sets torch's fused AdamW's
                            `found_inf` (the mechanism GradScaler uses), so the kernel skips the
                            update on the device; the LR schedule still advances on such a step

DeepSpeed's own checks read their verdict on the host (that is DeepSpeed's sync, not
bigtrain's; docs/hot-path.md counts both).

`HealthGuard` holds each step's device-side results until the next step that logs, evaluates,
saves or stops, reads them all at once (one gather over ranks), and turns them into metrics
records and a verdict: go on, or stop with a reason (train.on_nonfinite, max_nonfinite_steps,
a diverged fp16 loss scale, a non-finite step that was applied anyway).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from bigtrain import faults
from bigtrain.engine import DEEPSPEED_MIN_SCALE_MESSAGE, LossScaleWatch


class DeviceSkip:
    """fp32 at ZeRO-0: skip a non-finite step on the device through fused AdamW's `found_inf`."""

    def __init__(self, optimizer, device) -> None:
        import torch

        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.found_inf = torch.zeros((), device=device)
        self.grad_norm = None  # the last step's gradient norm (before clipping), on the device
        optimizer.found_inf = self.found_inf  # read by the fused kernel inside optimizer.step()

    @classmethod
    def attach(cls, engine, device) -> Optional["DeviceSkip"]:
        """A DeviceSkip when the engine's optimizer is torch's fused Adam(W) at ZeRO-0 fp32, else None."""
        import torch

        opt = engine.optimizer
        fused = isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and bool(opt.defaults.get("fused"))
        if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled() or not fused:
            return None
        return cls(opt, device)

    def check(self) -> None:
        """After the boundary's backward (gradients already all-reduced): the gradient norm
        (DeepSpeed does not keep it at ZeRO-0) and whether it is finite, on the device."""
        import torch

        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            self.found_inf.zero_()
            return
        self.grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        self.found_inf.copy_(~torch.isfinite(self.grad_norm))

    def applied(self):
        """1.0 where the last step's update was applied, 0.0 where it was skipped (on the device)."""
        return 1.0 - self.found_inf


@dataclass
class StepResult:
    step: int
    position: int  # data position (samples) of the step's first sample
    loss: Any  # this rank's mean micro-batch loss: a 0-d tensor on the device
    applied: Union[bool, Any]  # DeepSpeed's host verdict, or a 0-d device tensor (DeviceSkip)
    lr: float
    fp16_skip: Optional[dict] = None  # the loss-scale watch's record of an overflow-skipped step


class DivergedError(Exception):
    """DeepSpeed itself gave up (fp16 loss scale below its minimum)."""


class StepRunner:
    """Micro-batches in; the step's loss and applied flag (on the device) out."""

    def __init__(self, engine, device, callbacks: list, named_ranges: bool = False) -> None:
        self.engine, self.device, self.callbacks = engine, device, callbacks
        # train.profile: name each part of the step in the trace (record_function); otherwise the
        # step enters no range at all.
        self.named_ranges = named_ranges
        self.skip = DeviceSkip.attach(engine, device)
        self.nan_steps = faults.nan_loss_steps()
        self.nan_grad_steps = faults.nan_loss_steps("nan_grad")

    def phase(self, name: str) -> None:
        for cb in self.callbacks:
            cb.on_phase(name)

    def run(self, micro_batches: list[dict], step: int, position: int, forward: Callable[[dict], Any]) -> StepResult:
        import torch

        named = _named_range if self.named_ranges else _no_range
        engine = self.engine
        lr = engine.optimizer.param_groups[0]["lr"]  # the lr this step uses (a host float)
        total = torch.zeros((), device=self.device)
        try:
            for m, batch in enumerate(micro_batches):
                with named("bigtrain.forward"):
                    loss = forward({k: v.to(self.device, non_blocking=True) for k, v in batch.items()}).loss
                    if faults.nan_here(self.nan_steps, step, engine.global_rank, m):
                        loss = loss * float("nan")
                    if faults.nan_here(self.nan_grad_steps, step, engine.global_rank, m):
                        loss = loss + 0.0 * torch.sqrt(0.0 * loss)  # the same value; its gradient is NaN
                self.phase("forward")
                boundary = engine.is_gradient_accumulation_boundary()
                with named("bigtrain.backward"):
                    engine.backward(loss)
                    if boundary and self.skip is not None:
                        self.skip.check()
                self.phase("backward")
                with named("bigtrain.optimizer_step"):
                    engine.step()
                self.phase("step")
                total += loss.detach().float()
        except Exception as e:  # noqa: BLE001
            raise_if_floor(e, step)
            raise
        applied = self.skip.applied() if self.skip is not None else engine.was_step_applied()
        return StepResult(step, position, total / len(micro_batches), applied, lr)


def _named_range(name: str):
    from torch.autograd.profiler import record_function

    return record_function(name)


def _no_range(name: str):
    return contextlib.nullcontext()


def raise_if_floor(error: Exception, step: int) -> None:
    """DeepSpeed's own stop at the fp16 loss-scale floor is a bare Exception: name it."""
    if DEEPSPEED_MIN_SCALE_MESSAGE in str(error):
        raise DivergedError(f"fp16 loss scale is at its minimum and step {step} overflowed again (DeepSpeed: {error})") from error


@dataclass
class Verdict:
    records: list = field(default_factory=list)  # metrics records, in step order
    messages: list = field(default_factory=list)  # log lines for rank 0
    stop: Optional[str] = None  # why training must stop (None: go on)
    save_before_stop: bool = False  # the weights are good: keep them in a checkpoint
    losses: list = field(default_factory=list)  # (step, mean loss over ranks) of applied steps


class HealthGuard:
    """The non-finite policy, the fp16 loss-scale watch, and the check that no non-finite step
    was applied. Step results wait on the device until `resolve` reads them all at once."""

    def __init__(self, world_size: int, on_nonfinite: str, max_in_row: int, sample_ids: Callable[[int], list],
                 loss_scale_watch: Optional[LossScaleWatch] = None, counts: Any = None) -> None:
        self.world_size = world_size
        self.on_nonfinite, self.max_in_row = on_nonfinite, max_in_row
        self.sample_ids = sample_ids
        self.loss_scale_watch = loss_scale_watch
        self.pending: list[StepResult] = []
        self.in_row = 0
        # Where the skipped steps are counted (the trainer's TrainState: saved and resumed with it).
        self.counts = counts if counts is not None else SimpleNamespace(skipped_steps=0)

    def add(self, result: StepResult) -> None:
        """Keep a step's device-side result until `resolve`; fp16: ask the loss-scale watch now
        (DeepSpeed's scaler already holds its verdict on the host)."""
        if self.loss_scale_watch is not None:
            try:
                result.fp16_skip = self.loss_scale_watch.after_step(result.step)
            except Exception as e:  # noqa: BLE001
                raise_if_floor(e, result.step)
                raise
        self.pending.append(result)

    def _read(self) -> tuple[list, list]:
        """Every rank's losses and the applied flags of the pending steps: one gather, one read."""
        import torch
        import torch.distributed as dist

        rows = [torch.stack([r.loss.float(), torch.as_tensor(r.applied, dtype=torch.float32, device=r.loss.device)]) for r in self.pending]
        mine = torch.stack(rows)  # (steps, 2)
        if self.world_size > 1:
            every = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(every, mine)
        else:
            every = [mine]
        table = torch.stack(every).cpu().tolist()  # (ranks, steps, 2): the one host read
        losses = [[table[r][i][0] for r in range(self.world_size)] for i in range(len(self.pending))]
        applied = [all(table[r][i][1] > 0.5 for r in range(self.world_size)) for i in range(len(self.pending))]
        return losses, applied

    def resolve(self) -> Verdict:
        verdict = Verdict()
        if not self.pending:
            return verdict
        losses, applied = self._read()
        for result, per_rank, ok in zip(self.pending, losses, applied):
            if verdict.stop:
                break
            self._judge(result, per_rank, ok, verdict)
        self.pending.clear()
        return verdict

    def _judge(self, result: StepResult, per_rank: list[float], applied: bool, verdict: Verdict) -> None:
        step = result.step
        bad_ranks = [r for r, v in enumerate(per_rank) if not math.isfinite(v)]
        if result.fp16_skip is not None:  # fp16: overflow-skipped by DeepSpeed's loss scaler, its own policy
            if not bad_ranks:  # the loss itself was fine: keep it in the curve
                verdict.losses.append((step, sum(per_rank) / len(per_rank)))
            verdict.records.append(result.fp16_skip)
            s = result.fp16_skip
            verdict.messages.append(f"step {step}: fp16 gradients overflowed, step skipped; loss scale {s['loss_scale_before']:g} -> {s['loss_scale']:g}")
            if self.loss_scale_watch is not None and self.loss_scale_watch.floor_step == step:
                verdict.stop = self.loss_scale_watch.floor_message(step)
            return
        if applied and not bad_ranks:
            self.in_row = 0
            verdict.losses.append((step, sum(per_rank) / len(per_rank)))
            return
        if applied:  # a non-finite loss whose update went through: the weights may be damaged
            verdict.stop = f"the loss of step {step} is non-finite on rank(s) {bad_ranks} and the step was applied (the weights may be damaged)"
            return
        self._skipped(result, bad_ranks, verdict)

    def _skipped(self, result: StepResult, bad_ranks: list[int], verdict: Verdict) -> None:
        step = result.step
        self.in_row += 1
        self.counts.skipped_steps += 1
        ids = self.sample_ids(result.position)
        record = {"step": step, "skipped_step": True, "sample_ids": ids}
        if bad_ranks:
            record["nonfinite_loss"] = True
            what = (f"step {step}: the loss is non-finite on rank{'s' if len(bad_ranks) > 1 else ''} "
                    f"{', '.join(map(str, bad_ranks))}; the batch's sample ids: {ids}")
        else:
            record["nonfinite_grad"] = True
            what = f"step {step}: the gradients are non-finite (the loss is finite on every rank); the batch's sample ids: {ids}"
        verdict.records.append(record)
        if self.on_nonfinite == "stop" or self.in_row >= self.max_in_row:
            why = "train.on_nonfinite=stop" if self.on_nonfinite == "stop" else \
                f"{self.in_row} non-finite steps in a row (train.max_nonfinite_steps={self.max_in_row})"
            verdict.stop = f"{what}; stopping: {why}"
            verdict.save_before_stop = True
            return
        verdict.messages.append(f"{what}: step skipped ({self.in_row} in a row; stopping at {self.max_in_row})")
