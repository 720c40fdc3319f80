"""Train with bigtrain's Trainer, then save the engine's full fp32 weights (gathered under ZeRO-3)
and evidence, read from the live engine, of which memory options really ran.

usage (one process per rank): train_and_gather.py OUT.pt key=value ...
The weights come from the live engine, not from a checkpoint, so a test can compare them with
what `bigtrain export` reconstructs from the checkpoint on disk.

Rank 0 also writes OUT.pt's stem + ".engine.json" next to it:
- the ZeRO optimizer wrapper and the optimizer DeepSpeed really steps (torch AdamW, or
  DeepSpeedCPUAdam when the optimizer is offloaded), the wrapper's own offload flags, the device
  ZeRO-3 keeps partitioned parameters on, and the dtype the module's weights are in;
- how many deepspeed.zero.Init contexts were opened while the model was built, and the mean and
  standard deviation of each weight before step 1;
- how many times the first transformer block's computation ran in training mode. transformers
  checkpoints a block's `forward` (not `__call__`), so hooks on the block itself stay outside the
  checkpoint and fire once per step either way; the block's submodules run inside it, so a
  forward hook on its first submodule counts the forward and, with activation checkpointing,
  the recomputation in the backward as well. Both counts are recorded.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from bigtrain.config import load_config
from bigtrain.process import leave
from bigtrain.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]

# Count the deepspeed.zero.Init contexts opened while the model is built (module=None: parameters
# created partitioned, as transformers does under ZeRO-3's zero3_init; DeepSpeed's engine later
# converts an already built module with Init(module=...), which is not counted).
zero_init_contexts = 0
_init = deepspeed.zero.Init.__init__


def counting_init(self, module=None, *args, **kwargs):
    global zero_init_contexts
    zero_init_contexts += module is None
    _init(self, module, *args, **kwargs)


deepspeed.zero.Init.__init__ = counting_init
trainer = Trainer(load_config(None, overrides))
deepspeed.zero.Init.__init__ = _init
engine = trainer.engine
stage3 = trainer.ds_config["zero_optimization"]["stage"] == 3
start_params = list(engine.module.parameters())
with deepspeed.zero.GatheredParameters(start_params, enabled=stage3):
    initial = {name: [p.detach().float().mean().item(), p.detach().float().std().item()] for name, p in engine.module.named_parameters()}

# The first block: the first element of the first ModuleList (GPT-2's transformer.h, Llama's
# model.layers, BERT's encoder.layer).
block_name, block = next((f"{name}.0", mod[0]) for name, mod in trainer.model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod))
inner_name, inner = next(iter(block.named_children()))
counts = {"block": 0, "inner": 0}


def counter(key):
    def hook(module, args, output):  # noqa: ARG001
        if module.training:  # evaluation forwards (model.eval()) are not training steps
            counts[key] += 1
    return hook


block.register_forward_hook(counter("block"))
inner.register_forward_hook(counter("inner"))

trainer.train()

params = dict(engine.module.named_parameters())
with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage3):
    weights = {name: p.detach().clone().float() for name, p in params.items()}

wrapper = engine.optimizer
base = wrapper
while hasattr(base, "optimizer") and isinstance(getattr(base, "optimizer"), torch.optim.Optimizer):
    base = base.optimizer
offload_param_cfg = engine.zero_offload_param()


def enum_value(x):
    return None if x is None else str(getattr(x, "value", x))


evidence = {
    "zero_stage": engine.zero_optimization_stage(),
    "optimizer_wrapper": type(wrapper).__name__,
    "optimizer": type(base).__name__,
    "optimizer_module": type(base).__module__,
    # ZeRO-1/2 keep the flag as cpu_offload, ZeRO-3 as offload_optimizer / offload_param.
    "wrapper_cpu_offload": getattr(wrapper, "cpu_offload", None),
    "wrapper_offload_optimizer": getattr(wrapper, "offload_optimizer", None),
    "wrapper_offload_param": getattr(wrapper, "offload_param", None),
    "param_offload_device": enum_value(getattr(getattr(wrapper, "parameter_offload", None), "offload_device", None)),
    "engine_zero_cpu_offload": engine.zero_cpu_offload(),
    "engine_offload_param_device": enum_value(offload_param_cfg.device) if offload_param_cfg is not None else None,
    "bf16": engine.bfloat16_enabled(),
    "module_dtype": str(next(iter(params.values())).dtype),
    "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
    "block": block_name,
    "block_forwards": counts["block"],
    "inner": f"{block_name}.{inner_name}",
    "inner_forwards": counts["inner"],
    "zero_init_contexts": zero_init_contexts,
    "initial_mean_std": initial,  # of the gathered weights before step 1
}
if trainer.env.rank == 0:
    torch.save(weights, out)
    Path(out).with_suffix(".engine.json").write_text(json.dumps(evidence, indent=1) + "\n")
trainer.finish(sample=False)
trainer.close()  # tear the process group down before exit (gloo can abort at interpreter exit otherwise)
leave(0)
