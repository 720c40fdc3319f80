"""Public entry point of the fused attention: argument checking and the autograd function.

The Triton kernels live in :mod:`bigtrain.kernels._triton_attention`, imported on first use
so that importing this module costs only torch.
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any

import torch

_impl: ModuleType | None = None

_SDPA_HINT = (
    "bigtrain.kernels.flash_attn needs CUDA tensors (a GPU with Triton). Without a GPU use the "
    "SDPA path instead: model.attn_implementation=sdpa. (Tests run the kernel on CPU under the "
    "Triton interpreter by setting TRITON_INTERPRET=1 before the first call.)"
)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels(device: torch.device) -> ModuleType:
    """Imports the Triton module on first use and checks the device fits the mode it runs in."""
    global _impl
    if _impl is None:
        if device.type != "cuda" and not _interpret_requested():
            raise RuntimeError(_SDPA_HINT + f" Got tensors on {device}.")
        try:
            from . import _triton_attention
        except ImportError as e:  # no triton installed (e.g. macOS)
            raise RuntimeError(f"Triton is not available ({e}). " + _SDPA_HINT) from e
        _impl = _triton_attention
    if _impl.INTERPRET and device.type != "cpu":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only.")
    if not _impl.INTERPRET and device.type != "cuda":
        raise RuntimeError(_SDPA_HINT + f" Got tensors on {device}.")
    return _impl


def draw_dropout_seed() -> int:
    """The Philox seed :func:`flash_attn` uses for dropout, drawn from torch's default CPU generator.

    Drawing it on the CPU generator keeps ``torch.manual_seed`` reproducibility and avoids a GPU
    sync. ``torch.manual_seed(s); draw_dropout_seed()`` returns the seed a call to
    :func:`flash_attn` right after ``torch.manual_seed(s)`` would use.
    """
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class _FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                sm_scale: float, kpm: torch.Tensor | None, seg: torch.Tensor | None,
                dmask: torch.Tensor | None, dropout_p: float, seed: int) -> torch.Tensor:
        impl = _kernels(q.device)
        out, lse = impl.forward(q, k, v, causal, sm_scale, kpm, seg, dmask, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, kpm, seg, dmask)
        ctx.causal, ctx.sm_scale, ctx.dropout_p, ctx.seed = causal, sm_scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, kpm, seg, dmask = ctx.saved_tensors
        impl = _kernels(q.device)
        dq, dk, dv = impl.backward(do, q, k, v, out, lse, ctx.causal, ctx.sm_scale, kpm, seg, dmask,
                                   ctx.dropout_p, ctx.seed)
        return dq, dk, dv, None, None, None, None, None, None, None


def _as_uint8(mask: torch.Tensor) -> torch.Tensor:
    # bool -> uint8 is a free view (same element size); the kernels test `!= 0`.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                softmax_scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, dense_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`flash_attn` plus ``dense_mask``, a boolean (batch | 1, heads_q | 1, seq_q, seq_k)
    mask (True = attend). Used by the transformers adapter for mask patterns that are neither
    padding nor documents (e.g. sliding windows); it costs a (seq_q x seq_k) read per head."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, HQ, SQ, D = q.shape
    Bk, HK, SK, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if HK == 0 or HQ % HK != 0:
        raise ValueError(f"heads_q ({HQ}) must be a multiple of heads_kv ({HK}) (GQA/MQA)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one dtype among float16/bfloat16/float32; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    sm_scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)

    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, SK):
            raise ValueError(f"key_padding_mask must be (batch, seq_k) = {(B, SK)}; got "
                             f"{tuple(key_padding_mask.shape)}")
        kpm = _as_uint8(key_padding_mask.to(q.device)).contiguous()
    seg = None
    if segment_ids is not None:
        if SQ != SK:
            raise ValueError(f"segment_ids is for self-attention (seq_q == seq_k); got seq_q={SQ}, seq_k={SK}")
        if segment_ids.shape != (B, SQ):
            raise ValueError(f"segment_ids must be (batch, seq) = {(B, SQ)}; got {tuple(segment_ids.shape)}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise TypeError(f"segment_ids must be an integer tensor; got {segment_ids.dtype}")
        seg = segment_ids.to(device=q.device, dtype=torch.int32).contiguous()
    dmask = None
    if dense_mask is not None:
        if dense_mask.dim() != 4 or dense_mask.shape[-2:] != (SQ, SK):
            raise ValueError(f"dense_mask must be (batch, heads, {SQ}, {SK}); got {tuple(dense_mask.shape)}")
        dmask = _as_uint8(dense_mask.to(q.device)).expand(B, HQ, SQ, SK)  # broadcast via 0 strides

    seed = draw_dropout_seed() if dropout_p > 0.0 else 0
    return _FlashAttnFunction.apply(q, k, v, bool(causal), sm_scale, kpm, seg, dmask, float(dropout_p), seed)


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
               softmax_scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Fused scaled-dot-product attention (FlashAttention-2 algorithm, Triton kernels).

    Args:
        q: (batch, heads_q, seq_q, head_dim).
        k, v: (batch, heads_kv, seq_k, head_dim), heads_q % heads_kv == 0 (GQA / MQA).
        causal: causal mask aligned bottom-right: query i sees key j iff j <= i + seq_k - seq_q.
        softmax_scale: defaults to 1 / sqrt(head_dim).
        key_padding_mask: (batch, seq_k) bool, True = attend.
        segment_ids: (batch, seq) integer document ids (self-attention only): a token attends
            only to tokens with the same id. Combines with ``causal`` and the padding mask.
        dropout_p: attention dropout probability. The mask is regenerated in the backward from a
            Philox seed (see :func:`draw_dropout_seed`), never stored.

    Returns:
        Tensor of q's shape and dtype. Query rows that may attend to no key return zeros and
        receive zero gradients.

    Runs on CUDA tensors; on CPU only under ``TRITON_INTERPRET=1`` (slow, for tests), otherwise
    raises a ``RuntimeError`` pointing to ``model.attn_implementation=sdpa``.
    """
    return _flash_attn(q, k, v, causal=causal, softmax_scale=softmax_scale,
                       key_padding_mask=key_padding_mask, segment_ids=segment_ids, dropout_p=dropout_p)


def flash_attn_dropout_mask(batch: int, heads_q: int, seq_q: int, seq_k: int, dropout_p: float,
                            seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Debug helper: the boolean keep-mask (batch, heads_q, seq_q, seq_k) that :func:`flash_attn`
    applies for this ``seed`` (True = kept; kept probabilities are scaled by 1 / (1 - p))."""
    device = torch.device(device)
    return _kernels(device).dropout_mask(batch, heads_q, seq_q, seq_k, float(dropout_p), int(seed), device)
