"""The one-process part of the model-family matrix (tests/test_models.py), for every family in
one process: `python family_checks.py ZOO OUT.json`, with TRITON_INTERPRET=1 on a CPU machine.

Per family, each result is {"status": "ok", "diff": measured} or {"status": "refused", "why": ...}:
- attention: bigtrain_triton against the family's exact attention (SDPA, or eager where
  transformers has no SDPA path), fp32, forward logits and every parameter's gradient. Causal
  LMs: one row of three packed documents with segment ids (as the trainer passes them) against
  each document run alone at the same positions; a sliding window shorter than the first
  document masks inside it. Encoders: two rows, one padded. diff: the largest difference
  relative to the reference's largest value (logits, then gradients).
- chunked_loss (causal LMs): bigtrain's startup check, then its loss and gradients against the
  model's own loss (several chunks per row).
- lora (causal LMs): peft's default target modules for the family through bigtrain's wrap: the
  adapted model starts equal to the base model, and only adapters get gradients.
- compile: torch.compile's capture of the training forward and backward (aot_eager) against eager.
- chat_template (causal LMs): task=sft's labels under the family's chat format.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import families  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def weighted_backward(model, logits: torch.Tensor, weights: torch.Tensor) -> dict:
    model.zero_grad()
    (logits * weights).sum().backward()
    return grads(model)


def worst(got: dict, want: dict) -> float:
    """The largest gradient difference, per parameter relative to that parameter's largest
    gradient, or to a thousandth of the largest of all where a gradient is zero in exact math
    (a key bias: softmax ignores a score added to a whole row) and both sides hold rounding."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    floor = 1e-3 * max(float(w.abs().max()) for w in want.values())
    return max(float((got[k] - want[k]).abs().max()) / max(float(want[k].abs().max()), floor) for k in want)


def load(path: Path, cls, attn: str):
    torch.manual_seed(0)
    return cls.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32).eval()


def attention(name: str, path: Path) -> dict:
    from transformers import AutoConfig

    import bigtrain.kernels  # noqa: F401 - registers bigtrain_triton
    from bigtrain.kernels.attention import document_bounds
    from bigtrain.models import exact_attention, fused_attention_refusal, model_class

    task = "clm" if name in families.CAUSAL else "mlm"
    hf = AutoConfig.from_pretrained(str(path))
    cls = model_class(task, hf)
    refusal = fused_attention_refusal(hf, cls)
    if refusal is not None:
        return {"status": "refused", "why": refusal}
    fused, exact = load(path, cls, "bigtrain_triton"), load(path, cls, exact_attention(cls))
    g = torch.Generator().manual_seed(1)
    if task == "clm":
        lengths = (20, 12, 16)
        ids = torch.randint(3, hf.vocab_size, (1, sum(lengths)), generator=g)
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        got = fused(input_ids=ids, attention_mask=torch.ones_like(ids), segment_ids=seg, padding_free=True,
                    segment_bounds=document_bounds(seg)).logits
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        want = torch.cat([exact(input_ids=ids[:, a:b], position_ids=torch.arange(a, b)[None]).logits
                          for a, b in zip(starts, starts[1:])], dim=1)
        keep = torch.ones(ids.shape, dtype=torch.bool)
    else:
        ids = torch.randint(5, hf.vocab_size, (2, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 15:] = 0
        got, want = fused(input_ids=ids, attention_mask=mask).logits, exact(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
    w = torch.randn(want.shape, generator=g) * keep[..., None]
    diff = max(rel(got[keep], want[keep]), worst(weighted_backward(fused, got, w), weighted_backward(exact, want, w)))
    return {"status": "ok", "diff": diff}


def chunked_loss(name: str, path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from bigtrain.loss import ChunkedLMLoss

    from bigtrain.moe import configure

    model = load(path, AutoModelForCausalLM, "eager")
    configure(model.config)  # as the trainer: an MoE model's loss includes the router's load-balancing term
    lm = ChunkedLMLoss.for_model(model, model.config.vocab_size, chunk_tokens=7)
    why = lm.check(model, "cpu")
    if why is not None:
        lm.close()
        return {"status": "refused", "why": f"the chunked loss cannot stand in for {model.config.model_type}'s: {why}"}
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, 20:] = -100
    model.zero_grad()
    want = model(input_ids=ids, labels=labels).loss
    want.backward()
    want_g = grads(model)
    model.zero_grad()
    got = lm(model, {"input_ids": ids, "labels": labels}).loss
    got.backward()
    lm.close()
    return {"status": "ok", "diff": max(rel(got.detach(), want.detach()), worst(grads(model), want_g))}


def lora(name: str, path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from bigtrain.errors import UserError
    from bigtrain.lora import wrap

    base = load(path, AutoModelForCausalLM, "eager")
    ids = torch.randint(3, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    try:
        model = wrap(base, {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None})
    except UserError as e:
        return {"status": "refused", "why": str(e).split(": ", 1)[-1]}
    got = model(input_ids=ids).logits
    got.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    targets = sorted(model.peft_config["default"].target_modules)
    assert trained and all("lora_" in n for n in trained), trained
    assert any("lora_B" in n for n in trained), trained
    return {"status": "ok", "diff": rel(got.detach(), want), "targets": targets}


CONVERSATION = [{"role": "user", "content": "increment x"}, {"role": "assistant", "content": "x += 1"},
                {"role": "user", "content": "and decrement it"}, {"role": "assistant", "content": "x -= 1"}]


def chat_template(name: str, path: Path) -> dict:
    """task=sft's labels under the family's chat format (families.CHAT_STYLES): exactly the two
    replies and what closes each turn are learned (Phi-3's closing EOS only after the last)."""
    from transformers import AutoTokenizer

    from bigtrain.chat import IGNORE, encode, ensure_template, parse_record

    tok = AutoTokenizer.from_pretrained(str(path))
    style = families.CHAT_STYLES[name]
    if style is None:
        ensure_template(tok)
        style = (None, None, "<|im_end|>\n")
    else:
        tok.chat_template = style[0]
        tok.add_special_tokens({"additional_special_tokens": style[1]})
    close = style[2].replace("{eos}", tok.eos_token or "")
    expected = ["x += 1" + close, "x -= 1" + close + (tok.eos_token if name == "phi3" else "")]
    enc = encode(tok, parse_record({"messages": CONVERSATION}, f"{name}:1"))
    runs, current = [], []
    for i, label in zip(enc.ids + [None], enc.labels + [IGNORE]):
        if label != IGNORE:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return {"status": "ok", "diff": 0.0 if runs == expected else 1.0, "runs": runs, "expected": expected}


def compile_check(name: str, path: Path) -> dict:
    """train.compile's graph capture: torch.compile (dynamo and AOT autograd, backend aot_eager:
    no code generation) of the family's training forward and backward, whose loss and gradients
    must equal eager's; the graphs and graph breaks counted (bigtrain's loss-function pin applied,
    as the trainer's compile_engine does)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoConfig

    from bigtrain.engine import _pin_loss_function
    from bigtrain.models import exact_attention, model_class

    task = "clm" if name in families.CAUSAL else "mlm"
    cls = model_class(task, AutoConfig.from_pretrained(str(path)))
    model = load(path, cls, exact_attention(cls))
    _pin_loss_function(model)
    ids = torch.randint(5, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, ::3] = -100
    model.zero_grad()
    want = model(input_ids=ids, labels=labels).loss
    want.backward()
    want_g = grads(model)
    model.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(model, backend="aot_eager")(input_ids=ids, labels=labels).loss
    got.backward()
    graphs, breaks = counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())
    diff = max(rel(got.detach(), want.detach()), worst(grads(model), want_g))
    return {"status": "ok", "diff": diff, "graphs": graphs, "graph_breaks": breaks}


def main(zoo: str, out: str) -> None:
    results = {}
    for name in families.FAMILIES:
        path = Path(zoo) / name
        row = {"attention": attention(name, path), "compile": compile_check(name, path)}
        if name in families.CAUSAL:
            row["chunked_loss"], row["lora"] = chunked_loss(name, path), lora(name, path)
            row["chat_template"] = chat_template(name, path)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
