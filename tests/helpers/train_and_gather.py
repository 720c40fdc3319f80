"""Train with bigtrain's Trainer, then save the engine's full fp32 weights (gathered under ZeRO-3).

usage (one process per rank): train_and_gather.py OUT.pt key=value ...
The weights come from the live engine, not from a checkpoint, so a test can compare them with
what `bigtrain export` reconstructs from the checkpoint on disk.
"""

import sys

import deepspeed
import torch

from bigtrain.config import load_config
from bigtrain.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config(None, overrides))
trainer.train()
params = dict(trainer.engine.module.named_parameters())
stage3 = trainer.ds_config["zero_optimization"]["stage"] == 3
with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage3):
    weights = {name: p.detach().clone().float() for name, p in params.items()}
if trainer.env.rank == 0:
    torch.save(weights, out)
trainer.finish(sample=False)
