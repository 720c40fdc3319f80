"""Compile the attention kernels ahead of time for NVIDIA targets, without a GPU.

Triton can lower a kernel to PTX and run ptxas for a given GPUTarget on a machine with no GPU;
this catches compile-time errors (type errors, unsupported ops, shared-memory overflow is NOT
caught: that is checked at launch) that the interpreter cannot see.
Usage: python tests/kernels/compile_check.py [--arch 90 80] [--dtype fp16 bf16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bigtrain.kernels import _triton_attention as ta  # noqa: E402


def _sig(fn, ptr_types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        elif name in ("sm_scale", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_all(arch: int, dtype: str, head_dim: int = 128, flags: dict | None = None) -> list[str]:
    """Every kernel of one training step for `arch`: forward, preprocess, dK/dV with atomic dQ
    (the default backward) and without, and the deterministic dQ kernel; tensor descriptors
    on sm_90+ as at run time."""
    target = GPUTarget("cuda", arch, 32)
    base = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, CAUSAL=True, HAS_KPM=True, HAS_SEG=True,
                HAS_DMASK=False, HAS_DROPOUT=True, DOT_PREC="tf32", USE_DESC=arch >= 90, I64=False)
    base.update(flags or {})
    fp = f"*{dtype}"
    masks = dict(KPM="*u8", SEG="*i32", SEGB="*i32", DMASK="*u8", SEED="*i64")
    done = []
    for kind, fn, ptrs, extra in [
        ("fwd", ta._attn_fwd_kernel, dict(Q=fp, K=fp, V=fp, O=fp, LSE="*fp32", COUNT="*i32", **masks),
         dict(COUNT_TILES=False)),
        ("dkdv", ta._attn_bwd_dkdv_kernel, dict(Q=fp, K=fp, V=fp, DO=fp, DK=fp, DV=fp, DQ="*fp32", LSE="*fp32",
                                                DELTA="*fp32", **masks), dict(ATOMIC_DQ=True)),
        ("dkdv", ta._attn_bwd_dkdv_kernel, dict(Q=fp, K=fp, V=fp, DO=fp, DK=fp, DV=fp, DQ=fp, LSE="*fp32",
                                                DELTA="*fp32", **masks), dict(ATOMIC_DQ=False)),
        ("dq", ta._attn_bwd_dq_kernel, dict(Q=fp, K=fp, V=fp, DO=fp, DQ=fp, LSE="*fp32", DELTA="*fp32", **masks), {}),
    ]:
        cfgs = ta._prune(ta._configs_for(kind, arch), {}, BLOCK_D=head_dim)
        c = cfgs[0]
        constexprs = dict(base, **extra, **c.kwargs)
        src = ASTSource(fn=fn, signature=_sig(fn, ptrs, constexprs), constexprs=constexprs)
        t = time.time()
        k = triton.compile(src, target=target, options={"num_warps": c.num_warps, "num_stages": c.num_stages})
        smem = k.metadata.shared
        done.append(f"sm_{arch} {dtype} d{head_dim} {kind} {extra} {c.kwargs} w{c.num_warps} s{c.num_stages} "
                    f"desc={base['USE_DESC']}: ok, shared={smem} B, {time.time() - t:.1f}s")
    pre_c = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=64, I64=False)
    pre = ASTSource(fn=ta._bwd_preprocess_kernel,
                    signature=_sig(ta._bwd_preprocess_kernel, dict(O=fp, DO=fp, DELTA="*fp32"), pre_c),
                    constexprs=pre_c)
    triton.compile(pre, target=target)
    done.append(f"sm_{arch} {dtype} preprocess: ok")
    return done


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    a = ap.parse_args()
    for arch in a.arch:
        for dt in a.dtype:
            for hd in a.head_dim:
                for line in compile_all(arch, dt, hd):
                    print(line, flush=True)
    sys.exit(0)
