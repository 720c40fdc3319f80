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
    target = GPUTarget("cuda", arch, 32)
    flags = flags or {}
    base = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, CAUSAL=True, HAS_KPM=True, HAS_SEG=True,
                HAS_DMASK=False, HAS_DROPOUT=True, DOT_PREC="tf32")
    base.update(flags)
    fp = f"*{dtype}"
    done = []
    for kind, fn, ptrs in [
        ("fwd", ta._attn_fwd_kernel, dict(Q=fp, K=fp, V=fp, O=fp, LSE="*fp32", KPM="*u8", SEG="*i32", DMASK="*u8")),
        ("dkdv", ta._attn_bwd_dkdv_kernel, dict(Q=fp, K=fp, V=fp, DO=fp, DK=fp, DV=fp, LSE="*fp32", DELTA="*fp32",
                                                KPM="*u8", SEG="*i32", DMASK="*u8")),
        ("dq", ta._attn_bwd_dq_kernel, dict(Q=fp, K=fp, V=fp, DO=fp, DQ=fp, LSE="*fp32", DELTA="*fp32",
                                            KPM="*u8", SEG="*i32", DMASK="*u8")),
    ]:
        cfgs = ta._configs_for(kind, arch)
        cfgs = ta._prune(cfgs, {}, BLOCK_D=head_dim)
        c = cfgs[0]
        constexprs = dict(base, **c.kwargs)
        src = ASTSource(fn=fn, signature=_sig(fn, ptrs, constexprs), constexprs=constexprs)
        t = time.time()
        k = triton.compile(src, target=target, options={"num_warps": c.num_warps, "num_stages": c.num_stages})
        smem = k.metadata.shared
        done.append(f"sm_{arch} {dtype} d{head_dim} {kind} {c.kwargs} w{c.num_warps} s{c.num_stages}: "
                    f"ok, shared={smem} B, {time.time() - t:.1f}s")
    pre = ASTSource(fn=ta._bwd_preprocess_kernel,
                    signature=_sig(ta._bwd_preprocess_kernel, dict(O=fp, DO=fp, DELTA="*fp32"),
                                   dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=64)),
                    constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=64))
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
