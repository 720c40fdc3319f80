"""What differs between tasks: how a batch is made, which labels the loss sees, how it is scored.

  clm             packed token blocks; labels = inputs (the model shifts them)
  mlm             packed token blocks, dynamically masked per batch (15%: 80% [MASK], 10% random,
                  10% kept; optionally whole words) by transformers' DataCollatorForLanguageModeling
  classify        one labeled text or text pair per example (bigtrain.labeled), padded per batch
  token_classify  one labeled sentence per example; the first subword of each word carries the
                  word's label, the other subwords and special tokens are ignored (-100)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from bigtrain.errors import UserError

IGNORE = -100


# --------------------------------------------------------------------------- mlm


class MLMMasker:
    """Dynamic masking of a batch, reproducible from (seed, sample position).

    The masking itself is transformers' `DataCollatorForLanguageModeling.torch_mask_tokens`;
    bigtrain gives it a generator seeded per batch, so a resumed run masks exactly as an
    uninterrupted one, and every epoch masks differently. Whole-word masking needs word
    boundaries: a WordPiece continuation starts with "##", a byte-level BPE word start with "Ġ".
    """

    def __init__(self, tokenizer, probability: float, whole_word: bool, seed: int) -> None:
        import torch
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token_id is None:
            raise UserError("task=mlm: the tokenizer has no mask token ([MASK] or <mask>); use a BERT/RoBERTa tokenizer or let bigtrain train one")
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability, whole_word_mask=whole_word)
        self.whole_word = whole_word
        self.seed = seed
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        byte_level = sum(t.startswith("Ġ") for t in vocab) > len(vocab) // 10
        self.continues = torch.tensor([(not t.startswith("Ġ")) if byte_level else t.startswith("##") for t in vocab], dtype=torch.bool)

    def _offsets(self, ids):
        """Character-like offsets whose gaps mark word starts (what the collator's WWM reads)."""
        import torch

        cont = self.continues[ids.clamp(max=len(self.continues) - 1)]
        step = (~cont).long()  # a new word leaves a gap of one
        ends = torch.cumsum(step + 1, dim=1)
        starts = ends - 1
        return torch.stack([starts, ends], dim=-1).numpy()

    def __call__(self, batch: dict, position: int) -> dict:
        import torch

        ids = batch["input_ids"].long().clone()
        special = torch.isin(ids, self.special)
        if "attention_mask" in batch:
            special |= batch["attention_mask"] == 0
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{position}".encode()).digest()[:8], "little") >> 1
        self.collator.generator = torch.Generator().manual_seed(seed)
        offsets = self._offsets(ids) if self.whole_word else None
        ids, labels = self.collator.torch_mask_tokens(ids, special_tokens_mask=special.long(), offset_mapping=offsets)
        out = dict(batch)
        out["input_ids"], out["labels"] = ids, labels
        return out


# --------------------------------------------------------------------------- labeled data


@dataclass
class LabeledSet:
    """Tokenized labeled examples; `batch(indices)` pads to the longest example of the batch."""

    input_ids: list
    token_type_ids: Optional[list]
    labels: list  # an int per example (classify) or a list per example (token_classify)
    pad_id: int
    examples: list

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: Sequence[int]) -> dict:
        import torch

        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            tt = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(indices):
                tt[j, : len(self.token_type_ids[i])] = torch.tensor(self.token_type_ids[i])
            out["token_type_ids"] = tt
        if isinstance(self.labels[0], list):
            lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            for j, i in enumerate(indices):
                lab[j, : len(self.labels[i])] = torch.tensor(self.labels[i])
        else:
            lab = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        out["labels"] = lab
        return out


def read_examples(task: str, path: str, fmt: Optional[str], on_bad_rows: str, log: Callable, require_label: bool = True) -> list:
    from bigtrain.labeled import guess_format, read_classification, read_token_classification

    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    if task == "token_classify":
        if fmt not in (None, "conll"):
            raise UserError(f"data.format={fmt}: task=token_classify reads CoNLL files (one 'token label' per line)")
        return read_token_classification(path, on_bad_rows=on_bad_rows, require_label=require_label, log=log)
    kind = guess_format(path, fmt)
    if kind == "conll":
        raise UserError(f"{path}: task=classify reads tsv, csv or jsonl (set data.format if the extension misleads)")
    return read_classification(path, kind, on_bad_rows=on_bad_rows, require_label=require_label, log=log)


def tokenize_examples(task: str, examples: list, tokenizer, label2id: Optional[dict], seq_len: int) -> LabeledSet:
    """Tokenize (truncating to seq_len) and map labels to ids (None for unlabeled prediction input)."""
    pad = tokenizer.pad_token_id
    ids: list = [None] * len(examples)
    types: list = [None] * len(examples)
    labels: list = [None] * len(examples)
    if task == "token_classify":
        enc = tokenizer([e.tokens for e in examples], is_split_into_words=True, truncation=True, max_length=seq_len)
        for i, e in enumerate(examples):
            ids[i] = enc["input_ids"][i]
            word_ids = enc.word_ids(i)
            row, previous = [], None
            for w in word_ids:
                if w is None or w == previous or e.labels is None or label2id is None:
                    row.append(IGNORE)  # special token, later subword, or no gold label
                else:
                    row.append(label2id[e.labels[w]])
                previous = w
            labels[i] = row
            if "token_type_ids" in enc:
                types[i] = enc["token_type_ids"][i]
    else:
        singles = [i for i, e in enumerate(examples) if e.text_b is None]
        pairs = [i for i, e in enumerate(examples) if e.text_b is not None]
        for group, second in ((singles, False), (pairs, True)):
            if not group:
                continue
            a = [examples[i].text_a for i in group]
            b = [examples[i].text_b for i in group] if second else None
            enc = tokenizer(a, b, truncation=True, max_length=seq_len)
            for j, i in enumerate(group):
                ids[i] = enc["input_ids"][j]
                if "token_type_ids" in enc:
                    types[i] = enc["token_type_ids"][j]
        for i, e in enumerate(examples):
            labels[i] = label2id[e.label] if (label2id is not None and e.label is not None) else IGNORE
    has_types = all(t is not None for t in types) and len(types) > 0
    return LabeledSet(ids, types if has_types else None, labels, pad, examples)


def label_names(task: str, examples: list) -> list[str]:
    from bigtrain.labeled import label_list

    if task == "token_classify":
        return label_list(label for e in examples for label in (e.labels or []))
    return label_list(e.label for e in examples)


# --------------------------------------------------------------------------- scoring


def predictions(task: str, logits, labels) -> tuple[list, list]:
    """Gold and predicted label ids of one batch, as Python lists (token_classify: per sentence)."""
    pred = logits.argmax(-1)
    if task == "token_classify":
        gold_rows, pred_rows = [], []
        for g, p in zip(labels.tolist(), pred.tolist()):
            keep = [k for k, x in enumerate(g) if x != IGNORE]
            gold_rows.append([g[k] for k in keep])
            pred_rows.append([p[k] for k in keep])
        return gold_rows, pred_rows
    return labels.tolist(), pred.tolist()


def score(task: str, gold: list, pred: list, names: list[str]) -> tuple[dict, str]:
    """(metrics with eval_accuracy and eval_f1, a per-class report) from label ids."""
    from bigtrain import scores

    if task == "token_classify":
        gold_tags = [[names[x] for x in row] for row in gold]
        pred_tags = [[names[x] for x in row] for row in pred]
        flat_g = [t for row in gold_tags for t in row]
        flat_p = [t for row in pred_tags for t in row]
        ent = scores.entity_prf(gold_tags, pred_tags)
        metrics = {"eval_accuracy": scores.accuracy(flat_g, flat_p), "eval_precision": ent["precision"], "eval_recall": ent["recall"], "eval_f1": ent["f1"]}
        lines = [f"entity-level (BIO): precision {ent['precision']:.4f}  recall {ent['recall']:.4f}  f1 {ent['f1']:.4f}"]
        for typ, r in sorted(ent["per_type"].items()):
            lines.append(f"  {typ:<16} precision {r['precision']:.4f}  recall {r['recall']:.4f}  f1 {r['f1']:.4f}  support {r['support']}")
        lines.append(f"token accuracy {metrics['eval_accuracy']:.4f}")
        return metrics, "\n".join(lines)
    g = [names[x] for x in gold]
    p = [names[x] for x in pred]
    metrics = {"eval_accuracy": scores.accuracy(g, p), "eval_f1": scores.macro_f1(g, p, names)}
    return metrics, scores.classification_report(g, p, names)


def metric_is_better(name: str, new: float, old: Optional[float]) -> bool:
    if old is None:
        return True
    return new < old if name.endswith("loss") else new > old


def default_best_metric(task: str) -> str:
    return "eval_f1" if task in ("classify", "token_classify") else "eval_loss"


def rank_slices(n: int, micro: int, world: int, rank: int) -> list[np.ndarray]:
    """Evaluation batches of this rank: every example once over all ranks, the same number of
    batches on each rank (ZeRO-3 needs every rank in every forward); -1 marks padding."""
    per_rank = -(-n // world)
    mine = np.arange(rank, n, world)
    mine = np.concatenate([mine, -np.ones(per_rank - len(mine), dtype=np.int64)]).astype(np.int64)
    return [mine[i : i + micro] for i in range(0, max(per_rank, 1), micro)]


# --------------------------------------------------------------------------- preparing a labeled run


@dataclass
class LabeledData:
    tokenizer_dir: Path
    train: list
    valid: list
    names: list[str]  # label names; the model's label ids index this list


def prepare_labeled(cfg, log: Callable = print) -> LabeledData:
    """Read and check the labeled files, and find (or train) the tokenizer. Every rank runs it
    before joining the process group, so bad data ends the job before any collective."""
    import json

    from bigtrain.config import cache_root, where_of
    from bigtrain.data import resolve_tokenizer_dir
    from bigtrain.labeled import check_known_labels
    from bigtrain.tokenizer import train_wordpiece

    d = cfg.data
    if len(d.train_files) != 1:
        raise UserError(f"{where_of(cfg, 'data.train_files')}: task={cfg.task} reads one labeled training file; got {len(d.train_files)}")
    train_path = str(d.train_files[0])
    train = read_examples(cfg.task, train_path, d.format, d.on_bad_rows, log)
    names = label_names(cfg.task, train)
    if cfg.model.from_pretrained:
        # A checkpoint that already classifies (e.g. resumed fine-tuning) keeps its label order.
        from bigtrain.models import load_pretrained_config

        old = getattr(load_pretrained_config(cfg.model.from_pretrained), "label2id", None) or {}
        if old and set(old) == set(names) and sorted(old.values()) == list(range(len(names))):
            names = sorted(names, key=lambda n: old[n])
    if len(names) < 2 and cfg.task == "classify":
        raise UserError(f"{train_path}: task=classify needs at least two labels; the file has {names}")
    valid: list = []
    if d.valid_files:
        if len(d.valid_files) != 1:
            raise UserError(f"{where_of(cfg, 'data.valid_files')}: task={cfg.task} reads one labeled evaluation file; got {len(d.valid_files)}")
        valid_path = str(d.valid_files[0])
        valid = read_examples(cfg.task, valid_path, d.format, d.on_bad_rows, log)
        check_known_labels(valid, names, valid_path)
    tok_dir = resolve_tokenizer_dir(cfg)
    if tok_dir is None:
        texts = [" ".join(e.tokens) if cfg.task == "token_classify" else " ".join(filter(None, (e.text_a, e.text_b))) for e in train]
        key = hashlib.sha256(json.dumps([hashlib.sha256(Path(train_path).read_bytes()).hexdigest(), d.vocab_size, "wordpiece-v1"]).encode()).hexdigest()[:24]
        tok_dir = cache_root(cfg) / "tokenizers" / key
        if not (tok_dir / "tokenizer.json").is_file():
            log(f"training a WordPiece tokenizer (vocab {d.vocab_size}) on {train_path} ...")
            train_wordpiece(texts, d.vocab_size, tok_dir)
    return LabeledData(tok_dir, train, valid, names)
