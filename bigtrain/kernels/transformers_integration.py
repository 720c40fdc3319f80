"""Run transformers models (GPT-2, BERT, RoBERTa, Llama, ...) through :func:`flash_attn`.

Registers the attention implementation ``"bigtrain_triton"`` with transformers'
``AttentionInterface`` and a matching ``AttentionMaskInterface`` entry. The name deliberately
does not contain "flash": transformers 5 treats such names as a request to download a kernel
from the hub. Without the mask entry transformers would skip mask creation for an unknown
implementation and the padding mask would be silently dropped.

Masks.  transformers calls our mask function with the 2-D padding mask and a mask *pattern*
function. For the two plain patterns (causal, bidirectional) with aligned offsets we return the
(batch, seq_k) padding mask itself (or None) and the kernel applies it per key tile, with the
causal flag taken from the layer (``is_causal`` kwarg, else ``module.is_causal``), as
transformers' own FlashAttention integration does. Any other pattern (sliding window, packed
sequences detected from position_ids, custom and/or masks, static caches) is materialised as a
boolean (batch, 1, seq_q, seq_k) mask which the kernel reads tile by tile: always correct, but it
costs O(seq^2) memory, so the trainer should use segment ids (below) for packed documents.

Packed documents (segment ids).  Pass ``segment_ids`` (batch, seq) integer document ids as a
keyword argument of the model's forward::

    model(input_ids=ids, attention_mask=mask, labels=labels, segment_ids=doc_ids)

transformers 5 forwards unknown keyword arguments of the top-level forward through the decoder
/ encoder layers to the attention function (checked for GPT-2, BERT, RoBERTa and Llama), where
they reach :func:`bigtrain_triton_attention`. This also survives gradient checkpointing
(kwargs are re-passed on recomputation). For a model that does not forward kwargs,
:func:`segment_ids_context` sets them for every attention call inside the ``with`` block
(beware: with activation checkpointing the recomputation runs outside the block, so prefer the
keyword). Pass an ``attention_mask`` (all ones if there is no padding) together with per-document
``position_ids``: transformers only infers packing from ``position_ids`` when no attention mask
is given, and then builds the dense O(seq^2) mask described above.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

from .attention import _flash_attn

ATTN_IMPLEMENTATION = "bigtrain_triton"

_segment_ids_var: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "bigtrain_segment_ids", default=None)


@contextlib.contextmanager
def segment_ids_context(segment_ids: torch.Tensor | None) -> Iterator[None]:
    """Within the block, every ``bigtrain_triton`` self-attention call masks across documents.

    ``segment_ids``: (batch, seq) integer document id of each token. A ``segment_ids`` keyword
    argument given to the model's forward takes precedence.
    """
    token = _segment_ids_var.set(segment_ids)
    try:
        yield
    finally:
        _segment_ids_var.reset(token)


def _bool_dense(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    # A float mask prepared by the caller: 0 = attend, dtype-min (or -inf) = masked. Anything
    # else is an additive bias, which this kernel does not implement.
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(torch.all(masked | (mask == 0))):
        raise NotImplementedError("bigtrain_triton supports boolean masks and 0/-inf float masks, "
                                  "not additive attention biases; use attn_implementation='sdpa'")
    return ~masked


def bigtrain_triton_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    segment_ids: torch.Tensor | None = None,
    padding_free: bool = False,
    segment_bounds: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (batch, heads, seq, dim) inputs, returns
    ((batch, seq_q, heads_q, dim) output, None).

    ``padding_free=True`` (a forward keyword, like ``segment_ids``): the caller promises the
    batch has no padding the segment ids do not already separate (the trainer's packed rows),
    so a 2-D attention mask, passed only to keep transformers from inferring packing from
    position ids, is not applied: the kernel then reads no padding mask at all, and its tiles
    inside one document run unmasked. ``segment_bounds`` (a forward keyword too): the batch's
    :func:`~bigtrain.kernels.attention.document_bounds`, computed once for all layers."""
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"bigtrain_triton does not support `{unsupported}`; "
                                      "use attn_implementation='eager' or 'sdpa' for this model")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, k_len = query.shape[2], key.shape[2]
    causal = bool(causal) and q_len > 1  # one query token (decoding) sees the whole cache

    if segment_ids is None:
        segment_ids = _segment_ids_var.get()
    kpm = dense = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            kpm = None if padding_free and segment_ids is not None else attention_mask.bool()
        elif attention_mask.dim() == 4:
            dense = _bool_dense(attention_mask[:, :, :, :k_len])
            causal = False  # the dense mask already holds the pattern
        else:
            raise ValueError(f"unexpected attention_mask shape {tuple(attention_mask.shape)}")

    if segment_ids is not None and q_len != k_len:
        raise ValueError(
            f"segment_ids apply to self-attention over the whole sequence, but this call has "
            f"seq_q={q_len}, seq_k={k_len} (cross-attention or a KV cache); do not pass segment_ids here")

    out = _flash_attn(query, key, value, causal=causal, softmax_scale=scaling, key_padding_mask=kpm,
                      segment_ids=segment_ids, dense_mask=dense, dropout_p=float(dropout),
                      segment_bounds=segment_bounds if segment_ids is not None else None)
    # The kernel allocates its output in (batch, seq, heads, dim) memory order: this is free.
    return out.transpose(1, 2).contiguous(), None


def bigtrain_triton_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers mask function: the (batch, kv_length) padding mask for plain causal or
    bidirectional patterns (None without padding), a dense boolean 4-D mask otherwise."""
    from transformers import masking_utils as mu

    plain = mask_function is mu.bidirectional_mask_function or (
        mask_function is mu.causal_mask_function
        and isinstance(q_offset, int) and isinstance(kv_offset, int)
        and q_offset + q_length == kv_offset + kv_length  # bottom-right alignment holds
    )
    if plain and local_size is None:
        if attention_mask is None:
            return None
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        return padding[:, kv_offset:kv_offset + kv_length].bool()
    return mu.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
        use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))


_registered = False


def register_with_transformers() -> bool:
    """Registers ``bigtrain_triton`` with transformers (idempotent). Returns False when
    transformers is not installed."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, bigtrain_triton_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, bigtrain_triton_mask)
    _registered = True
    return True
