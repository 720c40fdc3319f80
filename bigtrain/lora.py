"""LoRA through peft: low-rank adapters on a frozen causal LM (`model.lora.r > 0`).

peft does the work (`get_peft_model`, `merge_and_unload`, `save_pretrained`); bigtrain wires it
into the run: the adapters are added after the model is built (so ZeRO-3's zero.Init, a resized
embedding and activation checkpointing come first), only the adapters reach the optimizer
(bigtrain's parameter groups skip frozen parameters), DeepSpeed checkpoints the whole wrapped
module (resume needs nothing else), and `bigtrain export` rebuilds the wrapped model from the
checkpoint to write either merged full weights (the default) or peft's adapter directory
(`--adapter-only`).
"""

from __future__ import annotations

from typing import Any, Optional

from bigtrain.errors import UserError


def lora_settings(cfg, new_tokens: Optional[list[int]] = None) -> Optional[dict[str, Any]]:
    """The run's LoRA settings as saved in trainer_state.json (None: no LoRA). `new_tokens`: ids
    the run added to the tokenizer (a chat template's): their embedding rows, random otherwise,
    train too (peft's trainable_token_indices), the rest of the embedding stays frozen."""
    lora = cfg.model.lora
    if lora.r <= 0:
        return None
    return {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": lora.target_modules,
            "trainable_token_indices": sorted(new_tokens) if new_tokens else None}


def _peft_config(settings: dict):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings["r"], lora_alpha=settings["lora_alpha"],
                      lora_dropout=settings["lora_dropout"], target_modules=settings["target_modules"],
                      trainable_token_indices=settings.get("trainable_token_indices"))


def adaptable_modules(model) -> list[str]:
    """Names (last component) of the modules LoRA can adapt: linear and GPT-2 Conv1D layers."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return sorted(names)


def wrap(model, settings: dict, where: str = "model.lora.target_modules"):
    """`get_peft_model` with bigtrain's error for target modules that match nothing."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("model.lora needs peft: pip install peft") from None
    from peft import get_peft_model

    wanted = settings["target_modules"]
    if wanted is not None:
        have = adaptable_modules(model)
        missing = [m for m in wanted if m not in have]
        if missing:
            raise UserError(f"{where}: {', '.join(missing)} match no module of the model; its linear layers are: {', '.join(have)}")
    try:
        return get_peft_model(model, _peft_config(settings))
    except ValueError as e:  # e.g. no peft default for this model family
        raise UserError(f"{where}: peft cannot add LoRA to this model ({str(e).splitlines()[0]}); name the modules, "
                        f"one or more of: {', '.join(adaptable_modules(model))}") from None


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameters; under ZeRO-3 the partitioned size (ds_numel)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def rebuild(model_class, config, settings: dict, state: dict):
    """The wrapped model of a checkpoint (its transformers Auto class and config), on CPU in
    fp32, with its trained weights."""
    import torch

    torch.manual_seed(0)
    base = model_class.from_config(config)
    model = wrap(base, settings)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not _is_buffer(model, k))
    if unknown or missing:
        raise UserError(f"export: the LoRA checkpoint does not match the rebuilt model: unknown {unknown[:4]}, missing {missing[:4]}")
    model.load_state_dict({k: v.contiguous() if hasattr(v, "contiguous") else v for k, v in state.items()}, strict=False)
    return model.eval()


def _is_buffer(model, key: str) -> bool:
    return key in dict(model.named_buffers())
