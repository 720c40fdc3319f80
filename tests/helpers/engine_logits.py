"""Load a checkpoint into a real DeepSpeed engine and save its logits on a few training blocks.

usage: python engine_logits.py CHECKPOINT OUT.pt key=value ...
"""

import sys

import numpy as np
import torch

from bigtrain.config import load_config
from bigtrain.process import leave
from bigtrain.trainer import Trainer

ckpt, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
trainer = Trainer(load_config(None, overrides), resume=ckpt)
ids = torch.from_numpy(trainer.task.train_blocks.take(np.arange(4))["input_ids"])
trainer.engine.eval()
with torch.no_grad():
    logits = trainer.engine(input_ids=ids).logits
torch.save({"input_ids": ids, "logits": logits.float()}, out)
trainer.close()
leave(0)
