"""The kernels compile for real NVIDIA targets (PTX + ptxas), checked without a GPU.

The interpreter executes the kernels as Python and cannot catch compile-time errors; Triton can
compile for an explicit GPUTarget on a machine without a GPU, so we do that in a subprocess
(TRITON_INTERPRET must be unset there before the kernels are defined).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import triton.backends.nvidia  # noqa: F401
    HAVE_NVIDIA_BACKEND = True
except ImportError:
    HAVE_NVIDIA_BACKEND = False


@pytest.mark.skipif(not HAVE_NVIDIA_BACKEND, reason="Triton without its NVIDIA backend")
def test_kernels_compile_for_hopper():
    script = Path(__file__).with_name("compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, str(script), "--arch", "90", "--dtype", "fp16", "--head-dim", "64"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.count(": ok") == 5, res.stdout
