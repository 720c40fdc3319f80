"""Checkpoints: DeepSpeed's engine checkpoint plus bigtrain's trainer state, under output_dir/checkpoints/.

Layout of one checkpoint, `checkpoints/step_00000100/`:
- DeepSpeed's files (model states, ZeRO optimizer shards), written by `engine.save_checkpoint`;
- `trainer_state.json`: step, samples and tokens seen (the data position), world size, ZeRO stage;
- `rng_rank{R}.pt`: each rank's RNG states (torch, numpy, python), so dropout resumes exactly;
- `hf/`: the model's config.json and the tokenizer, so `bigtrain export` needs nothing else.
`checkpoints/latest` (DeepSpeed's pointer file) names the newest one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bigtrain.errors import UserError

TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(tags, key=lambda p: int(TAG_RE.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    pointer = root / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / "trainer_state.json").is_file():
            return root / tag
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path, what: str = "--resume") -> Path:
    """A run's output_dir (-> its latest checkpoint) or one checkpoint directory."""
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if not p.exists():
        raise UserError(f"{what}: {path} does not exist")
    raise UserError(f"{what}: no bigtrain checkpoint in {path} (expected a run's output_dir or a checkpoints/step_N directory)")


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def _rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, root: Path, state: dict, rank: int, hf_config, tokenizer, keep_last: int) -> Path:
    """Save on every rank (DeepSpeed checkpoints are collective)."""
    import torch
    import torch.distributed as dist

    tag = tag_for(state["step"])
    engine.save_checkpoint(str(root), tag=tag, client_state={"bigtrain": state})
    ckpt = root / tag
    torch.save(_rng_state(), ckpt / f"rng_rank{rank}.pt")
    if rank == 0:
        hf = ckpt / "hf"
        hf.mkdir(exist_ok=True)
        hf_config.save_pretrained(str(hf))
        # The tokenizer object, not its source directory: a pretrained model's directory also
        # holds its weights, which must never travel into the checkpoint or the export.
        tokenizer.save_pretrained(str(hf))
        # Written last: a checkpoint without trainer_state.json is never picked for resume.
        (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=1))
    dist.barrier()
    if rank == 0:
        prune(root, keep_last)
    return ckpt


BEST_POINTER = "best.json"


def read_best(root: Path) -> Optional[dict]:
    """The best evaluation's checkpoint ({"tag", "metric", "value", "step"}), if one was recorded."""
    p = root / BEST_POINTER
    return json.loads(p.read_text()) if p.is_file() else None


def write_best(root: Path, best: dict) -> None:
    tmp = root / (BEST_POINTER + ".tmp")
    tmp.write_text(json.dumps(best))
    tmp.replace(root / BEST_POINTER)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints, never the best one."""
    found = list_checkpoints(root)
    best = (read_best(root) or {}).get("tag")
    for old in found[: max(0, len(found) - keep_last)]:
        if old.name == best:
            continue
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.parent / (old.name + "_universal"), ignore_errors=True)


UNIVERSAL_SUFFIX = "_universal"


def to_universal(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal (world-size independent) format, once."""
    import subprocess
    import sys

    out = ckpt.parent / (ckpt.name + UNIVERSAL_SUFFIX)
    if (out / "zero").is_dir():
        return out
    tmp = ckpt.parent / (".tmp-" + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt), "--output_folder", str(tmp),
           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["unknown error"]
        raise UserError(f"--resume: converting {ckpt} to a universal checkpoint failed: {tail[0]}")
    tmp.rename(out)
    return out


def load(engine, ckpt: Path, rank: int, universal: bool = False) -> dict[str, Any]:
    """Load engine weights, optimizer and scheduler, and this rank's RNG; returns the trainer state."""
    import torch

    tag = ckpt.name + UNIVERSAL_SUFFIX if universal else ckpt.name
    path, client = engine.load_checkpoint(str(ckpt.parent), tag=tag)
    if path is None:
        raise UserError(f"--resume: DeepSpeed could not load the checkpoint in {ckpt.parent / tag}")
    rng = ckpt / f"rng_rank{rank}.pt"
    # At another world size the ranks hold other samples: their old RNG streams do not apply.
    if rng.is_file() and not universal:
        _set_rng_state(torch.load(rng, weights_only=False))
    return read_state(ckpt)
