"""CLI verbs, launchers and the pieces of the engine set-up, on real processes."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

from common import SMALL


@pytest.mark.parametrize("verb", [[], ["train"], ["export"], ["generate"], ["data"], ["data", "prepare"], ["tokenizer"], ["tokenizer", "train"], ["bench"]])
def test_help_on_every_verb(cli, verb):
    r = cli([*verb, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: bigtrain")
    if verb == ["train"]:
        assert "train.micro_batch_size" in r.stdout and "deepspeed.zero_stage" in r.stdout


def test_tokenizer_train_then_train_with_it(cli, corpus, tmp_path):
    out = tmp_path / "tok"
    r = cli(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 400
    text = "def main():\n    return json.dumps({'a': 1})\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    r = cli(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(out)])
    assert r.returncode == 2 and r.stderr.startswith("error:") and "not empty" in r.stderr


def test_data_prepare_prints_cache_and_is_reused(cli, corpus):
    args = ["data", "prepare", f"data.train_files={corpus}", "data.vocab_size=512", "data.seq_len=64"]
    r1 = cli(args)
    assert r1.returncode == 0, r1.stderr
    manifest = json.loads((Path(r1.stdout.strip()) / "manifest.json").read_text())
    assert manifest["sources"]["train"]["tokens"] > 0 and manifest["dtype"] == "uint16"
    r2 = cli(args)
    assert r2.returncode == 0 and r2.stdout == r1.stdout
    assert "tokenizing" not in r2.stderr and "already prepared" in r2.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_and_pretrained_start(cli, corpus, tmp_path, cache_dir):
    """torchrun sets RANK/WORLD_SIZE; bigtrain picks them up. Then fine-tune from the export."""
    from bigtrain.process import free_port

    out = tmp_path / "tr"
    args = [f"data.train_files={corpus}", *SMALL, "deepspeed.zero_stage=1", "train.max_steps=6", "train.log_every=1", f"output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(BIGTRAIN_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "bigtrain", "train", *args],
                       capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    first_run = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r_["loss"] for r_ in first_run if "loss" in r_][-1]
    # Start a new run from the exported model: its first loss continues from where the first ended,
    # far below a fresh model's ln(vocab).
    model_dir = out / "model"
    out2 = tmp_path / "ft"
    r = cli(["train", f"data.train_files={corpus}", f"model.from_pretrained={model_dir}", f"data.tokenizer={model_dir}",
             "data.seq_len=64", "train.micro_batch_size=4", "train.max_steps=2", "train.log_every=1", "train.progress=false",
             "train.sample_tokens=0", "train.lr=1e-5", "train.warmup_steps=0", f"output_dir={out2}"])
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out2 / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    import math

    assert losses[0] < math.log(512) - 0.3 and abs(losses[0] - last_loss) < 0.5, (losses, last_loss)


def test_ds_config_template_keys_and_user_merge(tmp_path):
    from bigtrain.config import load_config
    from bigtrain.engine import build_ds_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 0.25, "zero_optimization": {"reduce_bucket_size": 1234}}))
    args = ["deepspeed.zero_stage=2", "train.micro_batch_size=3", "train.grad_accum=2", f"deepspeed.config={user}",
            "deepspeed.offload_optimizer=cpu", "deepspeed.precision=bf16"]
    cfg = load_config(None, args)
    ds = build_ds_config(cfg, world_size=4, on_cpu=True)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.25  # the user's value wins
    zo = ds["zero_optimization"]
    assert zo["stage"] == 2 and zo["reduce_bucket_size"] == 1234 and zo["overlap_comm"] is True  # merged, not replaced
    assert zo["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)
    # The file is parsed once, when the config is loaded: a later edit does not reach this run.
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    assert build_ds_config(cfg, world_size=4, on_cpu=True)["gradient_clipping"] == 0.25
    # A user ds_config whose batch contradicts the train.* keys is refused.
    from bigtrain.errors import UserError

    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=8"):
        build_ds_config(load_config(None, args), world_size=4, on_cpu=True)


def test_no_weight_decay_on_biases_and_norms():
    from transformers import GPT2Config, GPT2LMHeadModel

    from bigtrain.engine import param_groups

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(".bias") or "ln_" in names[id(p)] for p in no_decay["params"])
    assert any(names[id(p)].endswith("ln_f.weight") for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
