"""The reference for packed token blocks: documents laid end to end with EOS after each, cut into
full blocks (transformers' run_clm `group_texts`). bigtrain's preparation (bigtrain/prepare.py,
datatrove) must give exactly these blocks (tests/test_prepare.py, tests/test_data.py)."""

from __future__ import annotations

import numpy as np


def pack(flat: np.ndarray, lengths: np.ndarray, eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (n_blocks, seq_len) token blocks and per-token segment ids.

    Each non-empty document is followed by EOS; the stream is cut into full blocks (the
    remainder is dropped, as in transformers' run_clm `group_texts`). segment_ids count
    documents within a block from 0, so equal ids mean "same document".
    """
    keep = lengths > 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts, ends = offsets[:-1][keep], offsets[1:][keep]
    if len(starts) == 0:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    if not keep.all():
        flat = np.concatenate([flat[s:e] for s, e in zip(starts, ends)])
        lengths = lengths[keep]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    stream = np.insert(flat, offsets[1:], eos_id)
    doc_of_token = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths + 1)
    n_blocks = len(stream) // seq_len
    stream = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    docs = doc_of_token[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    segments = docs - docs[:, :1]
    return stream.astype(np.int32), segments.astype(np.int32)


# --------------------------------------------------------------------------- the classic loading path
# How bigtrain read and tokenized documents before datatrove: `datasets` loading (text files by
# line/paragraph/document, JSON lines) and a batched tokenizer call per document. The prepared
# shards must hold exactly these tokens (tests/test_prepare.py).


def classic_documents(files: list, sample_by: str, text_field: str, cache_dir):
    """One `datasets.Dataset` with a 'text' column, one row per document."""
    import datasets

    datasets.disable_progress_bars()
    text_files = [str(f) for f in files if not str(f).endswith(".jsonl")]
    json_files = [str(f) for f in files if str(f).endswith(".jsonl")]
    parts = []
    if text_files:
        parts.append(datasets.load_dataset("text", data_files=text_files, sample_by=sample_by, split="train", cache_dir=str(cache_dir)))
    if json_files:
        import json
        from pathlib import Path

        texts = [json.loads(line)[text_field] for f in json_files for line in Path(f).read_text().split("\n") if line.strip()]
        parts.append(datasets.Dataset.from_dict({"text": texts}))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def classic_tokens(docs, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated token ids (no special tokens) and per-document lengths."""
    ids = tokenizer(list(docs["text"]), add_special_tokens=False)["input_ids"] if len(docs) else []
    lengths = np.array([len(x) for x in ids], np.int64)
    flat = np.array([t for x in ids for t in x], np.int64)
    return flat, lengths
