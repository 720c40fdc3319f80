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
taken in base 2 (``exp(x) = exp2(x * log2(e))``, one MUFU op), so S is kept pre-multiplied by
``scale * log2(e)``.  The log-sum-exp ``lse = m + log2(l)`` (base 2) is saved: the backward
rebuilds P as ``exp2(s - lse)`` without a second pass over the keys.

Backward (FlashAttention-2, Algorithm 2), with dO the incoming gradient::

    dV    = (P * Z)^T dO
    dP    = (dO V^T) * Z
    dS    = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
    dQ    = scale * dS K,      dK = scale * dS^T Q

``delta`` is computed first by a small preprocess kernel (the identity holds with dropout too:
``sum_j P_ij Z_ij (dO V^T)_ij = dO_i . O_i``).  dK/dV are computed by one program per key tile
(looping over all query tiles and, for GQA, over all query heads sharing that kv head) and dQ by
one program per query tile: every output element is written by exactly one program, so there
are no atomics and gradients are bitwise deterministic.

Masking.  A query row with no key it may attend to keeps ``m = -inf`` and ``l = 0``; it outputs
zeros and stores ``lse = +inf``, which makes its rebuilt P (hence every gradient it feeds) zero.
Out-of-range query rows load Q = dO = 0 and ``lse = +inf`` and therefore contribute nothing in
the backward; out-of-range key rows load K = V = 0 and are masked in the forward; in the
backward their dK/dV rows are never stored and their (zero) K rows add nothing to dQ.

Dropout.  The keep-mask is never stored: element (i, j) of head (b, h) keeps iff
``tl.rand(seed_bh, i * seq_k + j) >= p`` (Philox, counter-based), with
``seed_bh = seed + (b * heads_q + h) * 2**31`` so every (batch, head) has its own Philox key.
The backward regenerates the same numbers from the same seed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    try:  # Triton >= 3.4 reads TRITON_INTERPRET through its knobs
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Decided once, when this module is first imported (the jit decorators below read it too).
INTERPRET: bool = _interpreting()

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _philox_seed(seed, off_bh):
    # Disjoint bit ranges (seed < 2**31): a distinct Philox key per (call, batch, head).
    return (off_bh.to(tl.int64) << 31) + seed


@triton.jit
def _dropout_keep(seed_bh, rows, cols, SEQ_K, dropout_p):
    # rows/cols broadcast to the tile; one uniform draw per (query, key) element.
    r = tl.rand(seed_bh, rows * SEQ_K + cols)
    return r >= dropout_p


@triton.jit
def _tile_mask(
    rows, cols, SEQ_Q, SEQ_K, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
    APPLY_CAUSAL: tl.constexpr, CHECK_K: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr,
):
    # rows (query positions) and cols (key positions) are 2D index tensors that broadcast to
    # the tile, (M, 1) x (1, N) in the forward/dQ kernels, (1, M) x (N, 1) in the dK/dV kernel.
    # Returns True where query `row` may attend to key `col`.
    valid = (rows >= 0) & (cols >= 0)
    if APPLY_CAUSAL:
        # Bottom-right aligned (FlashAttention >= 2.1): the last query sees the last key.
        valid = valid & (cols <= rows + (SEQ_K - SEQ_Q))
    if CHECK_K:
        valid = valid & (cols < SEQ_K)
    if HAS_KPM:
        keep = tl.load(kpm_base + cols, mask=cols < SEQ_K, other=0)
        valid = valid & (keep != 0)
    if HAS_SEG:
        seg_q = tl.load(seg_base + rows, mask=rows < SEQ_Q, other=-1)
        seg_k = tl.load(seg_base + cols, mask=cols < SEQ_K, other=-2)
        valid = valid & (seg_q == seg_k)
    if HAS_DMASK:
        dm = tl.load(dm_base + rows * stride_dmm + cols * stride_dmn,
                     mask=(rows < SEQ_Q) & (cols < SEQ_K), other=0)
        valid = valid & (dm != 0)
    return valid


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    lo, hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
    qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DIAG: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
    HAS_DMASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # DIAG=True: tiles that straddle the causal diagonal or the end of the keys, which need the
    # position masks; DIAG=False: tiles every query row of the block may fully see.
    NEED_MASK: tl.constexpr = DIAG or HAS_KPM or HAS_SEG or HAS_DMASK
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ld_mask = (offs_n[:, None] < SEQ_K) & d_ok
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=ld_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 units
        if NEED_MASK:
            valid = _tile_mask(offs_m[:, None], offs_n[None, :], SEQ_Q, SEQ_K, kpm_base, seg_base,
                               dm_base, stride_dmm, stride_dmn, DIAG and CAUSAL, DIAG, HAS_KPM, HAS_SEG,
                               HAS_DMASK)
            s = tl.where(valid, s, float("-inf"))
        # Online softmax: new running max; a row that has seen only masked keys keeps m = -inf,
        # and subtracting 0 instead of -inf keeps exp2 at 0 rather than NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)  # normaliser uses P before dropout
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_bh, offs_m[:, None], offs_n[None, :], SEQ_K, dropout_p)
            p = tl.where(keep, p, 0.0)  # the 1/(1-p) factor is applied once at the end
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=ld_mask, other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, SEG, DMASK,  # noqa: E741 - O is the attention output, named as in Q, K, V, O (FlashAttention notation)
    sm_scale, dropout_p, seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_kpmb, stride_segb, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    H_Q, GROUP, SEQ_Q, SEQ_K, TUNE_SEQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
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
    seed_bh = _philox_seed(seed, off_bh)

    q_mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # fold log2(e) in: the kernel uses exp2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Keys < start_m + diff + 1 are visible to every row of the block (no causal mask
        # needed); keys >= start_m + BLOCK_M + diff are visible to none (skipped).
        diff = SEQ_K - SEQ_Q
        hi = tl.minimum(start_m + BLOCK_M + diff, SEQ_K)
        full = tl.maximum(start_m + diff + 1, 0)
        full = tl.minimum((full // BLOCK_N) * BLOCK_N, tl.maximum(hi, 0))
    else:
        hi = SEQ_K
        full = (SEQ_K // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        0, full, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, CAUSAL, False, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        full, hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, CAUSAL, True, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC)

    # Rows that attended to nothing: l = 0 -> output 0 and lse = +inf (P = 0 in the backward).
    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    out = acc / l_div[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_div))
    tl.store(LSE + off_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = rowsum(dO * O)_i = sum_j P_ij dP_ij: the softmax-Jacobian term of dS.
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H_Q
    off_h = off_bh % H_Q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * SEQ_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < SEQ_Q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qm, stride_qd, stride_dom, stride_dod,
    lo, hi, offs_n, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
    qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
    DIAG: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
    HAS_DMASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so that dK and dV accumulate as plain dots.
    NEED_MASK: tl.constexpr = DIAG or HAS_KPM or HAS_SEG or HAS_DMASK
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ld_mask = (offs_m[:, None] < SEQ_Q) & d_ok
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=ld_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=ld_mask, other=0.0)
        # lse = +inf outside the queries (and for empty rows) turns P into exact zeros there.
        lse = tl.load(lse_base + offs_m, mask=offs_m < SEQ_Q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < SEQ_Q, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :])
        if NEED_MASK:
            valid = _tile_mask(offs_m[None, :], offs_n[:, None], SEQ_Q, SEQ_K, kpm_base, seg_base,
                               dm_base, stride_dmm, stride_dmn, DIAG and CAUSAL, False, HAS_KPM, HAS_SEG,
                               HAS_DMASK)
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
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, SEG, DMASK,
    sm_scale, dropout_p, seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_kpmb, stride_segb, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    H_Q, H_KV, GROUP, SEQ_Q, SEQ_K, TUNE_SEQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key tile, batch, kv head); it owns its dK/dV rows, so no atomics.
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)
    off_b = off_bhk // H_KV
    off_hk = off_bhk % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    if CAUSAL:
        # Query rows < start_n - diff see none of these keys; rows >= start_n + BLOCK_N - 1 - diff
        # see all of them (no causal mask needed).
        diff = SEQ_K - SEQ_Q
        lo = tl.maximum(start_n - diff, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - diff, 0)
        mid = tl.minimum(tl.cdiv(mid, BLOCK_M) * BLOCK_M, tl.cdiv(SEQ_Q, BLOCK_M) * BLOCK_M)
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_b * H_Q + off_h
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        lse_base = LSE + off_bh.to(tl.int64) * SEQ_Q
        delta_base = DELTA + off_bh.to(tl.int64) * SEQ_Q
        kpm_base = KPM + off_b.to(tl.int64) * stride_kpmb
        seg_base = SEG + off_b.to(tl.int64) * stride_segb
        dm_base = DMASK + off_b.to(tl.int64) * stride_dmb + off_h.to(tl.int64) * stride_dmh
        seed_bh = _philox_seed(seed, off_bh)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod,
            lo, mid, offs_n, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
            qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
            HEAD_DIM, BLOCK_M, CAUSAL, True, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_dom, stride_dod,
            mid, SEQ_Q, offs_n, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
            qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
            HEAD_DIM, BLOCK_M, CAUSAL, False, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC)

    dk = dk * sm_scale  # dK = scale * dS^T Q (S was scaled)
    tl.store(DK + off_b.to(tl.int64) * stride_dkb + off_hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b.to(tl.int64) * stride_dvb + off_hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    lo, hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
    qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DIAG: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
    HAS_DMASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    NEED_MASK: tl.constexpr = DIAG or HAS_KPM or HAS_SEG or HAS_DMASK
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ld_mask = (offs_n[:, None] < SEQ_K) & d_ok
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=ld_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=ld_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if NEED_MASK:
            # Keys past SEQ_K need no mask here: their K rows are 0, so they add 0 to dQ.
            valid = _tile_mask(offs_m[:, None], offs_n[None, :], SEQ_Q, SEQ_K, kpm_base, seg_base,
                               dm_base, stride_dmm, stride_dmn, DIAG and CAUSAL, False, HAS_KPM, HAS_SEG,
                               HAS_DMASK)
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
    Q, K, V, DO, DQ, LSE, DELTA, KPM, SEG, DMASK,
    sm_scale, dropout_p, seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_kpmb, stride_segb, stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    H_Q, GROUP, SEQ_Q, SEQ_K, TUNE_SEQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DMASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (query tile, batch, query head); it owns its dQ rows.
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H_Q
    off_h = off_bh % H_Q
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * SEQ_Q + offs_m, mask=offs_m < SEQ_Q, other=0.0)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    kpm_base = KPM + off_b.to(tl.int64) * stride_kpmb
    seg_base = SEG + off_b.to(tl.int64) * stride_segb
    dm_base = DMASK + off_b.to(tl.int64) * stride_dmb + off_h.to(tl.int64) * stride_dmh
    seed_bh = _philox_seed(seed, off_bh)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        diff = SEQ_K - SEQ_Q
        hi = tl.minimum(start_m + BLOCK_M + diff, SEQ_K)
        full = tl.maximum(start_m + diff + 1, 0)
        full = tl.minimum((full // BLOCK_N) * BLOCK_N, tl.maximum(hi, 0))
    else:
        hi = SEQ_K
        full = SEQ_K  # out-of-range keys add 0 to dQ, see _bwd_dq_inner
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        0, full, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, CAUSAL, False, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        full, hi, offs_m, offs_d, kpm_base, seg_base, dm_base, stride_dmm, stride_dmn,
        qk_scale, dropout_p, seed_bh, SEQ_Q, SEQ_K,
        HEAD_DIM, BLOCK_N, CAUSAL, True, HAS_KPM, HAS_SEG, HAS_DMASK, HAS_DROPOUT, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _dropout_mask_kernel(
    OUT, seed, dropout_p, H_Q, SEQ_Q, SEQ_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Debug/test helper: writes the keep-mask the attention kernels use for (seed, p).
    start_m = tl.program_id(0) * BLOCK_M
    start_n = tl.program_id(1) * BLOCK_N
    off_bh = tl.program_id(2)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(_philox_seed(seed, off_bh), offs_m[:, None], offs_n[None, :], SEQ_K, dropout_p)
    ptrs = OUT + off_bh.to(tl.int64) * SEQ_Q * SEQ_K + offs_m[:, None] * SEQ_K + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < SEQ_Q) & (offs_n[None, :] < SEQ_K))


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# Under the interpreter one small fixed tile: autotuning there is pointless and slow.
INTERPRET_BLOCK_M = 64
INTERPRET_BLOCK_N = 32


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _configs_for(kind: str, arch: int) -> list[triton.Config]:
    """Candidate tiles per kernel for a GPU architecture (90 = Hopper, 80 = Ampere, ...).

    The first entry is the default used when autotuning is off (BIGTRAIN_ATTN_AUTOTUNE=0).
    Lists are short on purpose: every candidate is compiled once per kernel variant.
    """
    if arch >= 90:  # H100 / H200: 228 KB smem per SM, large tiles with 8 warps pay off.
        table = {
            "fwd": [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 32, 4, 2),
                    _cfg(64, 32, 4, 2)],
            "dkdv": [_cfg(64, 128, 8, 3), _cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3), _cfg(64, 64, 4, 2),
                     _cfg(32, 32, 4, 1)],
            "dq": [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 64, 4, 2),
                   _cfg(32, 32, 4, 1)],
        }
    else:  # Ampere (A100: 164 KB smem) and consumer parts: smaller tiles, fewer stages.
        table = {
            "fwd": [_cfg(128, 64, 4, 3), _cfg(128, 32, 4, 2), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2),
                    _cfg(32, 32, 4, 1)],
            "dkdv": [_cfg(32, 128, 8, 2), _cfg(32, 64, 4, 2), _cfg(64, 64, 4, 2), _cfg(32, 32, 4, 1)],
            "dq": [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2), _cfg(64, 64, 4, 2), _cfg(32, 32, 4, 1)],
        }
    return table[kind]


def _arch_configs(kind: str) -> list[triton.Config]:
    major, minor = torch.cuda.get_device_capability()
    return _configs_for(kind, 10 * major + minor)


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    # head_dim 256 tiles exceed shared memory with the big configurations: keep the small ones.
    # (Candidates that still do not fit are skipped by the autotuner as OutOfResources.)
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    if block_d >= 256:
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64
                 and c.num_stages <= 2 and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64]
        return small or configs[-1:]
    if block_d >= 128:
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64] or configs[-1:]
    return configs


_KEY = ["TUNE_SEQ", "HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_SEG", "HAS_DMASK", "HAS_DROPOUT", "DOT_PREC"]
_tuned: dict[str, Any] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("BIGTRAIN_ATTN_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def _kernel(kind: str) -> Any:
    base = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
    if INTERPRET or not _autotune_enabled():
        return base
    if kind not in _tuned:
        _tuned[kind] = triton.autotune(configs=_arch_configs(kind), key=_KEY,
                                       prune_configs_by={"early_config_prune": _prune})(base)
    return _tuned[kind]


def _launch(kind: str, grid_fn: Any, *args: Any, **kw: Any) -> None:
    kern = _kernel(kind)
    if INTERPRET:
        meta = {"BLOCK_M": INTERPRET_BLOCK_M, "BLOCK_N": INTERPRET_BLOCK_N}
        kern[grid_fn(meta)](*args, **kw, **meta)
    elif not _autotune_enabled():  # first (default) candidate that fits this head_dim
        cfg = _prune(_arch_configs(kind), {}, BLOCK_D=kw["BLOCK_D"])[0]
        kern[grid_fn(cfg.kwargs)](*args, **kw, **cfg.kwargs, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages)
    else:
        kern[grid_fn](*args, **kw)


# --------------------------------------------------------------------------------------------
# Host-side entry points used by the autograd function
# --------------------------------------------------------------------------------------------

_DUMMY: dict[torch.device, torch.Tensor] = {}


def _dummy(device: torch.device) -> torch.Tensor:
    # Stand-in pointer for absent optional inputs (the kernels never read it).
    if device not in _DUMMY:
        _DUMMY[device] = torch.zeros(1, dtype=torch.int8, device=device)
    return _DUMMY[device]


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _opt_args(q: torch.Tensor, kpm: torch.Tensor | None, seg: torch.Tensor | None,
              dmask: torch.Tensor | None) -> tuple[list[Any], list[int]]:
    d = _dummy(q.device)
    ptrs = [kpm if kpm is not None else d, seg if seg is not None else d, dmask if dmask is not None else d]
    strides = [kpm.stride(0) if kpm is not None else 0, seg.stride(0) if seg is not None else 0]
    if dmask is not None:
        strides += [dmask.stride(0), dmask.stride(1), dmask.stride(2), dmask.stride(3)]
    else:
        strides += [0, 0, 0, 0]
    return ptrs, strides


def _flags(q: torch.Tensor, causal: bool, kpm: Any, seg: Any, dmask: Any, dropout_p: float) -> dict[str, Any]:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=bool(causal),
        HAS_KPM=kpm is not None, HAS_SEG=seg is not None, HAS_DMASK=dmask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        # fp32 inputs: exact fp32 products (tests, references); fp16/bf16 ignore this.
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _tune_seq(seq_q: int, seq_k: int) -> int:
    # Autotune per power-of-two length bucket, not per exact length (variable-length batches).
    return triton.next_power_of_2(max(seq_q, seq_k))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
            kpm: torch.Tensor | None, seg: torch.Tensor | None, dmask: torch.Tensor | None,
            dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse); ``out`` is laid out (batch, seq, heads, dim) in memory, viewed as q's shape."""
    B, HQ, SQ, D = q.shape
    HK, SK = k.shape[1], k.shape[2]
    o = torch.empty((B, SQ, HQ, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B * HQ, SQ), dtype=torch.float32, device=q.device)
    ptrs, ostr = _opt_args(q, kpm, seg, dmask)
    grid = lambda meta: (triton.cdiv(SQ, meta["BLOCK_M"]), B * HQ)  # noqa: E731
    _launch("fwd", grid, q, k, v, o, lse, *ptrs, sm_scale, dropout_p, seed,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(o), *ostr,
            HQ, HQ // HK, SQ, SK, _tune_seq(SQ, SK), **_flags(q, causal, kpm, seg, dmask, dropout_p))
    return o, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, causal: bool, sm_scale: float, kpm: torch.Tensor | None,
             seg: torch.Tensor | None, dmask: torch.Tensor | None, dropout_p: float,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, HQ, SQ, D = q.shape
    HK, SK = k.shape[1], k.shape[2]
    flags = _flags(q, causal, kpm, seg, dmask, dropout_p)
    delta = torch.empty_like(lse)
    pre_m = 64 if not INTERPRET else INTERPRET_BLOCK_M
    _bwd_preprocess_kernel[(triton.cdiv(SQ, pre_m), B * HQ)](
        o, do, delta, *_strides4(o), *_strides4(do), HQ, SQ,
        HEAD_DIM=D, BLOCK_D=flags["BLOCK_D"], BLOCK_M=pre_m)
    dq = torch.empty((B, SQ, HQ, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    dk = torch.empty((B, SK, HK, D), dtype=k.dtype, device=k.device).transpose(1, 2)
    dv = torch.empty((B, SK, HK, D), dtype=v.dtype, device=v.device).transpose(1, 2)
    ptrs, ostr = _opt_args(q, kpm, seg, dmask)
    tune = _tune_seq(SQ, SK)
    grid_kv = lambda meta: (triton.cdiv(SK, meta["BLOCK_N"]), B * HK)  # noqa: E731
    _launch("dkdv", grid_kv, q, k, v, do, dk, dv, lse, delta, *ptrs, sm_scale, dropout_p, seed,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do), *_strides4(dk), *_strides4(dv),
            *ostr, HQ, HK, HQ // HK, SQ, SK, tune, **flags)
    grid_q = lambda meta: (triton.cdiv(SQ, meta["BLOCK_M"]), B * HQ)  # noqa: E731
    _launch("dq", grid_q, q, k, v, do, dq, lse, delta, *ptrs, sm_scale, dropout_p, seed,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do), *_strides4(dq),
            *ostr, HQ, HQ // HK, SQ, SK, tune, **flags)
    return dq, dk, dv


def dropout_mask(batch: int, heads: int, seq_q: int, seq_k: int, dropout_p: float, seed: int,
                 device: torch.device) -> torch.Tensor:
    out = torch.empty((batch, heads, seq_q, seq_k), dtype=torch.int8, device=device)
    bm = bn = 32
    _dropout_mask_kernel[(triton.cdiv(seq_q, bm), triton.cdiv(seq_k, bn), batch * heads)](
        out, seed, dropout_p, heads, seq_q, seq_k, BLOCK_M=bm, BLOCK_N=bn)
    return out.bool()


__all__ = ["INTERPRET", "forward", "backward", "dropout_mask"]
