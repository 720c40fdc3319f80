"""`bigtrain bench attention --static`: the kernels compile for Hopper without a GPU, and fit.

The interpreter executes the kernels as Python and cannot catch compile-time errors or resource
limits; Triton compiles for an explicit GPUTarget on a machine without a GPU, and ptxas reports
registers and spills. Run in a fresh interpreter: TRITON_INTERPRET must be unset before Triton
and the kernels are defined (this suite's processes define them in interpreter mode).
"""

import json
import os
import re
import subprocess
import sys

import pytest

try:
    import triton.backends.nvidia  # noqa: F401
    HAVE_NVIDIA_BACKEND = True
except ImportError:
    HAVE_NVIDIA_BACKEND = False

SM90_SHARED_PER_BLOCK = 227 * 1024  # H100/H200 (CUDA C Programming Guide, compute capability 9.0)
REGISTERS_PER_SM = 65536


@pytest.mark.skipif(not HAVE_NVIDIA_BACKEND, reason="Triton without its NVIDIA backend")
def test_every_default_config_fits_hopper_without_spills(tmp_path):
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # bf16 (the training dtype on Hopper) at head_dim 128 and 256 (the largest tiles and the pruned list).
    res = subprocess.run([sys.executable, "-m", "bigtrain", "bench", "attention", "--static", "--arch", "90", "--dtypes", "bf16",
                          "--head-dims", "128", "256", "--defaults", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["static"]
    kernels = {"fwd", "dkdv+atomic dq", "dkdv", "dq"}
    assert {(r["kernel"], r["head_dim"]) for r in rows} == {(k, d) for k in kernels for d in (128, 256)}
    for r in rows:
        warps = int(re.search(r"w(\d+)", r["config"]).group(1))
        assert r["default"] and "error" not in r, r
        assert 0 < r["registers"] <= 255 and r["registers"] * 32 * warps <= REGISTERS_PER_SM, r
        assert 0 < r["shared_bytes"] <= SM90_SHARED_PER_BLOCK, r
        # The forward spills nothing at any head_dim, dQ nothing at 128 (the dK/dV kernel spills in
        # every candidate at d128: docs/kernels.md, "What the compiler says").
        if r["kernel"] == "fwd" or (r["kernel"] == "dq" and r["head_dim"] == 128):
            assert r["spill_bytes"] == 0, r
    # The summary names every default that spills, as the rows say.
    assert "every one fits" in res.stdout
    for r in rows:
        assert (f"{r['kernel']} d{r['head_dim']} ({r['spill_bytes']} B)" in res.stdout) == (r["spill_bytes"] > 0), r
