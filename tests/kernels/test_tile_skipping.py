"""Document-aware tile skipping, 64-bit addressing and the 64-bit dropout counter.

The forward kernel can report how many key tiles each program visited (a test hook); that count
must equal both bigtrain's own range rule (`visited_key_tiles`, from `segment_bounds`) and a
brute-force count from the reference mask: the tiles from the first to the last one holding any
(query, key) pair that may attend. Fewer would drop attention (the reference tests would fail
too), more is wasted work.
"""

from __future__ import annotations

import time

import pytest
import torch

from bigtrain.kernels import flash_attn

from attn_reference import allowed_mask

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(CUDA, reason="interpreter tile shapes and timings (CPU)")


def _ta():
    from bigtrain.kernels import _triton_attention as ta

    return ta


def _documents(b: int, s: int, n_docs: int, seed: int = 0) -> torch.Tensor:
    """Non-decreasing ids, `n_docs` documents of random lengths per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        cuts = torch.randperm(s - 1, generator=g)[: n_docs - 1] + 1
        starts = torch.zeros(s, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def _brute_force_tiles(sq, sk, b, causal, seg, bm, bn) -> torch.Tensor:
    ok = allowed_mask(sq, sk, b, causal, None, seg)[:, 0]  # (b, sq, sk)
    n_m, n_n = -(-sq // bm), -(-sk // bn)
    out = torch.zeros(b, n_m, dtype=torch.long)
    for i in range(n_m):
        tiles = ok[:, i * bm:(i + 1) * bm].any(1)  # (b, sk): keys any row of the block sees
        for r in range(b):
            hit = [t for t in range(n_n) if tiles[r, t * bn:(t + 1) * bn].any()]
            out[r, i] = hit[-1] - hit[0] + 1 if hit else 0
    return out


def _kernel_counts(sq, sk, b, h, causal, seg, bm, bn, monkeypatch) -> torch.Tensor:
    ta = _ta()
    monkeypatch.setattr(ta, "INTERPRET_BLOCK_M", bm)
    monkeypatch.setattr(ta, "INTERPRET_BLOCK_N", bn)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, 16, generator=g) for n in (sq, sk, sk))
    count = torch.full((b * h * -(-sq // bm),), -1, dtype=torch.int32)
    segi = seg.to(torch.int32).contiguous() if seg is not None else None
    ta.forward(q, k, v, causal, 0.25, None, segi, None, 0.0, None, count=count)
    return count.view(b, h, -1)


@pytest.mark.parametrize("case", ["8equal-causal", "8docs-causal", "3docs-full", "ids-not-runs", "no-seg-causal-q<k"])
def test_key_tiles_visited(case, monkeypatch):
    b, h, bm, bn = 2, 2, 32, 16
    sq = sk = 256
    causal = "causal" in case
    if case == "8equal-causal":  # 8 documents of 128 tokens
        b, h, sq, sk = 1, 1, 1024, 1024
        seg = torch.arange(sq)[None] // 128
    elif case == "8docs-causal":
        seg = _documents(b, sq, 8)
    elif case == "3docs-full":
        seg = _documents(b, sq, 3, seed=1)
    elif case == "ids-not-runs":  # id 0 comes back at the end: no skipping, every tile masked
        seg = _documents(b, sq, 4, seed=2)
        seg[:, -20:] = 0
    else:
        seg, sq = None, 100
    counts = _kernel_counts(sq, sk, b, h, causal, seg, bm, bn, monkeypatch)
    expected = _ta().visited_key_tiles(seg, sq, sk, causal, bm, bn).expand(b, -1)
    brute = _brute_force_tiles(sq, sk, b, causal, seg, bm, bn)
    if case == "ids-not-runs":  # conservative: the causal range, all of it
        brute = _brute_force_tiles(sq, sk, b, causal, None, bm, bn)
    assert torch.equal(expected, brute), (expected, brute)
    for head in range(h):
        assert torch.equal(counts[:, head].long(), brute), (counts[:, head], brute)
    if case == "8equal-causal":  # about 1/8 of the causal tiles (plus the diagonal tiles' share)
        causal_tiles = _brute_force_tiles(sq, sk, b, True, None, bm, bn).sum().item()
        assert brute.sum().item() < 0.16 * causal_tiles, (brute.sum(), causal_tiles)


def test_segment_bounds():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5], [0, 1, 0, 1, 2, 2], [3, 3, 1, 1, 0, 0]])
    b = _ta().segment_bounds(seg)
    assert b[0].tolist() == [[0, 0, 2, 2, 2, 5], [2, 2, 5, 5, 5, 6]]
    assert b[1].tolist() == [[0] * 6, [6] * 6]
    assert b[2].tolist() == [[-1] * 6, [6] * 6]  # id 0 and 1 come back: no ranges for this row
    assert b[3].tolist() == [[0, 0, 2, 2, 4, 4], [2, 2, 4, 4, 6, 6]]  # runs need not be sorted


def test_eight_documents_cost_a_fraction_of_one():
    # Interpreter time grows with the tiles a kernel visits: the same causal sequence packed with
    # 8 documents must run forward+backward in well under half the time of 1 document (its
    # tiles: ~1/6 forward, ~1/5 backward at this length; fixed per-program costs make up the rest).
    s = 1024
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, s, 16, generator=g).requires_grad_() for _ in range(3))
    flash_attn(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=True,
               segment_ids=torch.zeros(1, 64, dtype=torch.long)).sum().backward()  # parse the kernels once

    def run(seg) -> float:
        t = time.perf_counter()
        flash_attn(q, k, v, causal=True, segment_ids=seg).sum().backward()
        return time.perf_counter() - t

    t1 = run(torch.zeros(1, s, dtype=torch.long))
    t8 = run(torch.arange(s)[None] // (s // 8))
    assert t8 < 0.45 * t1, f"8 documents {t8:.2f}s vs one {t1:.2f}s"


# ------------------------------------------------------------------------------ sizes


def test_in_head_offsets_are_64_bit_when_needed():
    # A (seq, heads*dim) = (300k, 8192) layout puts row offsets past 2**31 inside one head. The
    # kernels' offset helper must then be exact (I64), and the host must ask for it.
    ta = _ta()
    rows = torch.tensor([0, 1, 262_143, 262_144, 299_999], dtype=torch.int32)
    stride = 8192
    exact = [int(r) * stride for r in rows]
    out = torch.zeros(len(rows), dtype=torch.int64)
    ta._row_offsets_kernel[(1,)](out, rows, stride, len(rows), I64=True, BLOCK=8)
    assert out.tolist() == exact
    ta._row_offsets_kernel[(1,)](out, rows, stride, len(rows), I64=False, BLOCK=8)
    assert out.tolist() != exact  # 32-bit arithmetic wraps: the flag matters
    big = torch.empty(1, 300_000, 64, 128, device="meta").transpose(1, 2)  # (1, 64, 300k, 128)
    small = torch.empty(1, 4096, 64, 128, device="meta").transpose(1, 2)
    assert ta._needs_i64(big) and not ta._needs_i64(small)


def test_dropout_counter_does_not_wrap():
    # Element (i, j) draws Philox counter i * seq_k + j. With a 32-bit counter, (i, j) and
    # (i + 1, j - 2**32 + seq_k)... alias once i * seq_k passes 2**32; with seq_k = 2**17 rows
    # i and i + 2**15 would share counters. The 64-bit counter gives them independent draws.
    ta = _ta()
    seq_k, n = 2**17, 4096
    rows = torch.arange(n, dtype=torch.int32) % 64
    cols = torch.arange(n, dtype=torch.int32) * 31 % seq_k
    seed = torch.tensor([1234], dtype=torch.int64)
    a = torch.empty(n, dtype=torch.int8)
    bb = torch.empty(n, dtype=torch.int8)
    ta._dropout_at_kernel[(n // 256,)](a, seed, rows, cols, 0.5, seq_k, n, BLOCK=256)
    ta._dropout_at_kernel[(n // 256,)](bb, seed, rows + 2**15, cols, 0.5, seq_k, n, BLOCK=256)
    agree = (a == bb).float().mean().item()
    assert 0.4 < agree < 0.6, agree  # independent fair coins agree half the time; aliases always
    # and below 2**32 the counter is the one the kernels always used: mask(seed) is unchanged
    keep = ta.dropout_mask(1, 1, 64, 64, 0.5, seed, torch.device("cpu"))
    r, c = torch.arange(64).repeat_interleave(64), torch.arange(64).repeat(64)
    one = torch.empty(64 * 64, dtype=torch.int8)
    ta._dropout_at_kernel[(16,)](one, seed, r.int(), c.int(), 0.5, 64, 64 * 64, BLOCK=256)
    assert torch.equal(keep.flatten(), one.bool())
