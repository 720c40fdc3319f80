"""`bigtrain eval` and `bigtrain predict`: an exported model directory on a file, in one process.

The task comes from the model's config (`architectures`: ...ForSequenceClassification ->
classify, ...ForTokenClassification -> token_classify, ...ForMaskedLM -> mlm, else clm), the
label names from its `id2label`. No DeepSpeed: the model is loaded whole with transformers.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from bigtrain import tasks
from bigtrain.errors import UserError
from bigtrain.plugins import is_reference


def load_model_dir(model_dir: str):
    """(task, model in eval mode, tokenizer, label names or None) of an exported model directory."""
    from bigtrain.models import auto_class, load_pretrained_config, refuse_remote_code, task_of_architecture
    from bigtrain.tokenizer import load_tokenizer

    p = Path(model_dir)
    try:
        found = (p / "config.json").is_file()
    except OSError:
        found = False
    if not found:
        raise UserError(f"{model_dir}: not a model directory (no config.json); give a bigtrain export such as RUN_DIR/model")
    # trust_remote_code=False throughout: a directory whose auto_map points at its own Python files
    # is refused, never imported (transformers would otherwise prompt, and run it on "y").
    config = load_pretrained_config(str(p), where="MODEL_DIR")
    task = task_of_architecture(config)
    tokenizer = load_tokenizer(p, where="MODEL_DIR")
    names = None
    if task in ("classify", "token_classify"):
        id2label = getattr(config, "id2label", None) or {}
        try:
            names = [str(id2label[i]) for i in range(config.num_labels)]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{model_dir}/config.json: id2label does not name labels 0..num_labels-1 ({config.num_labels} labels)") from None
    try:
        model = auto_class(task).from_pretrained(str(p), config=config, trust_remote_code=False)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - missing or mismatched weights: a bad model directory
        refuse_remote_code(p, "MODEL_DIR", e)
    model.eval()
    return task, model, tokenizer, names


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def evaluate_model(model_dir: str, cfg, output: Optional[str] = None, log=print) -> dict:
    """Metrics of MODEL_DIR on data.valid_files (else data.train_files); printed and written as JSON.
    The evaluation is the trainer's own (`Task.evaluate`), on one process."""
    task, model, tokenizer, names = load_model_dir(model_dir)
    files = cfg.data.valid_files or cfg.data.train_files
    device = _device()
    model.to(device)
    if is_reference(cfg.task):  # a user's task (bigtrain.api.Task) evaluates with its own data
        task, (evaluator, described) = cfg.task, _custom_evaluator(cfg, tokenizer, log)
    elif task in ("classify", "token_classify"):
        evaluator, described = _labeled_evaluator(task, cfg, files, model, tokenizer, names, log)
    elif cfg.task == "sft" and task == "clm":
        task, (evaluator, described) = "sft", _sft_evaluator(cfg, files, model, tokenizer)
    else:
        evaluator, described = _lm_evaluator(task, cfg, files, model_dir, tokenizer, log)
    evaluation = evaluator.evaluate(lambda batch: model(**batch), tasks.Comm(device=device))
    result = {"task": task, **described, **evaluation.record}
    report = evaluation.report or "\n".join(f"{k}: {v:.4f}" for k, v in result.items() if isinstance(v, float))
    out_path = Path(output) if output else Path(model_dir) / "eval_results.json"
    _write_atomically(out_path, json.dumps(result, indent=1) + "\n")
    print(report)
    print(json.dumps(result))
    log(f"metrics written to {out_path}")
    return result


def _custom_evaluator(cfg, tokenizer, log) -> tuple:
    """A user's task, prepared and loaded as in training (one process) with the model's tokenizer."""
    evaluator = tasks.build_task(cfg)
    evaluator.prepare(0, False, log)
    evaluator.prepare(0, True, log)
    evaluator.open()
    evaluator.load(tokenizer)
    return evaluator, {"data": evaluator.describe()}


def _labeled_evaluator(task: str, cfg, files: list, model, tokenizer, names: list, log) -> tuple:
    if len(files) != 1:
        raise UserError(f"data.valid_files: bigtrain eval reads one labeled file; got {len(files)}")
    from bigtrain.labeled import check_known_labels

    examples = tasks.read_examples(task, str(files[0]), cfg.data.format, cfg.data.on_bad_rows, log)
    check_known_labels(examples, names, str(files[0]))
    cfg.task = task
    evaluator = tasks.LabeledTask(cfg)
    evaluator.label_names = names
    evaluator.valid_set = tasks.tokenize_examples(task, examples, tokenizer, {n: i for i, n in enumerate(names)}, cfg.data.seq_len)
    evaluator.valid_indices = np.arange(len(evaluator.valid_set))
    if not hasattr(model.config, "type_vocab_size"):
        evaluator.valid_set.token_type_ids = None
    return evaluator, {"file": str(files[0]), "examples": len(evaluator.valid_set)}


def _sft_evaluator(cfg, files: list, model, tokenizer) -> tuple:
    """task=sft on a causal LM: loss over assistant tokens and exact match of greedy replies. A
    tokenizer without a chat template gets bigtrain's default (new tokens: the embedding grows,
    their rows untrained, as for a model that was never chat-tuned)."""
    from bigtrain.chat import SFTTask, conversations_of, ensure_template

    if ensure_template(tokenizer) and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    conversations = conversations_of([str(f) for f in files])
    evaluator = SFTTask(cfg)
    evaluator.load_validation(tokenizer, conversations)
    return evaluator, {"files": [str(f) for f in files], "conversations": len(conversations)}


def _lm_evaluator(task: str, cfg, files: list, model_dir: str, tokenizer, log) -> tuple:
    from bigtrain.corpus import ShardData, ensure_prepared

    cfg.task = task
    cfg.data.tokenizer = str(model_dir)
    cfg.data.train_files, cfg.data.sources, cfg.data.prepared = list(files), None, None
    cfg.data.valid_files = None
    cfg.origin.source_specs = None  # the sources changed: checked again
    blocks = ShardData(cfg, ensure_prepared(cfg, log=log)).train
    n = min(len(blocks), cfg.train.eval_batches * cfg.train.micro_batch_size)
    evaluator = tasks.LMTask(cfg)
    evaluator.tokenizer, evaluator.valid_blocks, evaluator.valid_indices = tokenizer, blocks, np.arange(n)
    if task == "mlm":
        evaluator.masker = tasks.MLMMasker(tokenizer, cfg.data.mlm_probability, cfg.data.whole_word_mask, cfg.train.seed)
    return evaluator, {"files": [str(f) for f in files], "blocks": n}


def predict_file(model_dir: str, input_path: str, output: Optional[str], fmt: Optional[str], batch_size: int, on_bad_rows: str, log=print) -> int:
    """classify: `label<TAB>probability` per input row; token_classify: `token<TAB>label` lines, a
    blank line between sentences. Input rows may carry a label (it is ignored) or not."""
    import torch

    task, model, tokenizer, names = load_model_dir(model_dir)
    if task not in ("classify", "token_classify"):
        raise UserError(f"{model_dir}: bigtrain predict is for classify and token_classify models; this one is {task} (use bigtrain generate or eval)")
    examples = tasks.read_examples(task, input_path, fmt, on_bad_rows, log, require_label=False)
    limit = min(getattr(model.config, "max_position_embeddings", 512) or 512, 512)
    data = tasks.tokenize_examples(task, examples, tokenizer, None, limit)
    if not hasattr(model.config, "type_vocab_size"):
        data.token_type_ids = None
    device = _device()
    model.to(device)
    lines: list[str] = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            batch = {k: v.to(device) for k, v in data.batch(idx).items() if k != "labels"}
            logits = model(**batch).logits.float()
            if task == "classify":
                probs = logits.softmax(-1)
                best = probs.argmax(-1)
                lines += [f"{names[int(b)]}\t{float(probs[j, b]):.6f}" for j, b in enumerate(best)]
                continue
            enc_pred = logits.argmax(-1).tolist()
            for j, i in enumerate(idx):
                ex = examples[i]
                words = _first_subword_positions(tokenizer, ex.tokens, limit)
                for w, token in enumerate(ex.tokens):
                    pos = words.get(w)
                    lines.append(f"{token}\t{names[enc_pred[j][pos]] if pos is not None else 'O'}")
                lines.append("")
    text = "\n".join(lines) + ("\n" if lines and lines[-1] != "" else "")
    if output:
        _write_atomically(Path(output), text)
        log(f"{len(examples)} predictions written to {output}")
    else:
        sys.stdout.write(text)
    return 0


def _first_subword_positions(tokenizer, words: list[str], limit: int) -> dict[int, int]:
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=limit)
    first: dict[int, int] = {}
    for pos, w in enumerate(enc.word_ids()):
        if w is not None and w not in first:
            first[w] = pos
    return first
