"""Chat fine-tuning (task=sft): label masks token by token, packing without cross-talk, bad input,
and an end-to-end run: a small model pretrained by bigtrain learns an instruction task it could
not do (exact match of greedy replies from ~0 to >= 0.9)."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


def test_a_template_that_closes_the_conversation_with_a_special_token(bpe):
    """Phi-3's format ends a conversation rendered without a generation prompt with EOS, so the
    text up to turn 1 ("...<|end|>\n<EOS>") is no prefix of the whole: the closing EOS is no part
    of turn 1 (and '<', shared by chance with the next '<|user|>', does not move the end)."""
    import families

    tok = bpe()
    template, specials, _ = families.CHAT_STYLES["phi3"]
    tok.chat_template = template
    tok.add_special_tokens({"additional_special_tokens": specials})
    runs, other = learned_runs(tok, encode(tok, parse_record(MULTI, "t:1")))
    eos = tok.eos_token
    assert eos and runs == ["x += 1<|end|>\n", f"x -= 1<|end|>\n{eos}"], runs
    assert other == ("<|system|>\nAnswer in code.<|end|>\n<|user|>\nincrement x<|end|>\n<|assistant|>\n"
                     "<|user|>\nand decrement it<|end|>\n<|assistant|>\n")


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


def write_fruit(path: Path) -> Path:
    with path.open("w") as f:
        for fruit, colour in FRUITS.items():
            f.write(json.dumps({"messages": [{"role": "system", "content": "You name colours."},
                                             {"role": "user", "content": f"What colour is a {fruit}?"},
                                             {"role": "assistant", "content": colour}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def base(cli, corpus, tmp_path_factory):
    """A tiny GPT pretrained by bigtrain on Python source (its tokenizer has no chat template), and the fruit chats."""
    root = tmp_path_factory.mktemp("chat")
    r = cli(["train", f"data.train_files={corpus}", "data.vocab_size=512", "data.seq_len=64", "train.micro_batch_size=8",
             "train.max_steps=30", "train.progress=false", "train.sample_tokens=0", f"output_dir={root / 'base'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "base" / "model", write_fruit(root / "fruit.jsonl")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


@pytest.mark.slow
def test_sft_teaches_a_pretrained_model_an_instruction_task(cli, base, tmp_path):
    """Fine-tune the pretrained model on conversations asking for a fruit's colour (a fact it
    cannot know): greedy replies go from no exact match to >= 0.9 (eval.generate_examples=24,
    every fact asked once)."""
    model, chats = base
    sft = tmp_path / "sft"
    args = ["train", "task=sft", f"model.from_pretrained={model}", f"data.train_files={chats}", f"data.valid_files={chats}",
            "data.seq_len=64", "train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=10", "train.max_steps=240",
            "train.weight_decay=0", "model.config.resid_pdrop=0", "model.config.embd_pdrop=0", "model.config.attn_pdrop=0",
            "train.eval_every=240", "train.log_every=60", "train.progress=false", "eval.generate_examples=24", "eval.max_new_tokens=6",
            f"output_dir={sft}"]
    r = cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    final = [x for x in records(sft) if "eval_exact_match" in x][-1]
    assert final["eval_generated"] == 24 and final["eval_exact_match"] >= 0.9, final
    # The base model, asked the same way (its tokenizer given the same template), gets none right.
    r = cli(["eval", str(model), "task=sft", f"data.valid_files={chats}", "data.seq_len=64", "eval.generate_examples=24",
             "eval.max_new_tokens=6", "--output", str(tmp_path / "base.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "base.json").read_text())["eval_exact_match"] <= 0.1
    # `bigtrain chat` on the exported model (stdin not a terminal: one reply per line) answers
    # what greedy decoding of the same conversation, history included, answers.
    questions = ["What colour is a lime?", "What colour is a plum?"]
    r = cli(["chat", str(sft / "model"), "--system", "You name colours.", "--max-new-tokens", "6"], input="\n".join(questions) + "\n")
    assert r.returncode == 0, r.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    from bigtrain.chat import greedy, render, stop_ids
    from bigtrain.tokenizer import load_tokenizer

    tok, lm = load_tokenizer(sft / "model"), AutoModelForCausalLM.from_pretrained(sft / "model").eval()
    history, replies = [{"role": "system", "content": "You name colours."}], []
    for q in questions:
        history.append({"role": "user", "content": q})
        ids = tok(render(tok, history, True, "test"), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            reply = tok.decode(greedy(lambda b: lm(**b), ids, stop_ids(tok), 6, "cpu"), skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply.strip())
    assert [line.strip() for line in r.stdout.splitlines()] == replies, (r.stdout, replies)
    assert sum(reply == FRUITS[q.split()[-1].rstrip("?")] for reply, q in zip(replies, questions)) >= 1


@pytest.mark.slow
def test_sft_resume_in_padded_mode_repeats_the_straight_run(cli, base, tmp_path):
    model, chats = base
    args = ["train", "task=sft", f"model.from_pretrained={model}", f"data.train_files={chats}", "data.mode=line_by_line",
            "data.seq_len=64", "train.micro_batch_size=4", "train.max_steps=6", "train.save_every=3", "train.keep_last=5",
            "train.log_every=1", "train.eval_every=6", "eval.generate_examples=0", "train.progress=false"]
    r = cli([*args, f"output_dir={tmp_path / 'straight'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"(\d+) conversations in \1 padded examples", r.stderr), r.stderr[-2000:]  # one per example
    r = cli([*args, f"output_dir={tmp_path / 'resumed'}", "--resume", str(tmp_path / "straight" / "checkpoints" / "step_00000003")])
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = step_losses(tmp_path / "straight"), step_losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in (4, 5, 6)), (got, want)


@pytest.fixture(scope="module")
def lora_run(cli, base, tmp_path_factory):
    """LoRA (r=8, peft's default modules for GPT-2: c_attn) under ZeRO-3 on 2 ranks, 6 steps."""
    model, chats = base
    out = tmp_path_factory.mktemp("lora") / "run"
    args = ["train", "task=sft", f"model.from_pretrained={model}", f"data.train_files={chats}", "data.seq_len=64",
            "train.micro_batch_size=4", "train.lr=1e-2", "train.max_steps=6", "train.save_every=3", "train.keep_last=5",
            "train.log_every=1", "train.eval_every=6", "eval.generate_examples=0", "train.progress=false",
            "model.lora.r=8", "deepspeed.zero_stage=3", "--nproc", "2"]
    r = cli([*args, f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, args, r.stderr


def test_lora_trains_only_the_adapters_under_zero3(lora_run, base):
    """Every base weight in the last checkpoint is the pretrained model's, bit for bit; the
    adapters moved (lora_B starts at zero), and so did the chat template's two new token rows."""
    from transformers import AutoModelForCausalLM

    from bigtrain.export import lazy_state_dict

    out, _, log = lora_run
    assert "LoRA r=8: 0.0" in log and "trainable of 2." in log
    pretrained = AutoModelForCausalLM.from_pretrained(base[0]).state_dict()
    saved = {k: v.contiguous() for k, v in lazy_state_dict(out / "checkpoints" / "step_00000006").items()}
    frozen = {k: v for k, v in saved.items() if "lora_" not in k and "trainable_tokens" not in k}
    for key, value in frozen.items():
        name = key.removeprefix("base_model.model.").replace(".base_layer", "").replace(".token_adapter", "")
        want = pretrained[name]
        assert torch.equal(value[: want.shape[0]], want), key
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    delta = [v for k, v in saved.items() if "trainable_tokens_delta" in k]
    assert delta and all(d.shape[0] == 2 and d.abs().max() > 0 for d in delta)  # GPT-2's tied lm_head has its own


def test_lora_merged_export_equals_the_adapted_model_and_the_adapter_is_peft_s(lora_run, tmp_path):
    """The merged export (written at the end of training) is a plain transformers model whose
    logits equal the adapted model's, rebuilt from the checkpoint; --adapter-only writes peft's
    adapter directory, which peft reads back."""
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    from bigtrain.checkpoint import read_state
    from bigtrain.export import export, lazy_state_dict, model_class_for
    from bigtrain.lora import rebuild
    from bigtrain.models import load_pretrained_config

    out, _, _ = lora_run
    ckpt = out / "checkpoints" / "step_00000006"
    state = read_state(ckpt)
    config = load_pretrained_config(str(ckpt / "hf"))
    adapted = rebuild(model_class_for(config, state["task"]), config, state["lora"], lazy_state_dict(ckpt))
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.randint(0, merged.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()
    adapter = export(ckpt, tmp_path / "adapter", adapter_only=True)
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    config = PeftConfig.from_pretrained(str(adapter))
    assert config.r == 8 and set(config.target_modules) == {"c_attn"}


def test_lora_resume_repeats_the_straight_run(cli, lora_run, tmp_path):
    out, args, _ = lora_run
    r = cli([*args, f"output_dir={tmp_path / 'resumed'}", "--resume", str(out / "checkpoints" / "step_00000003")])
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = step_losses(out), step_losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in (4, 5, 6)), (got, want)


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    from bigtrain.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[", "Loading", "DeepSpeed"))]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], (n, errors[0])


def test_bad_chat_input_is_one_error_line(capsys, cli, base, tmp_path):
    model, chats = base
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text().splitlines()[0] + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    common = ["train", "task=sft", f"model.from_pretrained={model}", "data.seq_len=64", f"output_dir={tmp_path / 'o'}"]
    code, err = run_main(capsys, [*common, f"data.train_files={bad}"])
    assert_one_error(code, err, f"{bad}:2: the conversation has no assistant turn")
    code, err = run_main(capsys, [*common, f"data.train_files={chats}", "task=mlm", "model.lora.r=8"])
    assert_one_error(code, err, "model.lora.r", "task=mlm")
    r = cli([*common, f"data.train_files={chats}", "model.lora.r=8", "model.lora.target_modules=[q_proj]"])
    assert_one_error(r.returncode, r.stderr, "model.lora.target_modules", "q_proj match no module", "c_attn", "c_fc", "c_proj")
