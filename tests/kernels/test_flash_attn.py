"""flash_attn against a float64 reference: outputs and q/k/v gradients.

Tolerance as in FlashAttention's tests: the kernel's error against the float64 reference may be
at most twice that of plain-PyTorch attention run in the same dtype, plus a small absolute slack.
On CPU the kernels run under the Triton interpreter (see conftest.py), which is slow, so the
grid below is a hand-picked cover of the features rather than a cartesian product.
"""

from __future__ import annotations


import pytest
import torch

from bigtrain.kernels import draw_dropout_seed, flash_attn, flash_attn_dropout_mask

from attn_reference import allowed_mask, attention_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BF16_SKIP = pytest.mark.skipif(
    not CUDA, reason="bf16 tl.dot is wrong in the Triton interpreter (multiplies raw bits); checked on GPU")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(b: int, hq: int, hk: int, sq: int, sk: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return mk(b, hq, sq, d), mk(b, hk, sk, d), mk(b, hk, sk, d)


def _masks(kind: str, b: int, sq: int, sk: int, seed: int = 0):
    """kind: '' | 'pad' | 'padfull' (batch 0 fully padded) | 'seg' | 'segpad' | 'segrand'."""
    g = torch.Generator().manual_seed(seed + 1)
    kpm = seg = None
    if "pad" in kind:
        lengths = torch.randint(1, sk + 1, (b,), generator=g)
        kpm = torch.arange(sk)[None, :] < lengths[:, None]
        if kind == "padfull":
            kpm[0] = False
        kpm = kpm.to(DEVICE)
    if "seg" in kind:
        if kind == "segrand":  # ids need not be contiguous runs
            seg = torch.randint(0, 3, (b, sq), generator=g)
        else:  # packed documents: non-decreasing ids, random boundaries
            starts = torch.rand(b, sq, generator=g) < 0.08
            starts[:, 0] = False
            seg = starts.long().cumsum(-1)
        seg = seg.to(DEVICE)
    return kpm, seg


def launches(kind: str) -> int:
    """Kernel launches of `kind` so far (the kernel module has one copy: bigtrain.kernels)."""
    from bigtrain.kernels import _triton_attention as ta

    return ta.launches.get(kind, 0)


def _grads(out: torch.Tensor, inputs, do: torch.Tensor):
    return torch.autograd.grad(out, inputs, do)


def check(b, hq, hk, sq, sk, d, causal, dtype, mask="", scale=None, transpose_q=False, deterministic=None):
    q, k, v = _inputs(b, hq, hk, sq, sk, d, dtype)
    if transpose_q:  # non-contiguous, (batch, seq, heads, dim) memory as in transformers
        q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    kpm, seg = _masks(mask, b, sq, sk)
    do = torch.randn(b, hq, sq, d, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)

    out = flash_attn(q, k, v, causal=causal, softmax_scale=scale, key_padding_mask=kpm, segment_ids=seg,
                     deterministic=deterministic)
    assert out.shape == q.shape and out.dtype == q.dtype
    g_out = _grads(out, (q, k, v), do)

    ref = attention_ref(q, k, v, causal=causal, scale=scale, kpm=kpm, seg=seg, dtype=torch.float64)
    g_ref = _grads(ref, (q, k, v), do)
    pt = attention_ref(q, k, v, causal=causal, scale=scale, kpm=kpm, seg=seg, dtype=dtype)
    g_pt = _grads(pt, (q, k, v), do)

    for name, a, r, p in [("out", out, ref, pt)] + [(n, a, r, p) for n, a, r, p in
                                                     zip(("dq", "dk", "dv"), g_out, g_ref, g_pt)]:
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = (a.double() - r).abs().max().item()
        err_pt = (p.double() - r).abs().max().item()
        assert err <= 2 * err_pt + SLACK[dtype], f"{name}: err {err:.3g} vs torch {err_pt:.3g}"

    ok = allowed_mask(sq, sk, b, causal, kpm, seg).any(-1)  # (b, 1, sq)
    empty = ~ok.to(DEVICE).expand(b, hq, sq)
    if empty.any():  # rows with nothing to attend to: exact zeros, zero gradient
        assert (out[empty] == 0).all()
        assert (g_out[0][empty] == 0).all()


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# The whole grid runs twice: the default backward (dQ by fp32 atomics) with masked pointer loads
# and the interpreter's 64x32 tiles, and the deterministic backward (separate dQ kernel) with
# tensor descriptors and 128x128 tiles, the Hopper default. On a GPU the autotuner picks tiles
# and descriptors follow the architecture, so only the backward variant is switched there.
VARIANTS = {"atomic": {}, "deterministic": {"BIGTRAIN_ATTN_TMA": "1", "tiles": (128, 128)}}


@pytest.fixture(params=list(VARIANTS))
def variant(request, monkeypatch):
    from bigtrain.kernels import _triton_attention as ta

    spec = dict(VARIANTS[request.param])
    if not CUDA:
        tiles = spec.pop("tiles", None)
        if tiles:
            monkeypatch.setattr(ta, "INTERPRET_BLOCK_M", tiles[0])
            monkeypatch.setattr(ta, "INTERPRET_BLOCK_N", tiles[1])
        for key, value in spec.items():
            monkeypatch.setenv(key, value)
    before = launches("dq")
    yield request.param
    ran_dq = launches("dq") > before
    assert ran_dq == (request.param == "deterministic"), "the other backward variant ran"

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, dtype, mask)
GRID = [
    (2, 2, 2, 1, 1, 16, False, F32, ""),
    (1, 2, 2, 1, 17, 64, True, F32, ""),  # one query, several keys (decoding shape)
    (2, 2, 2, 17, 17, 16, True, F16, ""),
    (1, 8, 2, 130, 130, 64, True, F16, ""),  # GQA 8:2
    (1, 4, 1, 257, 257, 16, False, F32, "pad"),  # MQA
    (2, 2, 1, 130, 257, 64, True, F16, "pad"),  # seq_q < seq_k, bottom-right causal
    (1, 2, 2, 257, 130, 32, True, F32, ""),  # seq_q > seq_k: first rows see no key
    (2, 4, 2, 130, 130, 128, False, F16, "padfull"),  # a fully padded batch row
    (2, 2, 2, 257, 257, 16, True, F32, "segpad"),  # documents + padding + causal
    (1, 4, 2, 130, 130, 64, False, F16, "seg"),  # documents, bidirectional
    (1, 2, 2, 130, 130, 32, True, F32, "segrand"),
    (2, 2, 2, 17, 130, 128, False, F32, ""),
    (1, 2, 2, 130, 17, 128, True, F16, "pad"),
    (1, 1, 1, 40, 40, 256, True, F32, ""),
    (1, 2, 2, 33, 33, 80, False, F16, "pad"),  # head_dim not a power of two
]


@pytest.mark.parametrize("b,hq,hk,sq,sk,d,causal,dtype,mask", GRID,
                         ids=[f"b{c[0]}h{c[1]}:{c[2]}-q{c[3]}k{c[4]}-d{c[5]}-{'c' if c[6] else 'nc'}-"
                              f"{str(c[7])[6:]}-{c[8] or 'nomask'}" for c in GRID])
def test_against_float64_reference(variant, b, hq, hk, sq, sk, d, causal, dtype, mask):
    check(b, hq, hk, sq, sk, d, causal, dtype, mask, deterministic=variant == "deterministic")


def test_softmax_scale_and_noncontiguous_q():
    check(1, 2, 2, 33, 33, 32, False, F32, "pad", scale=0.3, transpose_q=True)


BF16_GRID = [
    (2, 2, 2, 17, 17, 64, True, BF16, ""),
    (1, 8, 2, 130, 257, 128, True, BF16, "segpad"),
    (2, 4, 4, 257, 257, 64, False, BF16, "padfull"),
]


@gpu
@BF16_SKIP
@pytest.mark.parametrize("b,hq,hk,sq,sk,d,causal,dtype,mask", BF16_GRID)
def test_bf16(b, hq, hk, sq, sk, d, causal, dtype, mask):
    check(b, hq, hk, sq, sk, d, causal, dtype, mask)


# ------------------------------------------------------------------------------------ dropout


def test_dropout_same_seed_same_output():
    q, k, v = _inputs(1, 2, 2, 40, 40, 32, F32)
    torch.manual_seed(3)
    a = flash_attn(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = flash_attn(q, k, v, dropout_p=0.3)
    c = flash_attn(q, k, v, dropout_p=0.3)  # next seed
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dropout_kept_fraction():
    p = 0.25
    keep = flash_attn_dropout_mask(2, 3, 96, 80, p, seed=1234, device=DEVICE)
    assert keep.shape == (2, 3, 96, 80) and keep.dtype == torch.bool
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.015, frac
    # different heads get different masks
    assert not torch.equal(keep[0, 0], keep[0, 1])


@pytest.mark.parametrize("causal,mask,deterministic", [(False, "pad", False), (True, "segpad", True)])
def test_dropout_matches_reference_with_same_mask(causal, mask, deterministic):
    b, hq, hk, s, d, p = 2, 4, 2, 70, 32, 0.2
    q, k, v = _inputs(b, hq, hk, s, s, d, F32)
    kpm, seg = _masks(mask, b, s, s)
    do = torch.randn(b, hq, s, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    torch.manual_seed(11)
    seed = draw_dropout_seed()
    keep = flash_attn_dropout_mask(b, hq, s, s, p, seed=seed, device=DEVICE)
    torch.manual_seed(11)
    out = flash_attn(q, k, v, causal=causal, key_padding_mask=kpm, segment_ids=seg, dropout_p=p,
                     deterministic=deterministic)  # both backwards regenerate the same mask
    ref = attention_ref(q, k, v, causal=causal, kpm=kpm, seg=seg, dropout_keep=keep, dropout_p=p,
                        dtype=torch.float64)
    for a, r in zip((out, *_grads(out, (q, k, v), do)), (ref, *_grads(ref, (q, k, v), do))):
        torch.testing.assert_close(a.double(), r.double(), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------- interface


def test_errors_are_clear():
    q, k, v = _inputs(1, 3, 2, 8, 8, 16, F32)
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        flash_attn(q, k, v)
    q, k, v = _inputs(1, 2, 2, 8, 9, 16, F32)
    with pytest.raises(ValueError, match="self-attention"):
        flash_attn(q, k, v, segment_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attn(q, k, v, key_padding_mask=torch.ones(1, 8, dtype=torch.bool))


def test_descriptor_allocator_is_set_on_every_launching_thread(monkeypatch):
    # Triton keeps its allocator in a ContextVar (per thread); autograd launches CUDA backward
    # kernels from its own worker thread. Each thread that prepares a descriptor launch must see
    # bigtrain's scratch allocator, not only the first one (the CPU interpreter needs none, so
    # this pretends to compile for a GPU and checks the thread's allocator before any launch).
    import threading

    from bigtrain.kernels import _triton_attention as ta

    allocation = pytest.importorskip("triton.runtime._allocation")
    if not ta.HAS_DESCRIPTORS:
        pytest.skip(reason="this Triton has no tensor descriptors")
    monkeypatch.setattr(ta, "INTERPRET", False)
    monkeypatch.setenv("BIGTRAIN_ATTN_TMA", "1")
    t = torch.zeros(64, 64)
    seen = []

    def launch_prep():
        seen.append((ta._use_descriptors(t, t), allocation._allocator.get() is ta._scratch_allocator))

    launch_prep()  # the first thread ...
    for _ in range(2):  # ... then others, as autograd's worker and a checkpoint recomputation would be
        th = threading.Thread(target=launch_prep)
        th.start()
        th.join()
    assert seen == [(True, True)] * 3, seen


# ---------------------------------------------------------------------------------------- GPU


GPU_GRID = [
    (4, 16, 16, 1024, 1024, 64, True, F16, ""),
    (2, 16, 4, 2048, 2048, 128, True, BF16, "segpad"),
    (2, 8, 8, 1000, 1500, 128, False, BF16, "padfull"),
    (1, 8, 1, 4096, 4096, 64, True, F16, "seg"),
    (2, 4, 4, 513, 513, 256, True, F16, "pad"),
    (2, 4, 2, 300, 300, 32, False, F32, "pad"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("b,hq,hk,sq,sk,d,causal,dtype,mask", GPU_GRID)
def test_gpu_grid(b, hq, hk, sq, sk, d, causal, dtype, mask):
    check(b, hq, hk, sq, sk, d, causal, dtype, mask)


@gpu
@needs_cuda
def test_gpu_backward_is_deterministic():
    q, k, v = _inputs(2, 16, 4, 2048, 2048, 128, BF16)
    do = torch.randn_like(q)
    g1 = _grads(flash_attn(q, k, v, causal=True, deterministic=True), (q, k, v), do)
    g2 = _grads(flash_attn(q, k, v, causal=True, deterministic=True), (q, k, v), do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    # The atomic backward agrees with it to bf16 rounding: the same math, but two different
    # compiled kernels (the atomic one also forms dS K per tile), so not bit for bit.
    g3 = _grads(flash_attn(q, k, v, causal=True, deterministic=False), (q, k, v), do)
    for a, b in zip(g3, g1):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_packed_documents_both_backwards(deterministic):
    # Packed documents (random boundaries, ~300 per 4k row), bf16, d128: against float64.
    check(2, 8, 2, 4096, 4096, 128, True, BF16, "seg", deterministic=deterministic)


@gpu
@needs_cuda
def test_gpu_dropout_bf16_statistics():
    keep = flash_attn_dropout_mask(4, 16, 1024, 1024, 0.1, seed=99, device="cuda")
    assert abs(keep.float().mean().item() - 0.9) < 1e-3


def test_set_deterministic_picks_the_backward():
    # model.attn_deterministic reaches the kernels through set_deterministic (None = follow it).
    from bigtrain.kernels import set_deterministic

    q, k, v = _inputs(1, 2, 1, 20, 20, 16, F32)
    try:
        for flag in (True, False):
            set_deterministic(flag)
            before = launches("dq")
            flash_attn(q, k, v, causal=True).sum().backward()
            assert (launches("dq") > before) == flag
    finally:
        set_deterministic(False)


@pytest.mark.skipif(CUDA, reason="tile shapes are chosen by the autotuner on GPU")
@pytest.mark.parametrize("bm,bn", [(16, 64), (64, 16), (32, 32)])
def test_tile_shapes(monkeypatch, bm, bn):
    # The GPU autotuner picks among several (BLOCK_M, BLOCK_N); the causal-diagonal split and
    # the boundary handling must be right for each, including BLOCK_M != BLOCK_N.
    from bigtrain.kernels import _triton_attention as ta

    monkeypatch.setattr(ta, "INTERPRET_BLOCK_M", bm)
    monkeypatch.setattr(ta, "INTERPRET_BLOCK_N", bn)
    check(1, 2, 1, 45, 77, 16, True, F32, "pad")
    check(1, 2, 2, 77, 77, 16, True, F32, "segpad")
