"""`bigtrain export` of a ZeRO-3 checkpoint works shard by shard with bounded memory."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest
import torch

from common import REPO, run_cli

pytestmark = pytest.mark.slow

# ~29.5M parameters (118 MB in fp32): large enough that holding the model twice would show.
BIG = ["data.vocab_size=512", "data.seq_len=64", "model.config.n_layer=4", "model.config.n_embd=768", "model.config.n_head=4",
       "train.micro_batch_size=1", "train.progress=false", "train.sample_tokens=0", "train.max_steps=1", "train.save_every=1",
       "train.eval_every=1000", "deepspeed.zero_stage=3"]
SHARD = 8_000_000


@pytest.fixture(scope="module")
def zero3_run(corpus, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    r = run_cli(["train", f"data.train_files={corpus}", *BIG, f"output_dir={out}", "--nproc", "2"], cache_dir, env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_zero3_export_is_sharded_bounded_and_exact(zero3_run, tmp_path):
    out = tmp_path / "model"
    r = subprocess.run([sys.executable, str(REPO / "tests/helpers/export_peak_rss.py"), str(zero3_run), str(out), str(SHARD)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rss = json.loads(r.stdout.strip().splitlines()[-1])

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    reference = get_fp32_state_dict_from_zero_checkpoint(str(zero3_run / "checkpoints"))  # DeepSpeed's in-memory gather
    model_bytes = sum(t.numel() * 4 for k, t in reference.items() if k != "lm_head.weight")
    files = sorted(glob.glob(str(out / "model-*.safetensors")))
    assert len(files) >= model_bytes // SHARD, files  # really written shard by shard
    index = json.loads((out / "model.safetensors.index.json").read_text())
    exported = {}
    for f in files:
        part = load_file(f)
        assert all(index["weight_map"][k] == f.rsplit("/", 1)[1] for k in part)
        assert sum(t.numel() * 4 for t in part.values()) <= max(SHARD, max(t.numel() * 4 for t in part.values()))
        exported.update(part)
    assert set(exported) == set(reference) - {"lm_head.weight"}  # the tied copy is dropped, as save_pretrained does
    for k, v in exported.items():
        assert torch.equal(v, reference[k]), k

    # Peak memory beyond the imports: the memory-mapped fp32 partitions (once) plus one shard,
    # never the model twice (a full state dict plus a model built from it).
    grown = rss["after"] - rss["before"]
    assert grown < 1.5 * model_bytes, (grown / model_bytes, rss, model_bytes)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.transformer.h[3].mlp.c_fc.weight, reference["transformer.h.3.mlp.c_fc.weight"])
