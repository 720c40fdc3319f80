"""Bytes of activations one training forward saves for the backward, on this rank, through
bigtrain's Trainer (so under sequence parallelism: this rank's slice of the sequence and
DeepSpeed's Ulysses attention).

usage (one process per rank): saved_activations.py OUT.json key=value ...
Counts every tensor autograd saves (`torch.autograd.graph.saved_tensors_hooks`), each storage
once, parameters excluded: exact and independent of the allocator. Rank 0 writes
{"saved_bytes": N, "tokens_per_rank": T}.
"""

import json
import sys

import numpy as np
import torch

from bigtrain.config import load_config
from bigtrain.process import leave
from bigtrain.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config(None, overrides))
params = {p.untyped_storage().data_ptr() for p in trainer.engine.module.parameters()}
seen: dict[int, int] = {}


def pack(t):
    storage = t.untyped_storage()
    if storage.data_ptr() not in params:
        seen[storage.data_ptr()] = storage.nbytes()
    return t


micro = trainer.cfg.train.micro_batch_size
batch = {k: v.to(trainer.device) for k, v in trainer.task.batch(np.arange(micro), 0).items()}
trainer.engine.train()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = trainer.forward(batch).loss
trainer.engine.backward(loss)  # the saved tensors were really used
if trainer.env.rank == 0:
    tokens = batch["input_ids"].numel() // trainer.layout.sp
    with open(out, "w") as f:
        json.dump({"saved_bytes": sum(seen.values()), "tokens_per_rank": tokens}, f)
trainer.close()
leave(0)
