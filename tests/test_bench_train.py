"""`bigtrain bench train` runs both sides and reports what it promises (no speed assertions here:
this machine is noisy; the ratios are for the benchmark's own printout and BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest

from common import SMALL

pytestmark = pytest.mark.slow


def test_bench_train_compare_hf_json(cli, corpus, tmp_path):
    out = tmp_path / "bench.json"
    r = cli(["bench", "train", f"data.train_files={corpus}", *SMALL, "--steps", "3", "--warmup", "1", "--rounds", "1", "--compare", "hf",
             "--json", str(out)], env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    for key in ("tokens_per_s", "mfu", "peak_memory_bytes", "hf_tokens_per_s", "step_time_ratio"):
        assert got[key] > 0, key
    assert got["step_time_ratio"] == pytest.approx(got["median_step_s"] / got["hf_median_step_s"])
    # The step split covers the whole step, and the FLOP count follows the stated formula.
    assert sum(got["split"].values()) == pytest.approx(1.0)
    assert set(got["split"]) >= {"data", "forward", "backward", "step"}
    layers, hidden, seq = 2, 64, 64  # SMALL
    assert got["flops_per_token"] == pytest.approx(6 * got["params"] + 12 * layers * hidden * seq)
    assert "6 x params" in r.stdout and "step time ratio bigtrain/HF" in r.stdout and "MFU" in r.stdout


def test_bench_train_bad_arguments(cli):
    r = cli(["bench", "train", "--steps", "0"])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --steps")
