"""Count the device reads of each training step, by who made them (bigtrain, DeepSpeed, ...).

usage (one process per rank): count_device_reads.py OUT.json key=value ...
A device read is a call that makes the host wait for a tensor's value: `.item()`, `.tolist()`,
`.cpu()`, `.numpy()`, `bool(t)`, `float(t)`, `int(t)`. Each call on the training thread is
charged to the step in progress and to the package of the first caller outside torch. On CPU
every tensor is a host tensor, so this counts calls that *would* wait on a GPU.
"""

import json
import sys
import threading
import traceback
from collections import Counter, defaultdict

import torch

from bigtrain.config import load_config
from bigtrain.process import leave
from bigtrain.api import Callback
from bigtrain.trainer import Trainer

out_path, overrides = sys.argv[1], sys.argv[2:]
MAIN = threading.main_thread()
counts: dict = defaultdict(Counter)  # step -> Counter(owner)
where: dict = defaultdict(Counter)  # step -> Counter("owner file:line")
current = {"step": 0}


def owner_of() -> tuple[str, str]:
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" in f or f.endswith("count_device_reads.py"):
            continue
        for name in ("bigtrain", "deepspeed", "transformers"):
            if f"/{name}/" in f:
                return name, f"{name}/{f.rsplit(f'/{name}/', 1)[1]}:{frame.lineno}"
        return "other", f"{f}:{frame.lineno}"
    return "other", "?"


def wrap(name: str) -> None:
    original = getattr(torch.Tensor, name)

    def counted(self, *args, **kwargs):
        if threading.current_thread() is MAIN and current["step"] > 0:
            who, line = owner_of()
            counts[current["step"]][who] += 1
            where[current["step"]][line] += 1
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, counted)


class StepMarks(Callback):
    def __init__(self, trainer_box: dict) -> None:
        self.box = trainer_box

    def on_phase(self, name: str) -> None:
        if name == "data":  # a new step starts: what follows is charged to it
            current["step"] = self.box["trainer"].step + 1


box: dict = {}
trainer = Trainer(load_config(None, overrides), overwrite=True, callbacks=[StepMarks(box)])
box["trainer"] = trainer
for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
    wrap(method)
outcome = trainer.train()
current["step"] = 0
if trainer.env.rank == 0:
    result = {"status": outcome.status, "steps": {s: dict(c) for s, c in counts.items()},
              "where": {s: dict(c) for s, c in where.items()}, "max_steps": trainer.cfg.train.max_steps}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
trainer.finish(sample=False)
trainer.close()  # tear the process group down before exit (gloo can abort at interpreter exit otherwise)
leave(0)
