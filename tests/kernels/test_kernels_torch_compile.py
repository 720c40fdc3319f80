"""bigtrain_triton under torch.compile: the kernels are torch.library custom ops (fake kernels for
shapes, a registered backward), so a transformers model compiles with the attention inside the
graph, and training through the compiled model gives eager's losses.

On CPU the ops run the Triton interpreter inside the compiled graph. The loss test uses the
`aot_eager` backend: AOTAutograd traces the ops' fake kernels and their registered backward,
which is what this file is about; inductor's code generation of the rest of the model is
covered by tests/test_compile.py (train.compile) and would cost ~50 s here.
"""

from __future__ import annotations

import pytest
import torch

import bigtrain.kernels  # noqa: F401 - registers bigtrain_triton

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V, S = 96, 24


def _gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="bigtrain_triton").to(DEVICE)


def _llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="bigtrain_triton").to(DEVICE)


def _batch(g: torch.Generator) -> dict:
    ids = torch.randint(0, V, (2, S), generator=g).to(DEVICE)
    seg = (torch.arange(S)[None].expand(2, S) // 8).to(DEVICE)  # three packed documents per row
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), segment_ids=seg, padding_free=True)


def _op_calls(explanation) -> int:
    return sum("flash_attn_fwd" in str(n.target) for g in explanation.graphs for n in g.graph.nodes
               if n.op == "call_function")


@pytest.mark.parametrize("name,labels", [("llama", True), ("gpt2", False)])
def test_no_graph_break_in_attention(name, labels):
    # (GPT-2 with labels breaks once, in transformers' loss function after the logits: not ours.)
    torch._dynamo.reset()
    model = _llama() if name == "llama" else _gpt2()
    batch = _batch(torch.Generator().manual_seed(1))
    if labels:
        batch["labels"] = batch["input_ids"]
    explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    assert _op_calls(explanation) == 2  # one fused attention per layer, inside the graph


def test_compiled_training_matches_eager():
    def train(compiled: bool) -> list[float]:
        torch._dynamo.reset()
        model = _gpt2()
        step_fn = torch.compile(model, backend="aot_eager", fullgraph=False) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            batch = _batch(g)
            loss = step_fn(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    eager, compiled = train(False), train(True)
    # Step 1 checks the forward; steps 2-3 follow the updates, so they check the gradients that
    # flowed through the custom op's registered backward.
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-6 * abs(a), (eager, compiled)
    assert compiled[0] != compiled[2]
