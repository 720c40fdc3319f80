"""`bigtrain bench attention --static`: what the compiler says about every kernel config, no GPU needed.

Triton lowers a kernel to PTX and assembles it with ptxas for any NVIDIA target on a machine
without a GPU. For each architecture, dtype and head_dim this compiles every autotune candidate of
every kernel of a training step (forward; dK/dV with atomic dQ, the default backward, and
without; the deterministic dQ kernel) in one variant (``--features train``: causal with packed
documents, bigtrain's pretraining path; ``all``: padding mask and dropout too, the most registers
any variant needs), runs ``ptxas -v`` on its PTX and reports per config:

    registers per thread, bytes spilled (stores + loads), shared memory per block (Triton's
    dynamic allocation), and whether the config fits the architecture:
        shared memory <= the per-block limit (sm_90: 227 KB, sm_80: 163 KB)
        registers x threads (warps x 32) <= 65,536 (one block per SM at least)

The first config of each list is the default (autotuning off, and the autotuner's first trial):
a default must fit and must not spill (tests/kernels/test_kernels_compile.py asserts both for
sm_90). What the report cannot see: speed, and anything that happens only at launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from typing import Any

# Per-block shared memory (opt-in maximum) and registers per SM, from NVIDIA's CUDA C
# Programming Guide, "Compute capabilities" table.
LIMITS = {90: {"smem": 227 * 1024, "regs": 65536}, 80: {"smem": 163 * 1024, "regs": 65536},
          86: {"smem": 99 * 1024, "regs": 65536}, 89: {"smem": 99 * 1024, "regs": 65536}}


def _signature(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in ("sm_scale", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _kernels(ta: Any, dtype: str) -> list[tuple[str, str, Any, dict, dict]]:
    """(name, kind of its config list, kernel, pointer types, extra constexprs) of one training step."""
    fp = f"*{dtype}"
    masks = dict(KPM="*u8", SEG="*i32", SEGB="*i32", DMASK="*u8", SEED="*i64")
    grads = dict(Q=fp, K=fp, V=fp, DO=fp, DK=fp, DV=fp, LSE="*fp32", DELTA="*fp32", **masks)
    return [
        ("fwd", "fwd", ta._attn_fwd_kernel, dict(Q=fp, K=fp, V=fp, O=fp, LSE="*fp32", COUNT="*i32", **masks), dict(COUNT_TILES=False)),
        ("dkdv+atomic dq", "dkdv", ta._attn_bwd_dkdv_kernel, dict(grads, DQ="*fp32"), dict(ATOMIC_DQ=True)),
        ("dkdv", "dkdv", ta._attn_bwd_dkdv_kernel, dict(grads, DQ=fp), dict(ATOMIC_DQ=False)),
        ("dq", "dq", ta._attn_bwd_dq_kernel, dict(Q=fp, K=fp, V=fp, DO=fp, DQ=fp, LSE="*fp32", DELTA="*fp32", **masks), {}),
    ]


def _ptxas_info(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes as ptxas -v reports them for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    stores = re.search(r"(\d+) bytes spill stores", r.stderr)
    loads = re.search(r"(\d+) bytes spill loads", r.stderr)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_bytes": (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0)}


def compile_one(ta: Any, fn: Any, pointers: dict, constexprs: dict, config: Any, arch: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(constexprs, **config.kwargs)
    src = ASTSource(fn=fn, signature=_signature(fn, pointers, consts), constexprs=consts)
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    info = _ptxas_info(k.asm["ptx"], arch)
    info["shared_bytes"] = int(k.metadata.shared)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    limit = LIMITS.get(arch, LIMITS[80])
    threads = 32 * config.num_warps
    info["fits"] = info["shared_bytes"] <= limit["smem"] and info["registers"] * threads <= limit["regs"]
    return info


# Which kernel variant to compile. "train": bigtrain's pretraining path (causal, packed documents,
# no padding mask, no attention dropout: Llama's default). "all": every feature on (padding mask and
# Philox dropout too), the most registers any variant needs.
FEATURES = {
    "train": dict(CAUSAL=True, HAS_KPM=False, HAS_SEG=True, HAS_DMASK=False, HAS_DROPOUT=False),
    "all": dict(CAUSAL=True, HAS_KPM=True, HAS_SEG=True, HAS_DMASK=False, HAS_DROPOUT=True),
}


def static_report(archs: list[int], dtypes: list[str], head_dims: list[int], defaults_only: bool, show=print,
                  features: str = "train") -> list[dict[str, Any]]:
    """One row per (arch, dtype, head_dim, kernel, config); `show` gets each row's line as it comes."""
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: compile for real
    from bigtrain.kernels import _triton_attention as ta

    if ta.INTERPRET:
        raise RuntimeError("--static compiles for real: run it in a process without TRITON_INTERPRET=1")
    rows = []
    show(f"{'arch':6} {'dtype':5} {'hdim':>4} {'kernel':15} {'config':22} {'regs':>5} {'spill B':>8} {'smem KB':>8}  verdict")
    for arch in archs:
        for dtype in dtypes:
            for hd in head_dims:
                base = dict(HEAD_DIM=hd, BLOCK_D=hd, DOT_PREC="tf32", USE_DESC=arch >= 90, I64=False, **FEATURES[features])
                for name, kind, fn, pointers, extra in _kernels(ta, dtype):
                    configs = ta._prune(ta._configs_for(kind, arch), {}, BLOCK_D=hd)
                    for i, c in enumerate(configs[:1] if defaults_only else configs):
                        row = {"arch": arch, "dtype": dtype, "head_dim": hd, "kernel": name, "default": i == 0,
                               "config": f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"}
                        try:
                            row.update(compile_one(ta, fn, pointers, dict(base, **extra), c, arch))
                        except Exception as e:  # noqa: BLE001 - a config that does not compile is a finding
                            row.update(fits=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
                        rows.append(row)
                        show(_line(row))
    return rows


def _line(r: dict[str, Any]) -> str:
    cfg = r["config"] + (" (default)" if r["default"] else "")
    if "error" in r:
        return f"sm_{r['arch']:<3} {r['dtype']:5} {r['head_dim']:4} {r['kernel']:15} {cfg:22} does not compile: {r['error']}"
    verdict = ("fits" if r["fits"] else "DOES NOT FIT") + (f", spills {r['spill_bytes']} B" if r["spill_bytes"] else "")
    return (f"sm_{r['arch']:<3} {r['dtype']:5} {r['head_dim']:4} {r['kernel']:15} {cfg:22} {r['registers']:5} "
            f"{r['spill_bytes']:8} {r['shared_bytes'] / 1024:8.1f}  {verdict}")
