"""The kernel's self-check (bigtrain/kernels/selfcheck.py) and what a run does with its verdict.

On CPU the check runs the kernels in the Triton interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET=1). Both outcomes are real: a passing kernel passes; a kernel made wrong (its
output or only its gradient) or one that cannot launch fails, naming the case and the tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import bigtrain
from bigtrain.kernels import selfcheck
from bigtrain.kernels.attention import flash_attn
from common import SMALL

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
SHAPE = dict(head_dim=16, heads_q=4, heads_kv=2)  # GQA 2


def _verify(cache=None, **kw):
    return selfcheck.verify(torch.float32, SHAPE["head_dim"], SHAPE["heads_q"], SHAPE["heads_kv"], CPU, cache, seq=80, **kw)


def test_a_correct_kernel_passes_and_its_verdict_is_cached_per_version(tmp_path, monkeypatch):
    v = _verify(tmp_path)
    assert v.ok and not v.cached, v.results
    assert [r["case"] for r in v.results] == ["causal", "packed", "bidirectional"]
    saved = json.loads(selfcheck.cache_path(tmp_path, v.key).read_text())
    assert saved["ok"] and saved["key"]["gqa"] == 2 and saved["key"]["dtype"] == "fp32"

    def no_second_check(*a, **k):
        raise AssertionError("checked again although the verdict is cached")

    monkeypatch.setattr(selfcheck, "run_case", no_second_check)
    again = _verify(tmp_path)
    assert again.ok and again.cached
    monkeypatch.setattr(bigtrain, "__version__", bigtrain.__version__ + ".dev1")  # another bigtrain: check again
    with pytest.raises(AssertionError, match="checked again"):
        _verify(tmp_path)


@pytest.mark.parametrize("wrong, case, expect", [
    # 2% too large everywhere: the output is off (and so is every gradient).
    (lambda q, k, v, **kw: flash_attn(q, k, v, **kw) * 1.02, "causal", "output differs"),
    # The output exact, only dQ wrong: a backward bug the forward cannot show.
    (lambda q, k, v, **kw: flash_attn(q, k, v, **kw) + 0.01 * (q - q.detach()), "causal", "dQ differs"),
    # Wrong only with packed documents: the document mask ignored.
    (lambda q, k, v, segment_ids=None, **kw: flash_attn(q, k, v, **kw), "packed", "output differs"),
    (lambda q, k, v, **kw: (_ for _ in ()).throw(RuntimeError("out of resources: shared memory")), "causal",
     "RuntimeError: out of resources: shared memory"),
])
def test_a_wrong_kernel_fails_naming_the_case_and_the_tensor(monkeypatch, wrong, case, expect):
    monkeypatch.setattr(selfcheck, "flash_attn", wrong)
    v = _verify()
    assert not v.ok and v.failed["case"] == case, v.results
    assert expect in v.failed["error"], v.failed
    assert f"case '{case}'" in v.why() and "GQA 2" in v.why()


def test_the_fault_fails_the_check_and_is_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRAIN_FAULT", "attn_check_fail")
    v = _verify(tmp_path)
    assert not v.ok and v.failed["case"] == "causal" and "BIGTRAIN_FAULT" in v.failed["error"]
    assert not (tmp_path / "attn-check").exists()


def test_auto_on_a_gpu_whose_kernel_cannot_run_falls_back_to_sdpa(tmp_path, monkeypatch):
    """The trainer's decision for a GPU rank (on_cpu=False): here there is no CUDA, so every case
    fails to launch, as on a GPU the kernel does not support; auto warns once and uses SDPA."""
    from bigtrain.config import load_config
    from bigtrain.models import choose_attention

    monkeypatch.setenv("BIGTRAIN_CACHE", str(tmp_path))
    warnings = []
    attn, why = choose_attention(load_config(None, ["model.preset=llama-tiny"]), False, "bf16", 0, warnings.append)
    assert attn == "sdpa" and len(warnings) == 1 and why in warnings[0]
    assert "case 'causal'" in why and "bf16" in why and warnings[0].startswith("warning: ")


def test_explicit_kernel_that_fails_its_check_stops_before_anything_is_written(cli, tmp_path):
    out = tmp_path / "run"
    r = cli(["train", *SMALL, "model.attn_implementation=bigtrain_triton", f"output_dir={out}"],
            env_extra={"TRITON_INTERPRET": "1", "BIGTRAIN_FAULT": "attn_check_fail"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: override model.attn_implementation=bigtrain_triton: "), r.stderr[-3000:]
    assert "case 'causal'" in lines[0] and "attn_implementation=sdpa" in lines[0]
    assert not out.exists()
    # No GPU and no interpreter: the error says what to set instead.
    r = cli(["train", *SMALL, "model.attn_implementation=bigtrain_triton", f"output_dir={out}"], env_extra={"TRITON_INTERPRET": "0"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "TRITON_INTERPRET=1" in lines[0], r.stderr[-3000:]
    assert not out.exists()


def test_auto_with_a_failing_check_trains_on_sdpa_and_records_why(cache_dir, tmp_path, corpus):
    """A whole run with auto resolved as on a GPU machine (auto_as_on_a_gpu.py: the only fake is
    the machine type); the check runs the kernel in the interpreter and fails by the fault."""
    from bigtrain.report import load_run, summary

    out, launches = tmp_path / "run", tmp_path / "launches.json"
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache_dir), TRITON_INTERPRET="1", BIGTRAIN_FAULT="attn_check_fail",
               BIGTRAIN_LAUNCHES=str(launches), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(HERE / "auto_as_on_a_gpu.py"), "train", f"data.train_files={corpus}", *SMALL,
                        "train.max_steps=2", "train.log_every=1", "train.eval_batches=1", f"output_dir={out}"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr[-3000:]
    warned = [line for line in r.stderr.splitlines() if "self-check failed" in line]
    assert len(warned) == 1 and "training with attn_implementation=sdpa" in warned[0], r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fallback = [rec for rec in records if "attn_fallback" in rec]
    assert len(fallback) == 1 and fallback[0]["attn_implementation"] == "sdpa" and "case 'causal'" in fallback[0]["attn_fallback"]
    assert sum(1 for rec in records if "loss" in rec) >= 2
    # The kernel ran for the check's two other cases (one forward each), never for training.
    assert json.loads(launches.read_text()).get("fwd", 0) == len(selfcheck.CASES) - 1
    assert any(label == "attention" and "fallback" in value for label, value in summary(load_run(out)))
