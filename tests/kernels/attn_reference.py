"""Reference attention for the kernel tests (plain torch, any dtype)."""

from __future__ import annotations

import torch


def allowed_mask(sq: int, sk: int, batch: int, causal: bool, kpm: torch.Tensor | None,
                 seg: torch.Tensor | None) -> torch.Tensor:
    """(batch, 1, sq, sk) bool: True where query i may attend to key j."""
    ok = torch.ones(batch, 1, sq, sk, dtype=torch.bool)
    if causal:  # bottom-right aligned
        ok &= torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    if kpm is not None:
        ok &= kpm.cpu()[:, None, None, :]
    if seg is not None:
        seg = seg.cpu()
        ok &= seg[:, None, :, None] == seg[:, None, None, :]
    return ok


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None, kpm: torch.Tensor | None = None,
                  seg: torch.Tensor | None = None, dropout_keep: torch.Tensor | None = None,
                  dropout_p: float = 0.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention computed in `dtype` (default: the inputs' dtype); rows with no allowed key
    give zeros (and zero gradients), matching flash_attn's contract."""
    dtype = dtype or q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else d ** -0.5)
    ok = allowed_mask(sq, sk, b, causal, kpm, seg).to(q.device)
    row_ok = ok.any(-1, keepdim=True)
    s = s.masked_fill(~ok, float("-inf")).masked_fill(~row_ok, 0.0)
    p = torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype) * row_ok
    if dropout_keep is not None:
        p = p * dropout_keep.to(p.device, dtype) / (1.0 - dropout_p)
    return p @ v
