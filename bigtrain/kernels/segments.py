"""Packed documents' bounds, shared by the public entry point (attention.py) and the Triton kernels
(_triton_attention.py), which import it from here rather than from each other."""

from __future__ import annotations

import torch


def document_bounds(segment_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 2, seq) int32 per-token document bounds: row 0 the first position of the token's
    document, row 1 one past its last. A batch row whose ids do not each form one contiguous run
    (e.g. ids 0, 1, 0) gets first = -1 and end = seq: the kernels then visit and mask every tile.

    Device tensor ops only (no host read), so it is safe on the training hot path. The bounds
    depend only on the batch's segment ids: the trainer computes them once per batch and passes
    them to every layer (``segment_bounds=``, a forward keyword like ``segment_ids``); without
    them each attention call computes its own.
    """
    seg = segment_ids
    B, S = seg.shape
    pos = torch.arange(S, device=seg.device, dtype=torch.int32).expand(B, S)
    change = seg[:, 1:] != seg[:, :-1]
    starts = torch.ones((B, S), dtype=torch.bool, device=seg.device)
    starts[:, 1:] = change
    ends = torch.ones((B, S), dtype=torch.bool, device=seg.device)
    ends[:, :-1] = change
    first = torch.where(starts, pos, 0).cummax(-1).values
    end = torch.where(ends, pos + 1, S).flip(-1).cummin(-1).values.flip(-1)
    # Runs are documents iff no id has two runs: as many runs as distinct ids.
    srt = seg.sort(-1).values
    runs_ok = (starts.sum(-1) == 1 + (srt[:, 1:] != srt[:, :-1]).sum(-1))[:, None]
    first = torch.where(runs_ok, first, -1)
    end = torch.where(runs_ok, end, S)
    return torch.stack([first, end], 1).to(torch.int32).contiguous()
