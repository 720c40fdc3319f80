"""Kernel tests run on CPU under the Triton interpreter when there is no GPU.

TRITON_INTERPRET must be in the environment before the attention kernels are *defined*:
Triton reads it when a @triton.jit decorator runs, which for bigtrain happens lazily on the first
flash_attn call (bigtrain.kernels itself does not import triton). transformers imports triton
early, which is harmless because only the decoration time matters. Setting it here, at conftest
import, therefore works even when the whole suite runs in one pytest process; the other test
packages do not launch Triton kernels, so they are unaffected. With a GPU it is left unset so the
same tests (and the `gpu` ones) run compiled on CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Every test case is a different kernel variant; autotuning each would compile every
    # candidate tile and take minutes. The default tile is enough to check correctness.
    os.environ.setdefault("BIGTRAIN_ATTN_AUTOTUNE", "0")
