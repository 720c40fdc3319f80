"""`bigtrain ARGS` with `model.attn_implementation: auto` resolved as on a GPU machine.

The only thing faked is the machine type: auto picks bigtrain_triton (which this CPU machine would
only run under TRITON_INTERPRET=1), so the self-check and what the trainer does with its verdict run
for real. At exit the number of forward-kernel launches of this process is written to
$BIGTRAIN_LAUNCHES (the check's own, plus training's if it used the kernel).

usage: auto_as_on_a_gpu.py train key=value ...  (the arguments of `bigtrain`)
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import bigtrain.models
from bigtrain.cli import main

_choice = bigtrain.models.attn_implementation
bigtrain.models.attn_implementation = lambda choice, on_cpu, *rest: _choice(choice, False, *rest)


def _write_launches() -> None:
    from bigtrain.kernels import _triton_attention as ta

    with open(os.environ["BIGTRAIN_LAUNCHES"], "w") as f:
        json.dump(dict(ta.launches), f)


atexit.register(_write_launches)
sys.exit(main(sys.argv[1:]))
