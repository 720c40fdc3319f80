"""Chat fine-tuning (task=sft): label masks token by token, packing without cross-talk, bad input,
and an end-to-end run: a small model pretrained by bigtrain learns an instruction task it could
not do (exact match of greedy replies from ~0 to >= 0.9)."""

from __future__ import annotations

import json

import pytest
import torch

from bigtrain.chat import IGNORE, encode, ensure_template, pack, parse_record
from bigtrain.errors import UserError

# A Llama-3-style template (header tokens, <|eot_id|> ends each turn, <|begin_of_text|> first).
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

MULTI = {"messages": [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "increment x"},
                      {"role": "assistant", "content": "x += 1"}, {"role": "user", "content": "and decrement it"},
                      {"role": "assistant", "content": "x -= 1"}]}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained here (no chat template of its own)."""
    from bigtrain.tokenizer import load_tokenizer, train_bpe

    d = tmp_path_factory.mktemp("tok") / "bpe"
    texts = ["x += 1", "x -= 1", "increment x", "and decrement it", "Answer in code.", "what is the capital of france", "paris"] * 50
    train_bpe(texts, 400, d)
    return lambda: load_tokenizer(d)


def learned_runs(tok, enc) -> tuple[list[str], str]:
    """The decoded text of each run of learned tokens, and of all other tokens, in order."""
    runs, other, current = [], [], []
    for i, lab in zip(enc.ids, enc.labels):
        if lab != IGNORE:
            assert lab == i  # a learned token's label is the token itself (the model shifts)
            current.append(i)
        else:
            if current:
                runs.append(tok.decode(current))
                current = []
            other.append(i)
    if current:
        runs.append(tok.decode(current))
    return runs, tok.decode(other)


def test_default_template_learns_only_the_assistant_replies_and_their_end_of_turn(bpe):
    tok = bpe()
    assert ensure_template(tok)  # no template of its own: ChatML and its two tokens are added
    assert tok.convert_tokens_to_ids("<|im_end|>") == len(tok) - 1
    runs, other = learned_runs(tok, encode(tok, parse_record(MULTI, "t:1")))
    assert runs == ["x += 1<|im_end|>\n", "x -= 1<|im_end|>\n"]
    assert other == ("<|im_start|>system\nAnswer in code.<|im_end|>\n<|im_start|>user\nincrement x<|im_end|>\n<|im_start|>assistant\n"
                     "<|im_start|>user\nand decrement it<|im_end|>\n<|im_start|>assistant\n")
    single = encode(tok, parse_record({"prompt": "what is the capital of france", "completion": "paris"}, "t:2"))
    assert learned_runs(tok, single)[0] == ["paris<|im_end|>\n"]
    everything = encode(tok, parse_record(MULTI, "t:1"), train_on="all")
    assert everything.labels == everything.ids


def test_a_real_template_string(bpe):
    tok = bpe()
    tok.chat_template = LLAMA3
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
    assert not ensure_template(tok)  # it has one: nothing added
    enc = encode(tok, parse_record(MULTI, "t:1"))
    runs, other = learned_runs(tok, enc)
    assert runs == ["x += 1<|eot_id|>", "x -= 1<|eot_id|>"]
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert other == ("<|begin_of_text|>" + head.format("system") + "Answer in code.<|eot_id|>" + head.format("user") + "increment x<|eot_id|>"
                     + head.format("assistant") + head.format("user") + "and decrement it<|eot_id|>" + head.format("assistant"))
    # Without a system prompt the first learned token still starts right after the header.
    no_system = {"messages": MULTI["messages"][1:3]}
    assert learned_runs(tok, encode(tok, parse_record(no_system, "t:2")))[0] == ["x += 1<|eot_id|>"]


def test_a_template_that_does_not_render_turn_by_turn_is_refused(bpe):
    tok = bpe()
    # Puts the last message first: earlier turns' renderings are not prefixes of the whole.
    tok.chat_template = "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="t:1: the chat template does not render turns one after another"):
        encode(tok, parse_record(MULTI, "t:1"))
    tok.chat_template = "{{ raise_exception('only user/assistant') }}"
    with pytest.raises(UserError, match="t:1: the chat template cannot be applied"):
        encode(tok, parse_record(MULTI, "t:1"))


@pytest.mark.parametrize("record,needle", [
    ({"messages": "hi"}, "'messages' must be a list"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object with 'role' and 'content'"),
    ({"text": "hi"}, "needs 'messages' or both 'prompt' and 'completion'"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_conversations_name_file_and_line(record, needle):
    with pytest.raises(UserError) as e:
        parse_record(record, "chats.jsonl:7")
    assert str(e.value).startswith("chats.jsonl:7: ") and needle in str(e.value)


def tiny_model(kind: str, attn: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = (dict(n_layer=2, n_embd=64, n_head=4, n_positions=128) if kind == "gpt2" else
            dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=vocab, **spec), attn_implementation=attn).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_conversations_do_not_see_each_other(bpe, kind, attn):
    """Three conversations in one packed row: each one's logits equal its logits alone."""
    tok = bpe()
    ensure_template(tok)
    convs = [MULTI, {"prompt": "what is the capital of france", "completion": "paris"}, {"prompt": "increment x", "completion": "x += 1"}]
    enc = [encode(tok, parse_record(c, f"t:{i}")) for i, c in enumerate(convs)]
    rows = pack(enc, 128, tok.pad_token_id or 0)
    assert len(rows.input_ids) == 1 and sorted(set(rows.segment_ids[0].tolist())) == [0, 1, 2, 3]
    model = tiny_model(kind, attn, len(tok))
    with torch.no_grad():
        # As in training (SFTTask.configure turns the cache off): no attention mask, no cache, and
        # transformers builds the block-diagonal causal mask from the restarting position ids.
        packed = model(input_ids=torch.from_numpy(rows.input_ids), position_ids=torch.from_numpy(rows.position_ids), use_cache=False).logits[0]
        at = 0
        for e in enc:
            alone = model(input_ids=torch.tensor([e.ids])).logits[0]
            assert torch.allclose(packed[at:at + len(e.ids)], alone, atol=1e-5), (kind, attn, e.where)
            at += len(e.ids)
    # The labels: each conversation's first token is never learned from the one before it.
    starts = [0, len(enc[0].ids), len(enc[0].ids) + len(enc[1].ids)]
    assert all(rows.labels[0, s] == IGNORE for s in starts)


FRUITS = {"apple": "red", "banana": "yellow", "cherry": "dark red", "lime": "green", "plum": "purple", "orange": "orange",
          "lemon": "yellow", "grape": "green", "kiwi": "brown", "blueberry": "blue", "coconut": "brown", "mango": "orange",
          "pear": "green", "peach": "pink", "fig": "purple", "date": "brown", "melon": "green", "papaya": "orange",
          "apricot": "orange", "raspberry": "red", "blackberry": "black", "olive": "black", "tomato": "red", "avocado": "dark green"}


@pytest.mark.slow
def test_sft_teaches_a_pretrained_model_an_instruction_task(cli, corpus, tmp_path):
    """Pretrain a tiny GPT on Python source (bigtrain train), then fine-tune it on conversations
    asking for a fruit's colour (a fact the base model cannot know): greedy replies go from no
    exact match to >= 0.9 (eval.generate_examples=24, every fact asked once)."""
    base = tmp_path / "base"
    r = cli(["train", f"data.train_files={corpus}", "data.vocab_size=512", "data.seq_len=64", "train.micro_batch_size=8",
             "train.max_steps=30", "train.progress=false", "train.sample_tokens=0", f"output_dir={base}"])
    assert r.returncode == 0, r.stderr[-3000:]
    chats = tmp_path / "fruit.jsonl"
    with chats.open("w") as f:
        for fruit, colour in FRUITS.items():
            f.write(json.dumps({"messages": [{"role": "system", "content": "You name colours."},
                                             {"role": "user", "content": f"What colour is a {fruit}?"},
                                             {"role": "assistant", "content": colour}]}) + "\n")
    sft = tmp_path / "sft"
    args = ["train", "task=sft", f"model.from_pretrained={base / 'model'}", f"data.train_files={chats}", f"data.valid_files={chats}",
            "data.seq_len=64", "train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=10", "train.max_steps=300",
            "train.weight_decay=0", "model.config.resid_pdrop=0", "model.config.embd_pdrop=0", "model.config.attn_pdrop=0",
            "train.eval_every=300", "train.log_every=50", "train.progress=false", "eval.generate_examples=24", "eval.max_new_tokens=6",
            f"output_dir={sft}"]
    r = cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in recs if "eval_exact_match" in x][-1]
    assert final["eval_generated"] == 24 and final["eval_exact_match"] >= 0.9, final
    # The base model, asked the same way (its tokenizer given the same template), gets none right.
    r = cli(["eval", str(base / "model"), "task=sft", f"data.valid_files={chats}", "data.seq_len=64", "eval.generate_examples=24",
             "eval.max_new_tokens=6", "--output", str(tmp_path / "base.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "base.json").read_text())["eval_exact_match"] <= 0.1
