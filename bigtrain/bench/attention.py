"""`bigtrain bench attention`: TFLOP/s of bigtrain's Triton attention vs torch SDPA and eager.

FLOPs are counted as FlashAttention does: forward = 4 * batch * heads * seq_q * seq_k * head_dim
(two matmuls), halved when causal; backward = 2.5 x forward; forward+backward = 3.5 x forward.
Heads = hidden / head_dim with hidden 2048 and batch = tokens / seq (16k tokens by default).

`bigtrain_triton` is the default backward (dQ by fp32 atomics), `bigtrain_triton_det` the
deterministic one (model.attn_deterministic). `--docs N` adds packed rows of N equal documents
(segment ids) for the bigtrain backends only (SDPA has no document mask without a dense one);
their FLOPs count only the attention the documents need, 4 * batch * heads * head_dim *
sum(len_i^2) (halved if causal), so a kernel that skips cross-document tiles shows the same
TFLOP/s as on one document and one that does not shows ~N times less.

Without CUDA it runs a tiny smoke configuration under the Triton interpreter (TRITON_INTERPRET=1
is set before Triton is imported): the numbers then only show that the harness works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

MODES = ("fwd", "bwd", "fwd+bwd")
BACKENDS = ("bigtrain_triton", "bigtrain_triton_det", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "eager")
FLOP_NOTE = ("FLOPs as FlashAttention: fwd = 4*batch*heads*seq_q*seq_k*head_dim (halved if causal), "
             "bwd = 2.5 x fwd, fwd+bwd = 3.5 x fwd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `bigtrain bench attention`."""
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths (seq_q = seq_k)")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq, kept constant")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None,
                        help="default: 64 128 (--static: 64 128 256)")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--eager-max-seq", type=int, default=8192,
                        help="skip eager above this length (it materialises seq x seq scores)")
    parser.add_argument("--docs", type=int, nargs="+", default=[1],
                        help="documents per row (segment ids); >1 runs the bigtrain backends only")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG plot (matplotlib, Agg)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny configuration (the default without CUDA, under the Triton interpreter)")
    parser.add_argument("--check", action="store_true",
                        help="run the kernel's self-check instead (what a run does before it trusts the kernel): "
                             "one line per case, exit 0 only if every case passes; --dtypes, --head-dims, "
                             "--gqa choose the grid")
    parser.add_argument("--gqa", type=int, nargs="+", default=[1, 4], help="--check: query heads per key/value head")
    parser.add_argument("--static", action="store_true",
                        help="compile every autotune config of every kernel for --arch without a GPU and print "
                             "registers, spills, shared memory and whether it fits (bigtrain/bench/attention_static.py)")
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="--static: compute capabilities (90 = H100/H200, 80 = A100)")
    parser.add_argument("--defaults", action="store_true", help="--static: only each list's default (first) config")
    parser.add_argument("--features", choices=["train", "all"], default="train",
                        help="--static: the kernel variant (train: causal + packed documents; all: padding mask and dropout too)")


def _flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, mode: str, docs: int = 1) -> float:
    # N equal documents: N * (seq / N)^2 = seq^2 / N useful query-key pairs per row.
    f = 4.0 * batch * heads * seq * seq / docs * head_dim * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def _attention_fn(backend: str, causal: bool, docs: int = 1) -> Callable[..., Any] | None:
    import torch
    import torch.nn.functional as F

    if backend.startswith("bigtrain_triton"):
        from bigtrain.kernels import flash_attn

        det = backend.endswith("_det")

        def fused(q, k, v):
            seg = None
            if docs > 1:
                seq = q.shape[2]
                seg = (torch.arange(seq, device=q.device) * docs // seq)[None].expand(q.shape[0], seq)
            return flash_attn(q, k, v, causal=causal, segment_ids=seg, deterministic=det)
        return fused
    if docs > 1:
        return None
    if backend == "eager":
        def eager(q, k, v):
            s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
            if causal:
                n = q.shape[-2]
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v
        return eager
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
            "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}[backend]
    if not hasattr(SDPBackend, name):
        return None
    be = getattr(SDPBackend, name)

    def sdpa(q, k, v):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return sdpa


def _timer(cuda: bool) -> Callable[[Callable[[], Any], int, int], float]:
    import torch

    def measure(fn: Callable[[], Any], warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps
    return measure


def _bench_one(fn: Callable[..., Any], q: Any, k: Any, v: Any, mode: str, measure: Any, warmup: int,
               reps: int) -> float:
    import torch

    do = torch.randn_like(q)
    if mode == "fwd":
        with torch.no_grad():
            return measure(lambda: fn(q, k, v), warmup, reps)
    if mode == "bwd":
        out = fn(q, k, v)
        return measure(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), warmup, reps)
    return measure(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), warmup, reps)


class _Plan(NamedTuple):
    """What one run measures, and how (the smoke configuration or the command line's)."""

    seqlens: list[int]
    head_dims: list[int]
    tokens: int
    hidden: int
    dtypes: list[str]
    backends: list[str]
    warmup: int
    reps: int
    modes: list[str]
    eager_max_seq: int
    cuda: bool
    measure: Callable[[Callable[[], Any], int, int], float]


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; prints a table, optionally writes JSON and a PNG. Returns an exit code."""
    if args.static:
        return run_static(args)
    if args.head_dims is None:
        args.head_dims = [64, 128]
    cuda_visible = _cuda_available()
    smoke = args.smoke or not cuda_visible
    if not cuda_visible:
        # Must precede the first flash_attn call: the kernels read it when they are defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.check:
        return run_check(args, cuda_visible)
    plan = _plan(args, smoke, cuda_visible)
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    env = _environment(smoke, cuda_visible)
    _print_header(env, smoke, args.modes)
    results: list[dict[str, Any]] = []
    for dt_name in plan.dtypes:
        for causal in causals:
            for hd in plan.head_dims:
                for seq in plan.seqlens:
                    for docs in args.docs:
                        results += _bench_shape(plan, dt_name, causal, hd, seq, docs)
                        if args.json:  # after every shape: a run cut short keeps what it measured
                            with open(args.json, "w") as f:
                                json.dump({"env": env, "results": results}, f, indent=1)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot:
        _plot(results, args.modes, args.plot, env)
        print(f"wrote {args.plot}")
    return 0


def run_static(args: argparse.Namespace) -> int:
    """`--static`: exit 0 only when every default config compiles and fits; spills are reported."""
    from bigtrain.bench.attention_static import static_report

    print(f"# static report: kernel variant '{args.features}', compiled for sm_{' sm_'.join(map(str, args.arch))} without a GPU")
    rows = static_report(args.arch, args.dtypes, args.head_dims or [64, 128, 256], args.defaults,
                         show=lambda line: print(line, flush=True), features=args.features)
    bad = [r for r in rows if r["default"] and not r["fits"]]
    spill = [f"{r['kernel']} d{r['head_dim']} ({r['spill_bytes']} B)" for r in rows if r["default"] and r.get("spill_bytes")]
    misfits = sum(not r["fits"] for r in rows)
    print(f"static: {len(rows)} configs, {misfits} do not fit; defaults: "
          + ("every one fits" if not bad else f"{len(bad)} do NOT fit") + "; "
          + (f"defaults that spill: {', '.join(spill)}" if spill else "no default spills"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"static": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if not bad else 1


def run_check(args: argparse.Namespace, cuda_visible: bool) -> int:
    """`--check`: the self-check of bigtrain/kernels/selfcheck.py on every (dtype, head dim, GQA)
    asked for, never from the cache. Without CUDA it runs in the interpreter on small shapes, and
    bf16 (wrong there: see docs/kernels.md) is left out."""
    import torch

    from bigtrain.kernels.selfcheck import DTYPES, verify

    device = torch.device("cuda") if cuda_visible else torch.device("cpu")
    dtypes = [d for d in args.dtypes if cuda_visible or d != "bf16"] or ["fp32"]
    env = _environment(False, cuda_visible)
    print(f"# attention self-check on {env['device']}; torch {env['torch']}, triton {env['triton']}")
    failed = 0
    for dt in dtypes:
        for hd in args.head_dims:
            for gqa in args.gqa:
                def show(r: dict, dt=dt, hd=hd, gqa=gqa) -> None:
                    verdict = "pass" if r["ok"] else f"FAIL: {r['error']}"
                    print(f"{dt:5} head_dim {hd:3} gqa {gqa}  {r['case']:13} {r['seconds']:6.2f} s  {verdict}", flush=True)
                v = verify(DTYPES[dt], hd, 2 * gqa, 2, device, None, seq=192 if cuda_visible else 128, report=show)
                failed += sum(not r["ok"] for r in v.results)
    print(f"self-check: {'every case passed' if not failed else f'{failed} case(s) FAILED'}")
    return 0 if not failed else 1


def _plan(args: argparse.Namespace, smoke: bool, cuda_visible: bool) -> _Plan:
    """The smoke configuration (tiny shapes, one repetition) or the command line's."""
    if smoke:
        seqlens, head_dims, tokens, hidden = [64], [32], 64, 64
        dt_names = ["fp32"] if not cuda_visible else args.dtypes[:1]
        backends = [b for b in args.backends if b in ("bigtrain_triton", "bigtrain_triton_det", "eager")] + (
            [] if cuda_visible else ["sdpa_math"])
        warmup, reps = 1, 1
    else:
        seqlens, head_dims, tokens, hidden = args.seqlens, args.head_dims, args.tokens, args.hidden
        dt_names, backends, warmup, reps = args.dtypes, args.backends, args.warmup, args.reps
    return _Plan(seqlens, head_dims, tokens, hidden, dt_names, backends, warmup, reps, args.modes, args.eager_max_seq,
                 cuda_visible, _timer(cuda_visible))


def _environment(smoke: bool, cuda_visible: bool) -> dict[str, Any]:
    """Device, versions and settings, for the header, the JSON and the plot's title."""
    import torch

    env = {"device": torch.cuda.get_device_name() if cuda_visible else "cpu (Triton interpreter)",
           "torch": torch.__version__, "smoke": smoke, "flops": FLOP_NOTE,
           "autotune": os.environ.get("BIGTRAIN_ATTN_AUTOTUNE", "1") not in ("0", "false", "off", "no")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _print_header(env: dict[str, Any], smoke: bool, modes: list[str]) -> None:
    print(f"# attention benchmark on {env['device']}; torch {env['torch']}, triton {env['triton']}")
    print(f"# {FLOP_NOTE}")
    print(f"# bigtrain_triton autotuning: {'on' if env['autotune'] else 'off (BIGTRAIN_ATTN_AUTOTUNE=0)'}")
    if smoke:
        print("# smoke configuration: numbers are not performance figures")
    header = f"{'dtype':5} {'causal':6} {'hdim':>4} {'seq':>6} {'docs':>4} {'batch':>5} {'heads':>5} {'backend':19} " + \
        " ".join(f"{m + ' TF/s':>12}" for m in modes)
    print(header)


def _bench_shape(plan: _Plan, dt_name: str, causal: bool, hd: int, seq: int, docs: int = 1) -> list[dict[str, Any]]:
    """Every backend on one shape: a result row each, printed as a table line as it comes."""
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    device = "cuda" if plan.cuda else "cpu"
    batch, heads = max(1, plan.tokens // seq), max(1, plan.hidden // hd)
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda: torch.randn(batch, heads, seq, hd, device=device, generator=g,  # noqa: E731
                             dtype=dtypes[dt_name]).requires_grad_()
    q, k, v = mk(), mk(), mk()
    rows = []
    for backend in plan.backends:
        row = {"dtype": dt_name, "causal": causal, "head_dim": hd, "seq": seq, "docs": docs, "batch": batch,
               "heads": heads, "backend": backend}
        fn = _attention_fn(backend, causal, docs)
        if fn is None and docs > 1:
            continue
        for mode in plan.modes:
            tflops = None
            if fn is not None and not (backend == "eager" and seq > plan.eager_max_seq):
                tflops, error = _measure_tflops(plan, fn, (q, k, v), mode, _flops(batch, heads, seq, hd, causal, mode, docs))
                if error is not None:
                    row[f"{mode}_error"] = error
            row[mode] = tflops
        if backend.startswith("bigtrain") and plan.cuda:
            row["tuned"] = _tuned_configs()  # what the autotuner chose for this shape (gpu_check's JSON)
        rows.append(row)
        cells = " ".join(f"{row[m]:12.2f}" if row[m] is not None else f"{'-':>12}" for m in plan.modes)
        print(f"{dt_name:5} {str(causal):6} {hd:4d} {seq:6d} {docs:4d} {batch:5d} {heads:5d} {backend:19} {cells}", flush=True)
    return rows


def _tuned_configs() -> dict[str, str]:
    """Each kernel's autotuned config for the shape just run ({} when autotuning is off or on CPU)."""
    ta = sys.modules.get("bigtrain.kernels._triton_attention")
    tuned = getattr(ta, "_tuned", {}) if ta is not None else {}
    return {kind: str(k.best_config) for kind, k in tuned.items() if getattr(k, "best_config", None) is not None}


def _measure_tflops(plan: _Plan, fn: Callable[..., Any], qkv: tuple[Any, Any, Any], mode: str,
                    flops: float) -> tuple[float | None, str | None]:
    """(TFLOP/s, None), or (None, the error's first line) where the backend fails on this shape or device."""
    import torch

    try:
        sec = _bench_one(fn, *qkv, mode, plan.measure, plan.warmup, plan.reps)
        return flops / sec / 1e12, None
    except (RuntimeError, torch.OutOfMemoryError) as e:  # backend unsupported here
        error = str(e).splitlines()[0][:200] if str(e) else repr(e)
        if plan.cuda:
            torch.cuda.empty_cache()
        return None, error


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _plot(results: list[dict[str, Any]], modes: list[str], path: str, env: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["causal"], r["head_dim"]) for r in results}, key=str)
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(4.5 * len(modes), 3.2 * len(panels)),
                             squeeze=False)
    for i, (dt, causal, hd) in enumerate(panels):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for backend, docs in dict.fromkeys((r["backend"], r.get("docs", 1)) for r in results):
                pts = [(r["seq"], r[mode]) for r in results if (r["dtype"], r["causal"], r["head_dim"],
                                                                r["backend"], r.get("docs", 1)) == (dt, causal, hd, backend, docs)
                       and r[mode] is not None]
                if pts:
                    label = backend + (f", {docs} docs" if docs > 1 else "")
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if docs == 1 else "s", label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode} {dt} {'causal' if causal else 'full'} d={hd}", fontsize=9)
            ax.set_xlabel("seq")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"attention on {env['device']} (torch {env['torch']}, triton {env['triton']})"
                 + (" - SMOKE, not a measurement" if env["smoke"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain bench attention", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
