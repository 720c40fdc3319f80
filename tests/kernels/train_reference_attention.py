"""`bigtrain ARGS` with the fused kernel behind `attn_implementation=bigtrain_triton` replaced by
plain-PyTorch attention (attn_reference.attention_ref, fp32, autograd for the backward).

Everything else is the real trainer path: the same transformers attention adapter (masks, causal
flag) and the same per-document `segment_ids` it passes on. A run of this script is the
reference a run with the real kernel must reproduce. Rank 0 of the run (one process here)
writes how many attention calls it served, and with how many documents, to
$BIGTRAIN_REF_ATTN_STATS when that is set.

usage: train_reference_attention.py train key=value ...  (the arguments of `bigtrain`)
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch

from attn_reference import attention_ref

import bigtrain.kernels.attention as kernel_attention
import bigtrain.kernels.transformers_integration as integration
from bigtrain.cli import main

stats = {"calls": 0, "calls_with_segments": 0, "max_segments_in_a_row": 0, "calls_with_padding_mask": 0,
         "calls_with_bounds": 0, "bounds_computed": 0}


def reference_flash_attn(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, segment_ids=None,
                         dense_mask=None, dropout_p=0.0, segment_bounds=None):
    if dropout_p:
        raise AssertionError("the reference runs without attention dropout: set model.config.attn_pdrop=0")
    if dense_mask is not None:
        raise AssertionError("this comparison covers the padding/causal/segment path, not dense masks")
    stats["calls"] += 1
    stats["calls_with_padding_mask"] += key_padding_mask is not None
    if segment_bounds is not None:  # the caller's bounds must be those of these segment ids
        assert torch.equal(segment_bounds, _document_bounds(segment_ids)), "segment_bounds do not match segment_ids"
        stats["calls_with_bounds"] += 1
    if segment_ids is not None:
        stats["calls_with_segments"] += 1
        per_row = max(len(torch.unique(row)) for row in segment_ids)
        stats["max_segments_in_a_row"] = max(stats["max_segments_in_a_row"], per_row)
    out = attention_ref(q, k, v, causal=causal, scale=softmax_scale, kpm=key_padding_mask, seg=segment_ids, dtype=torch.float32)
    # The kernel returns the query's layout; the adapter transposes (batch, heads, seq, dim) itself.
    return out.to(q.dtype)


def write_stats() -> None:
    path = os.environ.get("BIGTRAIN_REF_ATTN_STATS")
    if path and os.environ.get("RANK", "0") == "0":
        with open(path, "w") as f:
            json.dump(stats, f)


def counted_document_bounds(segment_ids):
    stats["bounds_computed"] += 1
    return _document_bounds(segment_ids)


_document_bounds = kernel_attention.document_bounds
kernel_attention.document_bounds = counted_document_bounds
integration._flash_attn = reference_flash_attn
atexit.register(write_stats)
sys.exit(main(sys.argv[1:]))
