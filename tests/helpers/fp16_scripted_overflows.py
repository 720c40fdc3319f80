"""bigtrain's real training loop with DeepSpeed's real DynamicLossScaler, fed scripted overflows.

DeepSpeed refuses fp16 on CPU, so this narrowest fake replaces only the overflow decision: the
run trains in fp32 through the real engine, and the trainer's LossScaleWatch reads a real
DeepSpeed DynamicLossScaler that sees an overflow at the steps given. Everything else (metrics,
checkpoints, the stop and its exit code) is bigtrain's own code path.

usage: fp16_scripted_overflows.py INIT_SCALE MIN_SCALE HYSTERESIS OVERFLOW_STEPS(comma list) [key=value ...]
"""

import sys

from bigtrain.config import load_config
from bigtrain.engine import LossScaleWatch
from bigtrain.process import leave
from bigtrain.errors import UserError
from bigtrain.trainer import Trainer, run_trainer

init_scale, min_scale, hysteresis = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
overflow_steps = {int(s) for s in sys.argv[4].split(",") if s}
try:
    trainer = Trainer(load_config(None, sys.argv[5:]))
except UserError as e:
    sys.exit(f"error: {e}")

from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler  # noqa: E402

scaler = DynamicLossScaler(init_scale=init_scale, scale_window=1000, min_scale=min_scale, delayed_shift=hysteresis, consecutive_hysteresis=False)
seen = {"step": trainer.step}


def step_applied() -> bool:
    # DeepSpeed updates its scaler inside engine.step(); the watch asks right after.
    seen["step"] += 1
    overflow = seen["step"] in overflow_steps
    scaler.update_scale(overflow)
    return not overflow


trainer.guard.loss_scale_watch = LossScaleWatch(lambda: scaler.cur_scale, step_applied, min_scale)
leave(run_trainer(trainer))
