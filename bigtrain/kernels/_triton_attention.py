"""Triton kernels of bigtrain's FlashAttention-2-style attention.

Imported lazily by :mod:`bigtrain.kernels.attention` on the first call, so that
``import bigtrain.kernels`` stays cheap and whether the kernels run compiled (CUDA) or
under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) is decided then.

Notation (one batch element ``b``, one query head ``h``; K/V come from kv head ``h // GROUP``)::

    S = scale * Q K^T                   (seq_q, seq_k), entries that may not attend set to -inf
    P = softmax(S, dim=-1)              rows of P sum to 1
    O = (P * Z) V                       Z = dropout keep-mask / (1 - p); Z = 1 without dropout

Forward (online softmax, Milakov & Gimelshein 2018; Dao 2023).  A tile of BLOCK_M query rows
stays in registers while tiles of BLOCK_N keys/values stream by.  For each row we keep the
running maximum ``m``, the running normaliser ``l = sum_j exp(s_j - m)`` and the unnormalised
output ``acc = sum_j exp(s_j - m) z_j v_j``.  When a new tile raises the maximum to ``m'`` the
old sums are rescaled by ``alpha = exp(m - m')``; at the end ``O = acc / l``.  Exponentials are
taken in base 2 (``exp(x) = exp2(x * log2(e))``, one MUFU op).  The raw products ``QK^T`` are
kept as they come out of the tensor cores and the scale ``c = scale * log2(e)`` is applied inside
the exponent, ``p = exp2(c * qk - m)``: one fused multiply-add per element (FA-2/tutorial 06),
with ``m`` tracked in the scaled units.  The log-sum-exp ``lse = m + log2(l)`` (base 2) is saved:
the backward rebuilds P as ``exp2(c * qk - lse)`` without a second pass over the keys.

Backward (FlashAttention-2, Algorithm 2), with dO the incoming gradient::

    dV    = (P * Z)^T dO
    dP    = (dO V^T) * Z
    dS    = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
    dQ    = scale * dS K,      dK = scale * dS^T Q

``delta`` is computed first by a small preprocess kernel (the identity holds with dropout too:
``sum_j P_ij Z_ij (dO V^T)_ij = dO_i . O_i``).  One program per key tile (looping over the query
tiles that can see it and, for GQA, over all query heads sharing that kv head) accumulates its
dK/dV rows.  Two ways to get dQ:

* default (``deterministic=False``): the same program also forms ``dS K`` for each query tile it
  visits and adds it into an fp32 dQ buffer with atomics: 5 matmuls per tile pair (QK^T, dO V^T,
  P^T dO, dS^T Q, dS K), FlashAttention-2's count.  The order of the fp32 additions depends on
  scheduling, so dQ may differ in its last bits from run to run.
* ``deterministic=True`` (``model.attn_deterministic``): a second kernel, one program per query
  tile, recomputes P and dP for its rows and owns its dQ rows: no atomics, bitwise repeatable
  gradients, at the price of recomputing QK^T and dO V^T (7 matmuls per tile pair, ~40% more
  backward work).

Documents (segment ids) and tile skipping.  With packed documents a query sees only the keys of
its own document.  The host turns the ids into per-token bounds ``[first, end)`` of the token's
document (:func:`segment_bounds`; only when every id forms one contiguous run in its row, else
``first = -1`` and the row falls back to masking every tile).  A query block ``[m0, m1]`` can see
keys only in ``[first[m0], end[m1])`` (bounds are non-decreasing along a row), so the key loop
runs over those tiles only: with 8 equal documents it visits about 1/8 of the causal tiles.  The
same bounds give the query range of a key block in the dK/dV kernel.  Inside the range, tiles
that every row of the block may fully see (``[first[m1], end[m0])`` intersected with the causal
lower triangle) run without any mask; only the boundary tiles (a document edge, the causal
diagonal, the end of the keys) build the position/document mask.

Masking.  A query row with no key it may attend to keeps ``m = -inf`` and ``l = 0``; it outputs
zeros and stores ``lse = +inf``, which makes its rebuilt P (hence every gradient it feeds) zero.
Out-of-range query rows load Q = dO = 0 and ``lse = +inf`` and therefore contribute nothing in
the backward; out-of-range key rows load K = V = 0 and are masked in the forward; in the
backward their dK/dV rows are never stored and their (zero) K rows add nothing to dQ.

Dropout.  The keep-mask is never stored: element (i, j) of head (b, h) keeps iff
``tl.rand(seed_bh, i * seq_k + j) >= p`` (Philox, counter-based), with a 64-bit counter (the
high word feeds Philox's second counter word, so it does not wrap past ~46k x 46k) and
``seed_bh = seed + (b * heads_q + h) * 2**31`` so every (batch, head) has its own Philox key.
The seed is read from a one-element device tensor: drawing it never waits on the device and is
traceable by ``torch.compile``.  The backward regenerates the same numbers from the same seed.

Sizes.  The grid is one-dimensional (query or key tiles x batch x heads), so batch x heads is not
limited by CUDA's 65,535 on the second grid dimension.  (batch, head) bases are 64-bit; offsets
inside a head are 32-bit unless some tensor's element offsets reach 2**31 (``I64``, decided on
the host), which keeps the common case's address arithmetic cheap.

Loads.  ``USE_DESC`` loads the streamed K/V (forward, dQ) and Q/dO (dK/dV) tiles through tensor
descriptors (``tl.make_tensor_descriptor``: TMA on Hopper, out-of-bounds rows and columns read
as zeros) instead of masked pointer loads.  Chosen on the host when Triton has them, the GPU is
sm_90+, and every tensor is 16-byte aligned with a unit last stride.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from .segments import document_bounds


def _interpreting() -> bool:
    try:  # Triton >= 3.4 reads TRITON_INTERPRET through its knobs
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Decided once, when this module is first imported (the jit decorators below read it too).
INTERPRET: bool = _interpreting()
HAS_DESCRIPTORS: bool = hasattr(tl, "make_tensor_descriptor")

LOG2E = 1.4426950408889634
I32_LIMIT = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _idx(i, I64: tl.constexpr):
    # Row indices inside one (batch, head): widened before they meet a stride when some offset
    # can reach 2**31 (see "Sizes" above).
    if I64:
        return i.to(tl.int64)
    else:
        return i


@triton.jit
def _philox_seed(seed, off_bh):
    # Disjoint bit ranges (seed < 2**31): a distinct Philox key per (call, batch, head).
    return (off_bh.to(tl.int64) << 31) + seed


@triton.jit
def _dropout_keep(seed_bh, rows, cols, SEQ_K, dropout_p):
    # rows/cols broadcast to the tile; one uniform draw per (query, key) element. The counter is
    # 64-bit: tl.rand feeds its high word to Philox's second counter word.
    r = tl.rand(seed_bh, rows.to(tl.int64) * SEQ_K + cols)
    return r >= dropout_p


@triton.jit
def _desc(base, N, stride_n, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
          USE_DESC: tl.constexpr):
    # A (N, HEAD_DIM) tensor descriptor over one (batch, head); the plain base pointer otherwise.
    if USE_DESC:
        return tl.make_tensor_descriptor(base, shape=[N, HEAD_DIM], strides=[stride_n, 1],
                                         block_shape=[BLOCK, BLOCK_D])
    else:
        return base


@triton.jit
def _load_rows(base, desc, start, offs, offs_d, stride_n, stride_d, N,
               HEAD_DIM: tl.constexpr, USE_DESC: tl.constexpr, I64: tl.constexpr):
    # Rows [start, start + BLOCK) of a (N, HEAD_DIM) matrix; rows/columns outside read as 0.
    if USE_DESC:
        return desc.load([start, 0])
    else:
        return tl.load(base + _idx(offs, I64)[:, None] * stride_n + offs_d[None, :] * stride_d,
                       mask=(offs[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _tile_mask(
    rows, cols, SEQ_Q, SEQ_K, seg_q, seg_k, kpm_base, dm_base, stride_dmm, stride_dmn,
    MASK_CAUSAL: tl.constexpr, MASK_K: tl.constexpr, MASK_SEG: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_DMASK: tl.constexpr, I64: tl.constexpr,
):
    # rows (query positions) and cols (key positions) are 2D index tensors that broadcast to
    # the tile, (M, 1) x (1, N) in the forward/dQ kernels, (1, M) x (N, 1) in the dK/dV kernel;
    # seg_q / seg_k are the loaded document ids, shaped like rows / cols.
    # Returns True where query `row` may attend to key `col`.
    valid = (rows >= 0) & (cols >= 0)
    if MASK_CAUSAL:
        # Bottom-right aligned (FlashAttention >= 2.1): the last query sees the last key.
        valid = valid & (cols <= rows + (SEQ_K - SEQ_Q))
    if MASK_K:
        valid = valid & (cols < SEQ_K)
    if MASK_SEG:
        valid = valid & (seg_q == seg_k)
    if HAS_KPM:
        keep = tl.load(kpm_base + cols, mask=cols < SEQ_K, other=0)
        valid = valid & (keep != 0)
    if HAS_DMASK:
        dm = tl.load(dm_base + _idx(rows, I64) * stride_dmm + _idx(cols, I64) * stride_dmn,
                     mask=(rows < SEQ_Q) & (cols < SEQ_K), other=0)
        valid = valid & (dm != 0)
    return valid


@triton.jit
def _align(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    # Tile-aligns a visible range [lo, hi) and its mask-free part [full_lo, full_hi): the loops
    # then run [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked.
    lo = (lo // BLOCK) * BLOCK
    hi = tl.maximum(hi, lo)
    full_lo = tl.maximum(tl.cdiv(full_lo, BLOCK) * BLOCK, lo)
    full_hi = tl.minimum((full_hi // BLOCK) * BLOCK, hi)
    none = full_hi <= full_lo
    full_lo = tl.where(none, hi, full_lo)
    full_hi = tl.where(none, hi, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_range(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, segb_base, SEQ_Q, SEQ_K,
               CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr):
    # Keys a query block [start_m, last] may see, tile-aligned (see the module docstring).
    last = tl.minimum(start_m + BLOCK_M, SEQ_Q) - 1
    lo = start_m * 0
    hi = lo + SEQ_K
    full_lo = lo
    full_hi = hi
    if CAUSAL:
        diff = SEQ_K - SEQ_Q
        hi = tl.minimum(hi, last + diff + 1)          # the block's last row sees keys <= last + diff
        full_hi = tl.minimum(full_hi, start_m + diff + 1)  # its first row sees keys <= start_m + diff
    if HAS_SEG:  # bounds: row 0 = first key of the token's document (-1: ids are not runs), row 1 = end
        first_m0 = tl.load(segb_base + start_m)
        first_m1 = tl.load(segb_base + last)
        end_m0 = tl.load(segb_base + SEQ_Q + start_m)
        end_m1 = tl.load(segb_base + SEQ_Q + last)
        lo = tl.maximum(lo, first_m0)
        hi = tl.minimum(hi, end_m1)
        full_lo = tl.where(first_m1 < 0, SEQ_K, tl.maximum(full_lo, first_m1))
        full_hi = tl.minimum(full_hi, end_m0)
    return _align(lo, full_lo, full_hi, hi, BLOCK_N)


@triton.jit
def _query_range(start_n, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, segb_base, SEQ_Q, SEQ_K,
                 CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr):
    # Query rows that may see some key of the block [start_n, last], tile-aligned; the mirror of
    # _key_range (segment ids imply self-attention, SEQ_Q == SEQ_K).
    last = tl.minimum(start_n + BLOCK_N, SEQ_K) - 1
    lo = start_n * 0
    hi = lo + SEQ_Q
    full_lo = lo
    full_hi = hi
    if CAUSAL:
        diff = SEQ_K - SEQ_Q
        lo = tl.maximum(lo, start_n - diff)
        full_lo = tl.maximum(full_lo, start_n + BLOCK_N - 1 - diff)
    if HAS_SEG:
        first_n0 = tl.load(segb_base + start_n)
        first_n1 = tl.load(segb_base + last)
        end_n0 = tl.load(segb_base + SEQ_K + start_n)
        end_n1 = tl.load(segb_base + SEQ_K + last)
        lo = tl.maximum(lo, first_n0)
        hi = tl.minimum(hi, end_n1)
        full_lo = tl.where(first_n1 < 0, SEQ_Q, tl.maximum(full_lo, first_n1))
        full_hi = tl.minimum(full_hi, end_n0)
    return _align(lo, full_lo, full_hi, hi, BLOCK_M)


@triton.jit
def _tile_of(pid, n_tiles, REVERSE: tl.constexpr):
    # One-dimensional grid: program -> (tile, batch*head). Causal kernels take the longest rows
    # first (the last query tiles), which balances the tail of the launch.
    off_bh = pid // n_tiles
    t = pid % n_tiles
    if REVERSE:
        t = n_tiles - 1 - t
    return t, off_bh


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, q, seg_q, k_base, v_base, k_desc, v_desc, stride_kn, stride_kd, stride_vn, stride_vd,
    lo, hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
    qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr, I64: tl.constexpr,
):
    # EDGE=True: boundary tiles (causal diagonal, document edges, end of the keys), which build
    # the position masks; EDGE=False: tiles every row of the block may fully see.
    NEED_MASK: tl.constexpr = EDGE or HAS_KPM or HAS_DMASK
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, k_desc, start_n, offs_n, offs_d, stride_kn, stride_kd, SEQ_K, HEAD_DIM, USE_DESC, I64)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if NEED_MASK:
            seg_k = offs_n[None, :]
            if EDGE and HAS_SEG:
                seg_k = tl.load(seg_base + offs_n, mask=offs_n < SEQ_K, other=-2)[None, :]
            valid = _tile_mask(offs_m[:, None], offs_n[None, :], SEQ_Q, SEQ_K, seg_q, seg_k, kpm_base,
                               dm_base, stride_dmm, stride_dmn, EDGE and CAUSAL, EDGE, EDGE and HAS_SEG,
                               HAS_KPM, HAS_DMASK, I64)
            qk = tl.where(valid, qk, float("-inf"))
        # Online softmax in log2 units: m tracks max(c * qk). A row that has seen only masked keys
        # keeps m = -inf, and subtracting 0 instead of -inf keeps exp2 at 0 rather than NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])  # one FMA per element
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)  # normaliser uses P before dropout
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_bh, offs_m[:, None], offs_n[None, :], SEQ_K, dropout_p)
            p = tl.where(keep, p, 0.0)  # the 1/(1-p) factor is applied once at the end
        v = _load_rows(v_base, v_desc, start_n, offs_n, offs_d, stride_vn, stride_vd, SEQ_K, HEAD_DIM, USE_DESC, I64)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, SEG, SEGB, DMASK, SEED, COUNT,  # noqa: E741 - O is the attention output, named as in Q, K, V, O (FlashAttention notation)
    sm_scale, dropout_p,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_kpmb, stride_segb, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    H_Q, GROUP, SEQ_Q, SEQ_K, TUNE_SEQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr, I64: tl.constexpr,
    COUNT_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n_tiles = tl.cdiv(SEQ_Q, BLOCK_M)
    tile, off_bh = _tile_of(tl.program_id(0), n_tiles, CAUSAL)
    start_m = tile * BLOCK_M
    off_b = off_bh // H_Q
    off_h = off_bh % H_Q
    off_hk = off_h // GROUP  # GQA/MQA: GROUP query heads share one kv head

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    kpm_base = KPM + off_b.to(tl.int64) * stride_kpmb
    seg_base = SEG + off_b.to(tl.int64) * stride_segb
    dm_base = DMASK + off_b.to(tl.int64) * stride_dmb + off_h.to(tl.int64) * stride_dmh
    k_desc = _desc(k_base, SEQ_K, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_DESC)
    v_desc = _desc(v_base, SEQ_K, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_DESC)
    seed_bh = 0
    if HAS_DROPOUT:
        seed_bh = _philox_seed(tl.load(SEED), off_bh)

    q_mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + _idx(offs_m, I64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    seg_q = offs_m[:, None]
    if HAS_SEG:  # the block's document ids, loaded once (not per key tile)
        seg_q = tl.load(seg_base + offs_m, mask=offs_m < SEQ_Q, other=-1)[:, None]
    qk_scale = sm_scale * 1.4426950408889634  # fold log2(e) in: the kernel uses exp2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_range(start_m, BLOCK_M, BLOCK_N, SEGB + off_b.to(tl.int64) * 2 * SEQ_Q,
                                          SEQ_Q, SEQ_K, CAUSAL, HAS_SEG)
    if COUNT_TILES:  # test hook: how many key tiles this program visits
        tl.store(COUNT + off_bh.to(tl.int64) * n_tiles + tile, tl.cdiv(hi - lo, BLOCK_N))
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q, seg_q, k_base, v_base, k_desc, v_desc, stride_kn, stride_kd, stride_vn, stride_vd,
        lo, full_lo, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64)
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q, seg_q, k_base, v_base, k_desc, v_desc, stride_kn, stride_kd, stride_vn, stride_vd,
        full_lo, full_hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64)
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q, seg_q, k_base, v_base, k_desc, v_desc, stride_kn, stride_kd, stride_vn, stride_vd,
        full_hi, hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64)

    # Rows that attended to nothing: l = 0 -> output 0 and lse = +inf (P = 0 in the backward).
    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    out = acc / l_div[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_div))
    tl.store(LSE + off_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + _idx(offs_m, I64)[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,  # noqa: E741 - O is the attention output, named as in Q, K, V, O (FlashAttention notation)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H_Q, SEQ_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, I64: tl.constexpr,
):
    # delta_i = rowsum(dO * O)_i = sum_j P_ij dP_ij: the softmax-Jacobian term of dS.
    tile, off_bh = _tile_of(tl.program_id(0), tl.cdiv(SEQ_Q, BLOCK_M), False)
    off_b = off_bh // H_Q
    off_h = off_bh % H_Q
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = _idx(offs_m, I64)[:, None]
    mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + rows * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + rows * stride_dom + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * SEQ_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < SEQ_Q)


@triton.jit
def _bwd_kv_tiles(
    dk, dv, k, v, seg_k, q_base, do_base, dq_base, q_desc, do_desc, lse_base, delta_base,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd,
    lo, hi, offs_n, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
    qk_scale, sm_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, EDGE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr, I64: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so that dK and dV accumulate as plain dots.
    NEED_MASK: tl.constexpr = EDGE or HAS_KPM or HAS_DMASK
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, q_desc, start_m, offs_m, offs_d, stride_qm, stride_qd, SEQ_Q, HEAD_DIM, USE_DESC, I64)
        do = _load_rows(do_base, do_desc, start_m, offs_m, offs_d, stride_dom, stride_dod, SEQ_Q, HEAD_DIM,
                        USE_DESC, I64)
        # lse = +inf outside the queries (and for empty rows) turns P into exact zeros there.
        lse = tl.load(lse_base + offs_m, mask=offs_m < SEQ_Q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < SEQ_Q, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if NEED_MASK:
            seg_q = offs_m[None, :]
            if EDGE and HAS_SEG:
                seg_q = tl.load(seg_base + offs_m, mask=offs_m < SEQ_Q, other=-1)[None, :]
            # Keys past SEQ_K need no mask: their rows of dK/dV are never stored and their
            # (zero) K rows add nothing to dQ.
            valid = _tile_mask(offs_m[None, :], offs_n[:, None], SEQ_Q, SEQ_K, seg_q, seg_k, kpm_base,
                               dm_base, stride_dmm, stride_dmn, EDGE and CAUSAL, False, EDGE and HAS_SEG,
                               HAS_KPM, HAS_DMASK, I64)
            pT = tl.where(valid, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC).to(tl.float32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_bh, offs_m[None, :], offs_n[:, None], SEQ_K, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            pzT = tl.where(keep, pT * inv_keep, 0.0)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            pzT = pT
        dv += tl.dot(pzT.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk += tl.dot(dsT, q, input_precision=DOT_PREC)
        if ATOMIC_DQ:  # the fifth matmul: this key tile's share of dQ = scale * dS K
            dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PREC) * sm_scale
            tl.atomic_add(dq_base + _idx(offs_m, I64)[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq,
                          mask=(offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA, KPM, SEG, SEGB, DMASK, SEED,
    sm_scale, dropout_p,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_kpmb, stride_segb, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    H_Q, H_KV, GROUP, SEQ_Q, SEQ_K, TUNE_SEQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr, I64: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key tile, batch, kv head); it owns its dK/dV rows, so no atomics there.
    tile, off_bhk = _tile_of(tl.program_id(0), tl.cdiv(SEQ_K, BLOCK_N), False)
    start_n = tile * BLOCK_N
    off_b = off_bhk // H_KV
    off_hk = off_bhk % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_n = _idx(offs_n, I64)[:, None]
    kv_mask = (offs_n[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
                + rows_n * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
                + rows_n * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    seg_base = SEG + off_b.to(tl.int64) * stride_segb
    seg_k = offs_n[:, None]
    if HAS_SEG:
        seg_k = tl.load(seg_base + offs_n, mask=offs_n < SEQ_K, other=-2)[:, None]
    kpm_base = KPM + off_b.to(tl.int64) * stride_kpmb
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    lo, full_lo, full_hi, hi = _query_range(start_n, BLOCK_N, BLOCK_M, SEGB + off_b.to(tl.int64) * 2 * SEQ_K,
                                            SEQ_Q, SEQ_K, CAUSAL, HAS_SEG)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_b * H_Q + off_h
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        dq_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
        q_desc = _desc(q_base, SEQ_Q, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
        do_desc = _desc(do_base, SEQ_Q, stride_dom, HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
        lse_base = LSE + off_bh.to(tl.int64) * SEQ_Q
        delta_base = DELTA + off_bh.to(tl.int64) * SEQ_Q
        dm_base = DMASK + off_b.to(tl.int64) * stride_dmb + off_h.to(tl.int64) * stride_dmh
        seed_bh = _philox_seed(seed, off_bh)
        dk, dv = _bwd_kv_tiles(
            dk, dv, k, v, seg_k, q_base, do_base, dq_base, q_desc, do_desc, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd,
            lo, full_lo, offs_n, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
            qk_scale, sm_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
            HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64,
            ATOMIC_DQ)
        dk, dv = _bwd_kv_tiles(
            dk, dv, k, v, seg_k, q_base, do_base, dq_base, q_desc, do_desc, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd,
            full_lo, full_hi, offs_n, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
            qk_scale, sm_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
            HEAD_DIM, BLOCK_M, False, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64,
            ATOMIC_DQ)
        dk, dv = _bwd_kv_tiles(
            dk, dv, k, v, seg_k, q_base, do_base, dq_base, q_desc, do_desc, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_dqm, stride_dqd,
            full_hi, hi, offs_n, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
            qk_scale, sm_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
            HEAD_DIM, BLOCK_M, True, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64,
            ATOMIC_DQ)

    dk = dk * sm_scale  # dK = scale * dS^T Q
    tl.store(DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh
             + rows_n * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh
             + rows_n * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_q_tiles(
    dq, q, do, lse, delta, seg_q, k_base, v_base, k_desc, v_desc, stride_kn, stride_kd, stride_vn, stride_vd,
    lo, hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
    qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr, I64: tl.constexpr,
):
    NEED_MASK: tl.constexpr = EDGE or HAS_KPM or HAS_DMASK
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, k_desc, start_n, offs_n, offs_d, stride_kn, stride_kd, SEQ_K, HEAD_DIM, USE_DESC, I64)
        v = _load_rows(v_base, v_desc, start_n, offs_n, offs_d, stride_vn, stride_vd, SEQ_K, HEAD_DIM, USE_DESC, I64)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if NEED_MASK:
            seg_k = offs_n[None, :]
            if EDGE and HAS_SEG:
                seg_k = tl.load(seg_base + offs_n, mask=offs_n < SEQ_K, other=-2)[None, :]
            # Keys past SEQ_K need no mask here: their K rows are 0, so they add 0 to dQ.
            valid = _tile_mask(offs_m[:, None], offs_n[None, :], SEQ_Q, SEQ_K, seg_q, seg_k, kpm_base,
                               dm_base, stride_dmm, stride_dmn, EDGE and CAUSAL, False, EDGE and HAS_SEG,
                               HAS_KPM, HAS_DMASK, I64)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC).to(tl.float32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_bh, offs_m[:, None], offs_n[None, :], SEQ_K, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KPM, SEG, SEGB, DMASK, SEED,
    sm_scale, dropout_p,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_kpmb, stride_segb, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    H_Q, GROUP, SEQ_Q, SEQ_K, TUNE_SEQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr, I64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Deterministic variant only: one program per (query tile, batch, query head) owns its dQ rows.
    n_tiles = tl.cdiv(SEQ_Q, BLOCK_M)
    tile, off_bh = _tile_of(tl.program_id(0), n_tiles, CAUSAL)
    start_m = tile * BLOCK_M
    off_b = off_bh // H_Q
    off_h = off_bh % H_Q
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = _idx(offs_m, I64)[:, None]
    q_mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + rows * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + rows * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    k_desc = _desc(k_base, SEQ_K, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_DESC)
    v_desc = _desc(v_base, SEQ_K, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_DESC)
    kpm_base = KPM + off_b.to(tl.int64) * stride_kpmb
    seg_base = SEG + off_b.to(tl.int64) * stride_segb
    dm_base = DMASK + off_b.to(tl.int64) * stride_dmb + off_h.to(tl.int64) * stride_dmh
    seg_q = offs_m[:, None]
    if HAS_SEG:
        seg_q = tl.load(seg_base + offs_m, mask=offs_m < SEQ_Q, other=-1)[:, None]
    seed_bh = 0
    if HAS_DROPOUT:
        seed_bh = _philox_seed(tl.load(SEED), off_bh)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_range(start_m, BLOCK_M, BLOCK_N, SEGB + off_b.to(tl.int64) * 2 * SEQ_Q,
                                          SEQ_Q, SEQ_K, CAUSAL, HAS_SEG)
    dq = _bwd_q_tiles(
        dq, q, do, lse, delta, seg_q, k_base, v_base, k_desc, v_desc, stride_kn, stride_kd, stride_vn, stride_vd,
        lo, full_lo, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64)
    dq = _bwd_q_tiles(
        dq, q, do, lse, delta, seg_q, k_base, v_base, k_desc, v_desc, stride_kn, stride_kd, stride_vn, stride_vd,
        full_lo, full_hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, False, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64)
    dq = _bwd_q_tiles(
        dq, q, do, lse, delta, seg_q, k_base, v_base, k_desc, v_desc, stride_kn, stride_kd, stride_vn, stride_vd,
        full_hi, hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, True, CAUSAL, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC, USE_DESC, I64)
    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
             + rows * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _dropout_mask_kernel(
    OUT, SEED, dropout_p, H_Q, SEQ_Q, SEQ_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Debug/test helper: writes the keep-mask the attention kernels use for (seed, p).
    off_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    start_n = tl.program_id(2) * BLOCK_N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(_philox_seed(tl.load(SEED), off_bh), offs_m[:, None], offs_n[None, :], SEQ_K, dropout_p)
    ptrs = OUT + off_bh.to(tl.int64) * SEQ_Q * SEQ_K + offs_m[:, None].to(tl.int64) * SEQ_K + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < SEQ_Q) & (offs_n[None, :] < SEQ_K))


@triton.jit
def _dropout_at_kernel(OUT, SEED, ROWS, COLS, dropout_p, SEQ_K, N, BLOCK: tl.constexpr):
    # Test helper: the keep decision of head (0, 0) at arbitrary (row, col) pairs, for sizes too
    # large to materialise (the 64-bit dropout counter).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.load(ROWS + offs, mask=offs < N, other=0)
    cols = tl.load(COLS + offs, mask=offs < N, other=0)
    keep = _dropout_keep(_philox_seed(tl.load(SEED), tl.program_id(0) * 0), rows, cols, SEQ_K, dropout_p)
    tl.store(OUT + offs, keep.to(tl.int8), mask=offs < N)


@triton.jit
def _row_offsets_kernel(OUT, ROWS, stride, N, I64: tl.constexpr, BLOCK: tl.constexpr):
    # Test helper: the in-head element offsets `row * stride` exactly as the kernels form them.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.load(ROWS + offs, mask=offs < N, other=0)
    tl.store(OUT + offs, (_idx(rows, I64) * stride).to(tl.int64), mask=offs < N)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# Under the interpreter one small fixed tile: autotuning there is pointless and slow.
INTERPRET_BLOCK_M = 64
INTERPRET_BLOCK_N = 32

# Launches per kernel kind since import (tests read it to see which backward ran).
launches: dict[str, int] = {}


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _configs_for(kind: str, arch: int) -> list[triton.Config]:
    """Candidate tiles per kernel for a GPU architecture (90 = Hopper, 80 = Ampere, ...).

    The first entry is the default used when autotuning is off (BIGTRAIN_ATTN_AUTOTUNE=0).
    Lists are short on purpose: every candidate is compiled once per kernel variant.
    """
    if arch >= 90:
        # H100 / H200, 228 KB smem per SM. Tutorial 06 keeps 8 warps only for 128x128 tiles on
        # Hopper (smaller tiles starve 8 warps' wgmma); 128x128 with 2 stages fits d128 in smem
        # (Q 32 KB + 2 x (K 32 KB + V 32 KB)), 3 stages is the autotuner's to try.
        # `bigtrain bench attention --static --arch 90` (ptxas, Triton 3.9, bf16, causal + packed
        # documents) chose these: the forward's defaults spill nothing at head_dim 64/128/256
        # (64x64 with 8 warps once _prune keeps only small tiles for 256), dQ's at 64/128; a
        # 128x64 forward with 4 warps spilled at d128, a 128x128 dK/dV did not fit shared memory
        # at d128. Every dK/dV candidate spills some registers at d128 (docs/kernels.md).
        table = {
            "fwd": [_cfg(128, 128, 8, 2), _cfg(128, 128, 8, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 8, 2), _cfg(64, 64, 4, 2)],
            "dkdv": [_cfg(64, 128, 8, 2), _cfg(32, 64, 8, 2), _cfg(32, 128, 4, 3), _cfg(64, 64, 4, 2)],
            "dq": [_cfg(64, 64, 8, 2), _cfg(128, 64, 8, 2), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 2)],
        }
    else:  # Ampere (A100: 164 KB smem) and consumer parts: smaller tiles, fewer stages.
        table = {
            "fwd": [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 2), _cfg(64, 64, 4, 2),
                    _cfg(64, 32, 4, 2), _cfg(32, 32, 4, 1)],
            "dkdv": [_cfg(32, 128, 8, 2), _cfg(64, 128, 8, 2), _cfg(32, 64, 4, 2), _cfg(64, 64, 4, 2),
                     _cfg(32, 32, 4, 1)],
            "dq": [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2), _cfg(64, 64, 4, 2), _cfg(32, 32, 4, 1)],
        }
    return table[kind]


def _arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    # head_dim 256 tiles exceed shared memory with the big configurations: keep the small ones.
    # d64/d128 may use 128x128 tiles. (Candidates that still do not fit are skipped by the
    # autotuner as OutOfResources; the non-autotuned default of each list fits.)
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    if block_d >= 256:
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64
                 and c.num_stages <= 2 and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64]
        return small or configs[-1:]
    return configs


_KEY = ["TUNE_SEQ", "HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_SEG", "HAS_DMASK", "HAS_DROPOUT", "DOT_PREC",
        "USE_DESC", "I64"]
_tuned: dict[str, Any] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("BIGTRAIN_ATTN_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def _kernel(kind: str) -> Any:
    base = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
    if INTERPRET or not _autotune_enabled():
        return base
    if kind not in _tuned:
        # The atomic backward adds into DQ: every autotuning trial must start from zeros.
        _tuned[kind] = triton.autotune(configs=_configs_for(kind, _arch()), key=_KEY,
                                       prune_configs_by={"early_config_prune": _prune},
                                       reset_to_zero=["DQ"] if kind == "dkdv" else None)(base)
    return _tuned[kind]


def _launch(kind: str, n_programs: Any, *args: Any, **kw: Any) -> None:
    """`n_programs(meta)`: the one-dimensional grid's size for a tile shape."""
    launches[kind] = launches.get(kind, 0) + 1
    kern = _kernel(kind)
    grid = lambda meta: (n_programs(meta),)  # noqa: E731
    if INTERPRET:
        meta = {"BLOCK_M": INTERPRET_BLOCK_M, "BLOCK_N": INTERPRET_BLOCK_N}
        kern[grid(meta)](*args, **kw, **meta)
    elif not _autotune_enabled():  # first (default) candidate that fits this head_dim
        cfg = _prune(_configs_for(kind, _arch()), {}, BLOCK_D=kw["BLOCK_D"])[0]
        kern[grid(cfg.kwargs)](*args, **kw, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        kern[grid](*args, **kw)


# --------------------------------------------------------------------------------------------
# Host-side entry points used by the custom op
# --------------------------------------------------------------------------------------------

_DUMMY: dict[torch.device, torch.Tensor] = {}


def _dummy(device: torch.device) -> torch.Tensor:
    # Stand-in pointer for absent optional inputs (the kernels never read it).
    if device not in _DUMMY:
        _DUMMY[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _DUMMY[device]


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


segment_bounds = document_bounds  # the name the tests and tile counts use


def visited_key_tiles(segment_ids: torch.Tensor | None, seq_q: int, seq_k: int, causal: bool,
                      block_m: int, block_n: int) -> torch.Tensor:
    """(batch, query tiles): how many key tiles the forward visits per query tile, by the same
    range rule as its `_key_range` (documents from :func:`segment_bounds`, causal limits)."""
    n_m = triton.cdiv(seq_q, block_m)
    start = torch.arange(n_m) * block_m
    last = torch.clamp(start + block_m, max=seq_q) - 1
    lo = torch.zeros(n_m, dtype=torch.long)
    hi = torch.full((n_m,), seq_k, dtype=torch.long)
    if causal:
        hi = torch.minimum(hi, last + (seq_k - seq_q) + 1)
    if segment_ids is None:
        lo, hi = lo[None], hi[None]
    else:
        b = segment_bounds(segment_ids).long().cpu()
        lo = torch.maximum(lo[None], b[:, 0, start])
        hi = torch.minimum(hi[None], b[:, 1, last])
    lo = (lo // block_n) * block_n
    return torch.clamp(hi - lo, min=0).add(block_n - 1) // block_n


def _needs_i64(*tensors: torch.Tensor | None) -> bool:
    """True when some element offset inside one (batch, head) can reach 2**31 (the kernels then
    widen their in-head row offsets to 64 bits)."""
    for t in tensors:
        if t is not None and t.numel() and sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= I32_LIMIT:
            return True
    return False


def _scratch_allocator(size: int, align: int, stream: Any) -> torch.Tensor:  # noqa: ARG001
    """Scratch memory for device-side tensor descriptors (Triton asks for it at launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _use_descriptors(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) for the streamed tiles: CUDA sm_90+, a Triton that has them,
    16-byte aligned bases and strides, unit last stride. BIGTRAIN_ATTN_TMA=0/1 forces it off/on
    (1 also under the interpreter, which runs descriptors too: the tests use that).

    Called on the thread that launches. `triton.set_allocator` keeps its allocator in a
    ContextVar, i.e. per thread: autograd runs CUDA backward nodes on its own worker thread, and
    activation-checkpoint recomputation or an evaluation thread launch from others. Set once
    per process, every launch off the first thread raised "Kernel requires a runtime memory
    allocation, but no allocator was set". Setting it at every launch costs one ContextVar.set."""
    force = os.environ.get("BIGTRAIN_ATTN_TMA", "").lower()
    if not HAS_DESCRIPTORS or force in ("0", "false", "off", "no"):
        return False
    if not (force in ("1", "true", "on", "yes") or (not INTERPRET and _arch() >= 90)):
        return False
    for t in tensors:
        el = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * el) % 16 for s in t.stride()[:-1]):
            return False
    if not INTERPRET:  # device-side descriptors need scratch memory, on this thread
        triton.set_allocator(_scratch_allocator)
    return True


def _opt_args(q: torch.Tensor, kpm: torch.Tensor | None, seg: torch.Tensor | None, segb: torch.Tensor | None,
              dmask: torch.Tensor | None, seed: torch.Tensor | None) -> tuple[list[Any], list[int]]:
    """Pointers KPM, SEG, SEGB, DMASK, SEED (a dummy where absent) and the masks' strides. `segb`:
    the bounds of `seg` when the caller already has them (the custom op computes them once for the
    forward and the backward)."""
    d = _dummy(q.device)
    if seg is not None and segb is None:
        segb = segment_bounds(seg)
    ptrs = [x if x is not None else d for x in (kpm, seg, segb, dmask, seed)]
    strides = [kpm.stride(0) if kpm is not None else 0, seg.stride(0) if seg is not None else 0]
    strides += list(dmask.stride()) if dmask is not None else [0, 0, 0, 0]
    return ptrs, strides


def _flags(q: torch.Tensor, causal: bool, kpm: Any, seg: Any, dmask: Any, dropout_p: float,
           use_desc: bool, i64: bool) -> dict[str, Any]:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=bool(causal),
        HAS_KPM=kpm is not None, HAS_SEG=seg is not None, HAS_DMASK=dmask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        # fp32 inputs: exact fp32 products (tests, references); fp16/bf16 ignore this.
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        USE_DESC=use_desc, I64=i64,
    )


def _tune_seq(seq_q: int, seq_k: int) -> int:
    # Autotune per power-of-two length bucket, not per exact length (variable-length batches).
    return triton.next_power_of_2(max(seq_q, seq_k))


def _bshd(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # (batch, heads, seq, dim) with (batch, seq, heads, dim) memory, as transformers lays it out
    # (its attention output is transposed back for free); a fresh tensor, not a view.
    B, H, S, D = shape
    return torch.empty_strided(shape, (S * H * D, D, H * D, 1), dtype=dtype, device=device)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
            kpm: torch.Tensor | None, seg: torch.Tensor | None, dmask: torch.Tensor | None,
            dropout_p: float, seed: torch.Tensor | None, count: torch.Tensor | None = None,
            segb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse). `count`, when given (int32, query tiles x batch x heads), receives the
    number of key tiles each program visited."""
    B, HQ, SQ, D = q.shape
    HK, SK = k.shape[1], k.shape[2]
    o = _bshd((B, HQ, SQ, D), q.dtype, q.device)
    lse = torch.empty((B * HQ, SQ), dtype=torch.float32, device=q.device)
    ptrs, ostr = _opt_args(q, kpm, seg, segb, dmask, seed)
    flags = _flags(q, causal, kpm, seg, dmask, dropout_p, _use_descriptors(k, v), _needs_i64(q, k, v, o, dmask))
    _launch("fwd", lambda meta: triton.cdiv(SQ, meta["BLOCK_M"]) * B * HQ,
            q, k, v, o, lse, *ptrs, count if count is not None else _dummy(q.device), sm_scale, dropout_p,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(o), *ostr,
            HQ, HQ // HK, SQ, SK, _tune_seq(SQ, SK), **flags, COUNT_TILES=count is not None)
    return o, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, causal: bool, sm_scale: float, kpm: torch.Tensor | None,
             seg: torch.Tensor | None, dmask: torch.Tensor | None, dropout_p: float,
             seed: torch.Tensor | None, deterministic: bool,
             segb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, HQ, SQ, D = q.shape
    HK, SK = k.shape[1], k.shape[2]
    i64 = _needs_i64(q, k, v, o, do, dmask)
    flags = _flags(q, causal, kpm, seg, dmask, dropout_p, _use_descriptors(q, do, k, v), i64)
    delta = torch.empty_like(lse)
    pre_m = 64 if not INTERPRET else INTERPRET_BLOCK_M
    launches["preprocess"] = launches.get("preprocess", 0) + 1
    _bwd_preprocess_kernel[(triton.cdiv(SQ, pre_m) * B * HQ,)](
        o, do, delta, *_strides4(o), *_strides4(do), HQ, SQ,
        HEAD_DIM=D, BLOCK_D=flags["BLOCK_D"], BLOCK_M=pre_m, I64=i64)
    # The atomic variant accumulates dQ in fp32 (zeroed); the deterministic one writes q's dtype.
    dq = _bshd((B, HQ, SQ, D), q.dtype if deterministic else torch.float32, q.device)
    if not deterministic:
        dq.zero_()
    dk = _bshd((B, HK, SK, D), k.dtype, k.device)
    dv = _bshd((B, HK, SK, D), v.dtype, v.device)
    ptrs, ostr = _opt_args(q, kpm, seg, segb, dmask, seed)
    tune = _tune_seq(SQ, SK)
    _launch("dkdv", lambda meta: triton.cdiv(SK, meta["BLOCK_N"]) * B * HK,
            q, k, v, do, dk, dv, dq, lse, delta, *ptrs, sm_scale, dropout_p,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do), *_strides4(dk), *_strides4(dv),
            *_strides4(dq), *ostr, HQ, HK, HQ // HK, SQ, SK, tune, **flags, ATOMIC_DQ=not deterministic)
    if deterministic:
        _launch("dq", lambda meta: triton.cdiv(SQ, meta["BLOCK_M"]) * B * HQ,
                q, k, v, do, dq, lse, delta, *ptrs, sm_scale, dropout_p,
                *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do), *_strides4(dq),
                *ostr, HQ, HQ // HK, SQ, SK, tune, **flags)
        return dq, dk, dv
    return dq.to(q.dtype), dk, dv


def dropout_mask(batch: int, heads: int, seq_q: int, seq_k: int, dropout_p: float, seed: torch.Tensor,
                 device: torch.device) -> torch.Tensor:
    out = torch.empty((batch, heads, seq_q, seq_k), dtype=torch.int8, device=device)
    bm = bn = 32
    _dropout_mask_kernel[(batch * heads, triton.cdiv(seq_q, bm), triton.cdiv(seq_k, bn))](
        out, seed, dropout_p, heads, seq_q, seq_k, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


__all__ = ["INTERPRET", "forward", "backward", "dropout_mask", "segment_bounds", "visited_key_tiles"]
