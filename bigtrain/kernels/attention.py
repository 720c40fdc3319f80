"""Public entry point of the fused attention: argument checking and the autograd function.

The Triton kernels live in :mod:`bigtrain.kernels._triton_attention`, imported on first use
so that importing this module costs only torch.
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any, Optional

import torch

from .segments import document_bounds  # noqa: F401 - part of this module's API (bigtrain.kernels re-exports it)

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
            from . import _triton_attention as triton_attention
        except ImportError as e:  # no triton installed (e.g. macOS)
            raise RuntimeError(f"Triton is not available ({e}). " + _SDPA_HINT) from e
        _impl = triton_attention
    if _impl.INTERPRET and device.type != "cpu":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only.")
    if not _impl.INTERPRET and device.type != "cuda":
        raise RuntimeError(_SDPA_HINT + f" Got tensors on {device}.")
    return _impl


_DETERMINISTIC = False


def set_deterministic(flag: bool) -> None:
    """Default backward of :func:`flash_attn` when its ``deterministic`` argument is None:
    True = the atomic-free two-kernel backward (bitwise repeatable), False = the faster one that
    adds dQ with fp32 atomics. The trainer sets it from ``model.attn_deterministic``;
    ``torch.use_deterministic_algorithms(True)`` also selects the deterministic one."""
    global _DETERMINISTIC
    _DETERMINISTIC = bool(flag)


def _deterministic(choice: bool | None) -> bool:
    if choice is not None:
        return bool(choice)
    return _DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


def _seed_tensor(device: torch.device) -> torch.Tensor:
    # Drawn on the device's own generator: no host read (a CUDA draw never waits for the GPU) and
    # traceable by torch.compile. On CPU this is torch's default generator.
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def draw_dropout_seed(device: torch.device | str = "cpu") -> int:
    """The Philox seed :func:`flash_attn` uses for dropout, as an int (a debugging helper: it
    reads the value back). ``torch.manual_seed(s); draw_dropout_seed(q.device)`` returns the seed
    a call to :func:`flash_attn` on ``q`` right after ``torch.manual_seed(s)`` would use."""
    return int(_seed_tensor(torch.device(device)).item())


# The kernels as torch.library custom ops: torch.compile sees one opaque node per call (no graph
# break; the fake implementations give it output shapes and strides without running Triton) and
# autograd comes from the registered backward. Optional inputs are `Tensor?`.


def _bshd_like(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # The kernels' output layout: (batch, heads, seq, dim) over (batch, seq, heads, dim) memory.
    B, H, S, D = shape
    return torch.empty_strided(shape, (S * H * D, D, H * D, 1), dtype=dtype, device=device)


@torch.library.custom_op("bigtrain::flash_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: Optional[torch.Tensor],
            seg: Optional[torch.Tensor], segb: Optional[torch.Tensor], dmask: Optional[torch.Tensor],
            seed: Optional[torch.Tensor],
            causal: bool, sm_scale: float, dropout_p: float,
            deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels(q.device).forward(q, k, v, causal, sm_scale, kpm, seg, dmask, dropout_p, seed, segb=segb)


@_fwd_op.register_fake
def _(q, k, v, kpm, seg, segb, dmask, seed, causal, sm_scale, dropout_p, deterministic):
    B, HQ, SQ, D = q.shape
    return _bshd_like(tuple(q.shape), q.dtype, q.device), q.new_empty((B * HQ, SQ), dtype=torch.float32)


@torch.library.custom_op("bigtrain::flash_attn_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, kpm: Optional[torch.Tensor], seg: Optional[torch.Tensor], segb: Optional[torch.Tensor],
            dmask: Optional[torch.Tensor], seed: Optional[torch.Tensor], causal: bool, sm_scale: float,
            dropout_p: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels(q.device).backward(do, q, k, v, out, lse, causal, sm_scale, kpm, seg, dmask, dropout_p,
                                       seed, deterministic, segb=segb)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, kpm, seg, segb, dmask, seed, causal, sm_scale, dropout_p, deterministic):
    return (_bshd_like(tuple(q.shape), q.dtype, q.device), _bshd_like(tuple(k.shape), k.dtype, k.device),
            _bshd_like(tuple(v.shape), v.dtype, v.device))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, kpm, seg, segb, dmask, seed, causal, sm_scale, dropout_p, deterministic = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kpm, seg, segb, dmask, seed)
    ctx.args = (causal, sm_scale, dropout_p, deterministic)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, d_out: torch.Tensor, d_lse: Optional[torch.Tensor]) -> tuple:
    q, k, v, out, lse, kpm, seg, segb, dmask, seed = ctx.saved_tensors
    dq, dk, dv = _bwd_op(d_out, q, k, v, out, lse, kpm, seg, segb, dmask, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _as_uint8(mask: torch.Tensor) -> torch.Tensor:
    # bool -> uint8 is a free view (same element size); the kernels test `!= 0`.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def _bounds(seg: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """The documents' bounds for the kernels (forward and backward share them): the caller's (the
    trainer computes them once per batch for every layer), else computed for this call."""
    if given is None:
        return document_bounds(seg)
    B, S = seg.shape
    if given.shape != (B, 2, S):
        raise ValueError(f"segment_bounds must be (batch, 2, seq) = {(B, 2, S)} (document_bounds of the "
                         f"segment ids); got {tuple(given.shape)}")
    return given.to(device=seg.device, dtype=torch.int32).contiguous()


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                softmax_scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, dense_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, deterministic: bool | None = None,
                segment_bounds: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`flash_attn` plus ``dense_mask``, a boolean (batch | 1, heads_q | 1, seq_q, seq_k)
    mask (True = attend). Used by the transformers adapter for mask patterns that are neither
    padding nor documents (e.g. sliding windows); it costs a (seq_q x seq_k) read per head. ``segment_bounds``:
    :func:`document_bounds` of ``segment_ids``, when the caller already has it."""
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
    if not sm_scale > 0.0:  # the kernels take the row maximum of unscaled scores
        raise ValueError(f"softmax_scale must be > 0; got {softmax_scale}")

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

    seed = _seed_tensor(q.device) if dropout_p > 0.0 else None
    segb = _bounds(seg, segment_bounds) if seg is not None else None
    out, _ = _fwd_op(q, k, v, kpm, seg, segb, dmask, seed, bool(causal), sm_scale, float(dropout_p),
                     _deterministic(deterministic))
    return out


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
               softmax_scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None, dropout_p: float = 0.0,
               deterministic: bool | None = None) -> torch.Tensor:
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
        deterministic: backward variant. False: dQ accumulated with fp32 atomics (5 matmuls per
            tile pair, fastest; last bits of dQ may vary between runs). True: a separate dQ
            kernel, no atomics, bitwise repeatable (7 matmuls). None (default): True if
            :func:`set_deterministic` (``model.attn_deterministic``) or
            ``torch.use_deterministic_algorithms`` asked for it, else False.

    Returns:
        Tensor of q's shape and dtype. Query rows that may attend to no key return zeros and
        receive zero gradients.

    Runs on CUDA tensors; on CPU only under ``TRITON_INTERPRET=1`` (slow, for tests), otherwise
    raises a ``RuntimeError`` pointing to ``model.attn_implementation=sdpa``.
    """
    return _flash_attn(q, k, v, causal=causal, softmax_scale=softmax_scale,
                       key_padding_mask=key_padding_mask, segment_ids=segment_ids, dropout_p=dropout_p,
                       deterministic=deterministic)


def flash_attn_dropout_mask(batch: int, heads_q: int, seq_q: int, seq_k: int, dropout_p: float,
                            seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Debug helper: the boolean keep-mask (batch, heads_q, seq_q, seq_k) that :func:`flash_attn`
    applies for this ``seed`` (True = kept; kept probabilities are scaled by 1 / (1 - p))."""
    device = torch.device(device)
    seed_t = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    return _kernels(device).dropout_mask(batch, heads_q, seq_q, seq_k, float(dropout_p), seed_t, device)
