"""Export a bigtrain checkpoint (any ZeRO stage) as a Hugging Face model directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bigtrain.checkpoint import read_state, resolve_checkpoint
from bigtrain.errors import UserError


def consolidated_state_dict(ckpt: Path) -> dict:
    """Full fp32 weights from a DeepSpeed checkpoint directory."""
    import torch

    state = read_state(ckpt)
    if state.get("zero_stage", 0) == 0 and state.get("precision", "fp32") == "fp32":
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{ckpt}: no mp_rank_*_model_states.pt: not a complete DeepSpeed checkpoint")
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def export(src: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write config.json, model.safetensors and the tokenizer of checkpoint `src` into `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = resolve_checkpoint(src, what="export")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"export: {out} exists and is not empty (pass --overwrite to replace it)")
    hf = ckpt / "hf"
    config = AutoConfig.from_pretrained(str(hf))
    sd = consolidated_state_dict(ckpt)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"export: checkpoint {ckpt} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=out.parent))
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in hf.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
