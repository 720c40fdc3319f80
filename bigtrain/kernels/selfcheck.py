"""The fused kernel's self-check: is ``bigtrain_triton`` right on *this* GPU before a run trusts it?

No GPU model is ever fully covered by the suite (tests run the kernels in Triton's interpreter on
CPU; the GPU tests run where a GPU was lent). So the first time a run would use the kernel on a
(GPU model, torch, Triton, bigtrain, dtype, head dim, GQA ratio) combination, it runs a small grid
of forward + backward cases in the training dtype and compares them with a float32 reference:

    case            what it covers
    causal          the causal mask, a sequence that is not a multiple of any tile size
    packed          causal + packed documents (segment ids), the trainer's pretraining path
    bidirectional   no causal mask, a key padding mask (BERT-style encoders)

Criterion (FlashAttention's test rule): for the output and each of dQ, dK, dV,

    max|kernel - ref32|  <=  2 * max|sdpa_dtype - ref32|  +  slack[dtype] * max|ref32|

i.e. the kernel may be at most twice as far from the float32 reference as torch's own SDPA in the
same dtype, plus a small slack relative to the values' size. A compile error, a launch error or a
non-finite value fails the case with its message. The verdict is cached as a small JSON file per
combination under ``<cache>/attn-check/``, so the check costs seconds once per machine and
version, not per run.

What the trainer does with the verdict (bigtrain/trainer.py, :func:`choose_attention`):
``model.attn_implementation: auto`` falls back to SDPA with one warning line naming the failing
case; ``bigtrain_triton`` asked for explicitly stops before training with one ``error:`` line.
``bigtrain bench attention --check`` runs the same check on demand. ``BIGTRAIN_FAULT=
attn_check_fail`` fails the first case (bigtrain/faults.py), so both outcomes are tested on CPU;
a verdict under a fault is never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .attention import flash_attn

SLACK = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    causal: bool
    packed: bool = False
    padded: bool = False


CASES = (Case("causal", True), Case("packed", True, packed=True), Case("bidirectional", False, padded=True))


@dataclass
class Verdict:
    ok: bool
    key: dict
    results: list = field(default_factory=list)  # [{"case", "ok", "error", "seconds"}]
    cached: bool = False

    @property
    def failed(self) -> Optional[dict]:
        return next((r for r in self.results if not r["ok"]), None)

    def why(self) -> str:
        """One line: which case failed, how, and on what."""
        f = self.failed
        k = self.key
        return (f"the fused-attention self-check failed on {k['device']} ({k['dtype']}, head_dim {k['head_dim']}, "
                f"GQA {k['gqa']}): case '{f['case']}': {f['error']}") if f else "passed"


def check_key(device: torch.device, dtype: torch.dtype, head_dim: int, gqa: int) -> dict:
    """The combination a verdict holds for: a new GPU model or any version change checks again."""
    import bigtrain

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        try:
            name = torch.cuda.get_device_name(device)
        except (AssertionError, RuntimeError) as e:  # no usable CUDA: the cases say so too
            name = f"{device} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    else:
        name = "cpu (Triton interpreter)"
    dt = next(k for k, v in DTYPES.items() if v == dtype)
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "bigtrain": bigtrain.__version__,
            "dtype": dt, "head_dim": head_dim, "gqa": gqa}


def _inputs(case: Case, b: int, hq: int, hk: int, s: int, d: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1234)
    q, k, v, do = (torch.randn(b, h, s, d, generator=g) for h in (hq, hk, hk, hq))
    kpm = seg = None
    if case.padded:
        kpm = torch.arange(s)[None, :] < torch.tensor([s, s - s // 3])[:b, None]
    if case.packed:  # three documents per row, boundaries that fall inside tiles
        seg = (torch.arange(s)[None, :] >= torch.tensor([[s // 4], [s // 3]])[:b]).long() + (torch.arange(s) >= (2 * s) // 3).long()
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [t.to(device, dtype) for t in (q, k, v, do)], to(kpm), to(seg)


def _reference(q, k, v, causal: bool, kpm, seg, dtype: torch.dtype):
    """torch SDPA in `dtype` on an explicit boolean mask (GQA by repeating K/V heads)."""
    s = q.shape[2]
    allowed = torch.ones(q.shape[0], 1, s, s, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if kpm is not None:
        allowed &= kpm[:, None, None, :]
    if seg is not None:
        allowed &= seg[:, None, :, None] == seg[:, None, None, :]
    rep = q.shape[1] // k.shape[1]
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed)
    # Rows with no allowed key (none here) would be NaN in SDPA; the kernel returns zeros.
    return out, (q, k, v)


def _errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    return [float((g.detach().float() - r.detach().float()).abs().max()) for g, r in zip(got, ref)]


def run_case(case: Case, dtype: torch.dtype, head_dim: int, heads_q: int, heads_kv: int, device: torch.device,
             seq: int = 192) -> Optional[str]:
    """None when the kernel passes `case`, else why (one line)."""
    from bigtrain.faults import attn_check_fails

    if attn_check_fails() and case == CASES[0]:
        return "mismatch forced by BIGTRAIN_FAULT=attn_check_fail"
    try:  # a device that cannot take the tensors fails the case like a kernel that cannot launch
        (q, k, v, do), kpm, seg = _inputs(case, 2, heads_q, heads_kv, seq, head_dim, device, dtype)
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attn(*qkv, causal=case.causal, key_padding_mask=kpm, segment_ids=seg)
        got = [out, *torch.autograd.grad(out, qkv, do)]
    except Exception as e:  # a compile or launch error: the message says which
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    refs = []
    for ref_dtype in (torch.float32, dtype):
        ref, inputs = _reference(q, k, v, case.causal, kpm, seg, ref_dtype)
        refs.append([ref, *torch.autograd.grad(ref, inputs, do.to(ref_dtype))])
    ref32, ref_dt = refs
    if not all(bool(torch.isfinite(t).all()) for t in got):
        return "non-finite values in the output or the gradients"
    for name, e_kernel, e_sdpa, r in zip(("output", "dQ", "dK", "dV"), _errors(got, ref32), _errors(ref_dt, ref32), ref32):
        allowed = 2 * e_sdpa + SLACK[dtype] * float(r.detach().abs().max())
        if e_kernel > allowed:
            return f"{name} differs from the float32 reference by {e_kernel:.3g} (allowed {allowed:.3g})"
    return None


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "attn-check" / f"{digest}.json"


def verify(dtype: torch.dtype, head_dim: int, heads_q: int, heads_kv: int, device: torch.device,
           cache_dir: Optional[Path] = None, seq: int = 192, report: Optional[Callable[[dict], None]] = None) -> Verdict:
    """The cached verdict of this combination, else run every case (and cache the verdict)."""
    from bigtrain.faults import attn_check_fails

    key = check_key(device, dtype, head_dim, heads_q // heads_kv)
    path = cache_path(cache_dir, key) if cache_dir is not None else None
    faulted = attn_check_fails()
    if path is not None and path.is_file() and not faulted:
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return Verdict(saved["ok"], key, saved["results"], cached=True)
        except (OSError, ValueError, KeyError):
            pass  # unreadable: check again and rewrite it
    results = []
    for case in CASES:
        t0 = time.perf_counter()
        error = run_case(case, dtype, head_dim, heads_q, heads_kv, device, seq)
        results.append({"case": case.name, "ok": error is None, "error": error, "seconds": round(time.perf_counter() - t0, 2)})
        if report is not None:
            report(results[-1])
    verdict = Verdict(all(r["ok"] for r in results), key, results)
    if path is not None and not faulted:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks of one node write at once
        tmp.write_text(json.dumps({k: v for k, v in asdict(verdict).items() if k != "cached"}, indent=2))
        os.replace(tmp, path)
    return verdict
