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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from bigtrain.errors import UserError
from bigtrain.loss import IGNORE
from bigtrain.evaluation import Comm, Evaluation, rank_slices  # noqa: F401 - part of the task interface



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

    from bigtrain.config import cache_root, where_of
    from bigtrain.data import resolve_tokenizer_dir
    from bigtrain.labeled import check_known_labels
    from bigtrain.tokenizer import cached_tokenizer

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
        key = [hashlib.sha256(Path(train_path).read_bytes()).hexdigest(), d.vocab_size, "wordpiece-v1"]
        tok_dir = cached_tokenizer(cache_root(cfg), key, "wordpiece-v1", d.vocab_size, texts, str(train_path), log)
    return LabeledData(tok_dir, train, valid, names)


# --------------------------------------------------------------------------- the task interface
#
# The trainer, `bigtrain eval` and the export see a task only through bigtrain.api.Task (every
# member documented there); the built-in tasks below implement it, and so can a user's class.


class LMTask:
    """clm and mlm: packed token blocks (bigtrain.data), evaluated by loss over validation blocks."""

    labeled = False
    added_tokens: list[int] = []

    def __init__(self, cfg) -> None:
        self.cfg, self.name = cfg, cfg.task
        self.model_task = cfg.task
        self.best_metric = cfg.train.best_metric
        self.prepared = None
        self.masker: Optional[MLMMasker] = None
        self.segment_ids = False  # pass segment ids to the model (bigtrain_triton on packed clm)

    def use_attention(self, attn_implementation: str) -> None:
        self.segment_ids = self.name == "clm" and attn_implementation == "bigtrain_triton"

    def prepare(self, rank: int, joined: bool, log: Callable) -> None:
        """Rank 0 makes sure the data is prepared (tokenizing it, in a child process, when small
        enough) before the group exists, so bad data ends the job before any collective; the
        other ranks learn where it is after joining."""
        if (rank == 0) != joined:
            from bigtrain.corpus import ensure_prepared

            self.prepared = ensure_prepared(self.cfg, log=log if rank == 0 else (lambda *a: None))

    @property
    def tokenizer_dir(self) -> Path:
        return self.data.tokenizer_dir

    def open(self) -> None:
        """Open the prepared data (after `prepare`, before the tokenizer is loaded)."""
        from bigtrain.corpus import ShardData

        self.data = ShardData(self.cfg, self.prepared)

    def load(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.train_blocks, self.valid_blocks, self.valid_indices = self.data.train, self.data.valid, self.data.valid_ids
        if self.name == "mlm":
            self.masker = MLMMasker(tokenizer, self.cfg.data.mlm_probability, self.cfg.data.whole_word_mask, self.cfg.train.seed)

    def schedule(self, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int):
        return self.data.schedule(global_batch, micro_batch, world_size, rank, seed)

    def configure(self, hf_config) -> None:
        """Prepared token ids must fit the model's embedding (a prepared directory can come from
        another tokenizer than a pretrained model's)."""
        vocab = getattr(self.data, "vocab_size", None)
        if vocab is not None and vocab > hf_config.vocab_size:
            raise UserError(
                f"{self.data.where}: the prepared data's tokenizer has {vocab} tokens but the model's embedding holds "
                f"{hf_config.vocab_size} (model.config.vocab_size); prepare the data with the model's tokenizer"
            )

    def describe(self) -> str:
        return self.data.describe()

    def progress(self, position: int) -> dict:
        """What metrics.jsonl records of the data at sample `position`: samples and epochs per source."""
        return self.data.progress(position)

    def _model_batch(self, blocks, indices, mask_seed: int) -> dict:
        from bigtrain.data import to_model_batch

        batch = to_model_batch(blocks.take(indices), self.tokenizer.pad_token_id)
        segment_ids = batch.pop("segment_ids", None)
        if self.masker is not None:
            return self.masker(batch, mask_seed)
        if segment_ids is not None and self.segment_ids:
            # Packed documents: the fused kernel masks attention per document. transformers
            # forwards the keyword to the attention function; an all-ones attention_mask keeps
            # it from inferring packing from position ids (the slow dense path).
            import torch

            batch["segment_ids"] = segment_ids
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    def batch(self, indices, position: int) -> dict:
        seed = position * 1_000_003 + int(indices[0]) if len(indices) else position
        return self._model_batch(self.train_blocks, indices, seed)

    def evaluate(self, forward: Callable, comm: Comm) -> Evaluation:
        """Mean loss over the validation blocks (the same number of batches on every rank); for
        mlm, masked with fixed seeds so every evaluation sees the same masks, plus accuracy."""
        import torch

        valid, micro = self.valid_indices, self.cfg.train.micro_batch_size
        if len(valid) == 0:
            return Evaluation({})
        n_batches = max(1, min(self.cfg.train.eval_batches, math.ceil(len(valid) / (micro * comm.data_world))))
        totals = torch.zeros(3, dtype=torch.float64, device=comm.device)  # loss x targets, targets, correct
        with torch.no_grad():
            for b in range(n_batches):
                pos = (b * comm.data_world + comm.data_rank) * micro + np.arange(micro)
                batch = comm.to_device(self._model_batch(self.valid_blocks, valid[pos % len(valid)], -1 - int(pos[0])))
                labels = batch["labels"]
                n_targets = ((labels[:, 1:] if self.masker is None else labels) != IGNORE).sum()
                out = forward(batch)
                totals[0] += out.loss.double() * n_targets
                totals[1] += n_targets
                if self.masker is not None:
                    totals[2] += ((out.logits.argmax(-1) == labels) & (labels != IGNORE)).sum()
        comm.all_reduce(totals)
        loss = (totals[0] / totals[1]).item()
        record = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700))}
        if self.masker is not None:
            record["eval_accuracy"] = (totals[2] / totals[1]).item()
        extra = f", masked-token accuracy {record['eval_accuracy']:.4f}" if "eval_accuracy" in record else ""
        return Evaluation(record, f"validation loss {loss:.4f}, perplexity {record['eval_ppl']:.2f}{extra}")


class LabeledTask:
    """classify and token_classify: labeled examples, scored by accuracy and F1 over all of them."""

    labeled = True
    added_tokens: list[int] = []

    def __init__(self, cfg) -> None:
        self.cfg, self.name = cfg, cfg.task
        self.model_task = cfg.task
        self.best_metric = cfg.train.best_metric or default_best_metric(cfg.task)
        self.prepared: Optional[LabeledData] = None

    def use_attention(self, attn_implementation: str) -> None:
        pass  # one example per row: no documents to keep apart

    def prepare(self, rank: int, joined: bool, log: Callable) -> None:
        """Labeled files are small: every rank reads and checks them before the rendezvous."""
        if not joined:
            self.prepared = prepare_labeled(self.cfg, log=log if rank == 0 else (lambda *a: None))

    def load(self, tokenizer) -> None:
        from bigtrain.mixture import held_out

        cfg, p = self.cfg, self.prepared
        self.label_names = p.names
        label2id = {n: i for i, n in enumerate(p.names)}
        self.train_set = tokenize_examples(cfg.task, p.train, tokenizer, label2id, cfg.data.seq_len)
        self.valid_set = self.train_set
        if p.valid:
            self.valid_set = tokenize_examples(cfg.task, p.valid, tokenizer, label2id, cfg.data.seq_len)
            self.valid_indices = np.arange(len(self.valid_set))
        else:  # the schedule holds out the same rows
            self.valid_indices = held_out(len(self.train_set), cfg.data.valid_fraction, cfg.train.seed)

    def configure(self, hf_config) -> None:
        hf_config.num_labels = len(self.label_names)
        hf_config.id2label = dict(enumerate(self.label_names))
        hf_config.label2id = {n: i for i, n in enumerate(self.label_names)}
        if not hasattr(hf_config, "type_vocab_size"):
            # Only BERT-family models take token type ids (a Llama forward would reject them).
            self.train_set.token_type_ids = self.valid_set.token_type_ids = None

    def describe(self) -> str:
        n_train = len(self.train_set) - (0 if self.prepared.valid else len(self.valid_indices))
        return f"{n_train} training examples, {len(self.label_names)} labels"

    @property
    def tokenizer_dir(self) -> Path:
        return self.prepared.tokenizer_dir

    def open(self) -> None:
        pass  # read whole by `prepare`

    def schedule(self, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int):
        from bigtrain.mixture import MixtureSchedule

        return MixtureSchedule.single(len(self.train_set), global_batch, micro_batch, world_size, rank, seed,
                                      self.cfg.data.valid_fraction, valid_separate=bool(self.prepared.valid))

    def progress(self, position: int) -> dict:  # noqa: ARG002 - one source
        return {}

    def batch(self, indices, position: int) -> dict:  # noqa: ARG002 - no per-batch randomness
        return self.train_set.batch(indices)

    def evaluate(self, forward: Callable, comm: Comm) -> Evaluation:
        """Every validation example once over all ranks; predictions gathered, scored on each rank."""
        import torch

        if len(self.valid_indices) == 0:
            return Evaluation({})
        gold: list = []
        pred: list = []
        loss_sum = torch.zeros(2, dtype=torch.float64, device=comm.device)
        with torch.no_grad():
            for chunk in rank_slices(len(self.valid_indices), self.cfg.train.micro_batch_size, comm.world, comm.rank):
                real = chunk >= 0
                batch = comm.to_device(self.valid_set.batch(self.valid_indices[np.where(real, chunk, 0)]))
                out = forward(dict(batch))
                g, p = predictions(self.name, out.logits.float(), batch["labels"])
                keep = real.tolist()
                gold += [x for x, k in zip(g, keep) if k]
                pred += [x for x, k in zip(p, keep) if k]
                loss_sum[0] += out.loss.double() * float(real.sum())
                loss_sum[1] += float(real.sum())
        comm.all_reduce(loss_sum)
        gathered = comm.all_gather_object((gold, pred))
        gold = [x for g, _ in gathered for x in g]
        pred = [x for _, p in gathered for x in p]
        metrics, report = score(self.name, gold, pred, self.label_names)
        record = {"eval_loss": (loss_sum[0] / loss_sum[1]).item(), **metrics, "eval_examples": len(gold)}
        return Evaluation(record, f"validation loss {record['eval_loss']:.4f}, accuracy {record['eval_accuracy']:.4f}, f1 {record['eval_f1']:.4f}", report)


# The built-in tasks by name, as the same kind of reference a config gives for a user's task
# (bigtrain/plugins.py): one way to find a task's class, whoever wrote it.
BUILTIN_TASKS = {"clm": "bigtrain.tasks:LMTask", "mlm": "bigtrain.tasks:LMTask", "classify": "bigtrain.tasks:LabeledTask",
                 "token_classify": "bigtrain.tasks:LabeledTask", "sft": "bigtrain.chat:SFTTask"}


def build_task(cfg):
    """The task object for cfg.task: a built-in one by name, or a user's class (`module:Class`,
    with its Options built from task_options; bigtrain/api.py)."""
    from bigtrain.config import custom_task_options, is_reference, task_class, where_of
    from bigtrain.plugins import load_object

    if is_reference(cfg.task):
        cls, options = task_class(cfg), custom_task_options(cfg)
        return cls(cfg) if options is None else cls(cfg, options)
    return load_object(BUILTIN_TASKS[cfg.task], where_of(cfg, "task"))(cfg)
