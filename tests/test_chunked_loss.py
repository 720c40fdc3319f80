"""train.chunked_loss (bigtrain/loss.py): the causal-LM loss computed in chunks of tokens equals
transformers' own loss and gradients, holds far less memory, and is what a training run uses."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bigtrain.loss import AUTO_ELEMENTS, ChunkedLMLoss, chunked_causal_lm_loss, wanted
from common import STDLIB, run_cli

VOCAB = 300


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                      vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 37), generator=g)
    labels = ids.clone()
    labels[0, 5:9] = -100  # a hole inside a row
    labels[1, -3:] = -100  # padding at the end
    labels[2, :20] = -100  # a prompt that is not learned
    return {"input_ids": ids, "labels": labels}


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2_tied", "llama"])
def test_chunked_loss_equals_transformers_loss_and_gradients(build):
    torch.manual_seed(0)
    model = build()
    if build is tiny_gpt2:
        assert model.lm_head.weight is model.transformer.wte.weight  # the tied case
    b = batch()
    full = model(**b).loss  # transformers' ForCausalLMLoss over full logits
    full.backward()
    want = grads(model)
    assert len(want) == len(list(model.parameters()))
    model.zero_grad()
    # 111 tokens in chunks of 10: 12 chunks, the last one short.
    loss_fn = ChunkedLMLoss.for_model(model, VOCAB, chunk_tokens=10)
    out = loss_fn(model, b)
    assert out.logits is None
    torch.testing.assert_close(out.loss, full, rtol=1e-6, atol=0)
    out.loss.backward()
    got = grads(model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation: no checkpointing, the same value
        torch.testing.assert_close(loss_fn(model, b).loss, full.detach(), rtol=1e-6, atol=0)


def test_gradients_follow_the_incoming_gradient_and_num_items_in_batch():
    """DeepSpeed scales the loss (1/grad_accum, the fp16 loss scale) before its backward: every
    gradient, the head's included, must scale with it. And num_items_in_batch divides the sum as
    in transformers."""
    torch.manual_seed(0)
    model = tiny_llama()
    b = batch(1)
    loss_fn = ChunkedLMLoss.for_model(model, VOCAB, chunk_tokens=16)
    loss_fn(model, b).loss.backward()
    once = grads(model)
    model.zero_grad()
    (loss_fn(model, b).loss * 0.25).backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, 0.25 * once[name], rtol=1e-6, atol=1e-8, msg=name)
    with torch.no_grad():
        theirs = model(**b, num_items_in_batch=torch.tensor(50)).loss
        hidden = model.model(input_ids=b["input_ids"]).last_hidden_state
        mine = chunked_causal_lm_loss(model.lm_head, hidden, b["labels"], 7, num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)


def test_check_accepts_plain_heads_and_refuses_soft_capped_logits():
    """The startup check: GPT-2 and Llama pass; Gemma 2 soft-caps its logits after lm_head (the
    chunked loss would train another model) and is refused. The check leaves the random state
    and the training mode as they were (a run's dropout draws do not move)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gpt2 = tiny_gpt2()
    gpt2.config.resid_pdrop = 0.1
    gpt2.train()
    state = torch.get_rng_state()
    assert ChunkedLMLoss.for_model(gpt2, VOCAB).check(gpt2, "cpu") is None
    assert torch.equal(state, torch.get_rng_state()) and gpt2.training
    llama = tiny_llama()
    assert ChunkedLMLoss.for_model(llama, VOCAB).check(llama, "cpu") is None
    cfg = Gemma2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       vocab_size=VOCAB, final_logit_softcapping=30.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    gemma = Gemma2ForCausalLM(cfg)
    why = ChunkedLMLoss.for_model(gemma, VOCAB).check(gemma, "cpu")
    assert why is not None and "soft-capped" in why


def test_auto_turns_on_from_256_mib_of_logits_for_causal_lm_tasks_only():
    assert AUTO_ELEMENTS * 4 == 256 * 2**20
    assert wanted("auto", "clm", 1, 2048, 32768)  # exactly 2**26 logits
    assert not wanted("auto", "clm", 1, 2047, 32768)
    assert wanted("auto", "sft", 4, 4096, 128256)
    assert wanted(True, "clm", 1, 8, 100) and not wanted(False, "clm", 64, 8192, 128256)
    assert not wanted("auto", "mlm", 64, 8192, 128256) and not wanted(True, "classify", 1, 8, 100)
    assert not wanted("auto", "clm", 64, 8192, 128256, sequence_parallel=2)


# --------------------------------------------------------------------------- memory

MEASURE = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from bigtrain.loss import ChunkedLMLoss
torch.set_num_threads(1)
torch.manual_seed(0)
V, S = 50_000, 2048
model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=0))
chunked = ChunkedLMLoss.for_model(model, V) if sys.argv[1] == "chunked" else None

def step(seq):
    ids = torch.randint(0, V, (1, seq))
    b = {"input_ids": ids, "labels": ids}
    loss = chunked(model, b).loss if chunked else model(**b).loss
    loss.backward()
    return loss.item()

step(16)  # warm-up: the gradients and every lazily built thing exist
def status(key):  # bytes, from /proc/self/status
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024

# Reset the peak-RSS mark to the current RSS (Linux: clear_refs 5), so the step's own peak is
# measured even when importing and building the model peaked higher (ru_maxrss cannot forget it).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
loss = step(S)
print(json.dumps({"growth": status("VmHWM") - before, "loss": loss, "chunk_tokens": chunked.chunk_tokens if chunked else None}))
"""


def test_chunking_cuts_the_peak_memory_of_forward_and_backward():
    """Vocabulary 50k, 2048 tokens, hidden size 64: full fp32 logits are 410 MB, and the
    backward holds several such tensors. Each variant runs in a fresh process (both at once); the
    peak resident set's growth over forward, loss and backward (after a short warm-up step) is
    compared."""

    def measure(kind: str) -> dict:
        r = subprocess.run([sys.executable, "-c", MEASURE, kind], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(2) as pool:
        full, chunked = pool.map(measure, ["full", "chunked"])
    ratio = full["growth"] / chunked["growth"]
    print(f"\npeak RSS growth: full logits {full['growth'] / 2**20:.0f} MiB, chunked ({chunked['chunk_tokens']} tokens) "
          f"{chunked['growth'] / 2**20:.0f} MiB: {ratio:.1f}x")
    assert chunked["chunk_tokens"] < 2048  # more than one chunk
    assert abs(full["loss"] - chunked["loss"]) <= 1e-5 * abs(full["loss"])
    assert full["growth"] >= 2048 * 50_000 * 4  # the full path really held its logits
    assert ratio >= 3, (full, chunked)


# --------------------------------------------------------------------------- through the trainer

TINY = [f"data.train_files={STDLIB / 'json'}", "data.vocab_size=512", "data.seq_len=256", "model.config.n_layer=2", "model.config.n_embd=64",
        "model.config.n_head=2", "model.config.vocab_size=50048", "train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=3",
        "train.log_every=1", "train.eval_every=3", "train.eval_batches=2", "train.warmup_steps=2", "train.lr=1e-2", "train.progress=false",
        "train.sample_tokens=0", "deepspeed.zero_stage=3"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_training_run_uses_the_chunked_loss_with_zero3_and_grad_accum(tmp_path):
    """Tied GPT-2 at ZeRO-3 (the head's weight partitioned, gathered by DeepSpeed's module hooks),
    grad_accum 2 (DeepSpeed scales the loss), 512 tokens a micro-batch in chunks of 335 and 177:
    the losses, gradient norms and validation loss are the unchunked run's. Both runs at once,
    each with its own cache (the same tokenizer and blocks: both are seeded)."""

    def train(setting: str):
        out = tmp_path / setting
        r = run_cli(["train", *TINY, f"train.chunked_loss={setting}", f"output_dir={out / 'run'}"], out / "cache", timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r, records(out / "run")

    with ThreadPoolExecutor(2) as pool:
        (r_on, on), (r_off, off) = pool.map(train, ["true", "false"])
    assert "causal-LM loss: chunked (train.chunked_loss=true), 335 tokens per chunk" in r_on.stderr
    assert "causal-LM loss: chunked" not in r_off.stderr
    steps_on = [x for x in on if "loss" in x]
    steps_off = [x for x in off if "loss" in x]
    assert [x["step"] for x in steps_on] == [x["step"] for x in steps_off] == [1, 2, 3]
    for a, b in zip(steps_on, steps_off):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6, abs=0), (a, b)
    eval_on = [x["eval_loss"] for x in on if "eval_loss" in x]
    eval_off = [x["eval_loss"] for x in off if "eval_loss" in x]
    assert len(eval_on) == 1 and eval_on == pytest.approx(eval_off, rel=1e-6, abs=0)


@pytest.mark.parametrize("value, message", [
    ("maybe", "'train.chunked_loss' must be one of auto, True, False; got 'maybe'"),
    ("true task=mlm", "train.chunked_loss=true is for the causal-LM loss of task=clm or sft, not task=mlm"),
], ids=["not_a_choice", "mlm"])
def test_bad_chunked_loss_value_is_a_one_line_error(value, message, tmp_path):
    first, *rest = value.split()
    r = run_cli(["train", f"train.chunked_loss={first}", *rest, f"output_dir={tmp_path / 'run'}"], tmp_path / "cache", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and message in lines[-1] and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
