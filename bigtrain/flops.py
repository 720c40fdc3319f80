"""The FLOP convention and the device's peak: one definition of MFU for `bigtrain bench train`
and for the numbers every training run logs (train/mfu in metrics.jsonl).

Per token, 6 x parameters (forward 2, backward 4) plus attention's 12 x layers x hidden x seq_len
(QK^T and AV, forward and backward), not halved for causal masking. MFU = achieved FLOP/s per
device / the device's peak: a table of GPUs (H100/H200 SXM 989 TFLOP/s dense bf16, A100 312),
`train.peak_tflops` or `--peak-tflops` to override; on CPU the peak is this machine's measured
fp32 matmul throughput (say so when quoting it). With LoRA the frozen weights get no weight
gradients, so the real work is nearer 4 x parameters: the same formula keeps runs comparable.
"""

from __future__ import annotations

import time
from typing import Optional

from bigtrain.errors import UserError

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
FLOP_FORMULA = "6 x params + 12 x layers x hidden x seq_len FLOPs per token (attention not halved for causal)"


def flops_per_token(n_params: int, hf_config, seq_len: int) -> float:
    layers = getattr(hf_config, "n_layer", None) or hf_config.num_hidden_layers
    hidden = getattr(hf_config, "n_embd", None) or hf_config.hidden_size
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


def device_peak_flops(cuda: bool, override_tflops: Optional[float], flag: str = "--peak-tflops", n: int = 1024) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from); on CPU an n x n fp32 matmul's."""
    if override_tflops:
        return override_tflops * 1e12, flag
    import torch

    if cuda:
        name = torch.cuda.get_device_name()
        for key, tf in PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12, f"{name}: {tf:g} TFLOP/s dense bf16 (table)"
        raise UserError(f"no peak FLOP/s known for {name}; pass {flag}")
    # A private generator: the global one is the training's, and a resumed run must draw from it
    # exactly what the straight run drew.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best, f"CPU: measured fp32 {n}x{n} matmul ({torch.get_num_threads()} threads)"


def peak_memory(cuda: bool, reset: bool = False) -> dict[str, float]:
    """Peak memory in GB: the accelerator's allocated and reserved (since the last reset), or on
    CPU the process's peak resident set (since it started)."""
    if cuda:
        import torch

        out = {"mem_allocated_gb": torch.cuda.max_memory_allocated() / 1e9, "mem_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return out
    import resource

    return {"mem_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # Linux: KiB
