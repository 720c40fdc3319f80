"""Packed chat conversations through the fused kernel: what SFTTask gives the model under
bigtrain_triton (segment ids, an all-ones attention mask, restarting position ids) keeps each
conversation apart: its logits equal its logits alone (Triton's interpreter on CPU)."""

from __future__ import annotations

import torch

from bigtrain.chat import encode, ensure_template, pack, parse_record

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "increment x"},
                  {"role": "assistant", "content": "x += 1"}, {"role": "user", "content": "and decrement it"},
                  {"role": "assistant", "content": "x -= 1"}]},
    {"prompt": "what is the capital of france", "completion": "paris"},
    {"prompt": "increment x", "completion": "x += 1"},
]


def test_packed_conversations_through_the_fused_kernel(tmp_path):
    import bigtrain.kernels  # noqa: F401 - registers bigtrain_triton
    from transformers import AutoConfig, AutoModelForCausalLM

    from bigtrain.tokenizer import load_tokenizer, train_bpe

    texts = [m["content"] for c in CONVERSATIONS for m in c.get("messages", [])] + ["what is the capital of france", "paris"]
    train_bpe(texts * 20, 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    ensure_template(tok)
    enc = [encode(tok, parse_record(c, f"t:{i}")) for i, c in enumerate(CONVERSATIONS)]
    rows = pack(enc, 128, tok.pad_token_id or 0)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="bigtrain_triton").eval()
    ids = torch.from_numpy(rows.input_ids)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=torch.from_numpy(rows.position_ids), segment_ids=torch.from_numpy(rows.segment_ids),
                       attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        at = 0
        for e in enc:
            alone = model(input_ids=torch.tensor([e.ids]), use_cache=False).logits[0]
            assert torch.allclose(packed[at:at + len(e.ids)], alone, atol=1e-4), e.where
            at += len(e.ids)
        # Without the segment ids the later conversations would see the earlier ones.
        leaky = model(input_ids=ids, position_ids=torch.from_numpy(rows.position_ids), attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        n0 = len(enc[0].ids)
        assert not torch.allclose(leaky[n0:n0 + len(enc[1].ids)], packed[n0:n0 + len(enc[1].ids)], atol=1e-4)
