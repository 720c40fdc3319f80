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
