"""Model presets and construction: transformers models, built from a preset or a local directory."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from bigtrain.errors import UserError

# Architecture presets. vocab_size is set from the tokenizer at build time.
PRESETS: dict[str, dict[str, Any]] = {
    # ~3.5M parameters with an 8k vocabulary: trains on 2 CPU cores in minutes.
    "tiny": dict(model_type="gpt2", n_layer=4, n_head=4, n_embd=192, n_positions=1024),
    "gpt2-small": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    "gpt2-large": dict(model_type="gpt2", n_layer=36, n_head=20, n_embd=1280, n_positions=1024),
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_head=25, n_embd=1600, n_positions=1024),
    # BERT-style encoders (task=mlm, classify, token_classify). bert-tiny is Google's 2-layer,
    # 128-wide BERT shape; base and large as in the BERT paper; roberta-base as in RoBERTa.
    "bert-tiny": dict(model_type="bert", num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512, max_position_embeddings=512),
    "bert-base": dict(model_type="bert", num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512),
    "bert-large": dict(model_type="bert", num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512),
    "roberta-base": dict(model_type="roberta", num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=514, type_vocab_size=1),
    # Llama 3.2 1B shape.
    "llama-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
}
# The vocabulary of the original GPT-2 / Llama 3 tokenizers (used when no tokenizer is known).
PRESET_VOCAB = {"gpt2": 50257, "llama": 128256, "bert": 30522, "roberta": 50265}
ENCODER_TYPES = ("bert", "roberta")

# The transformers head of each task.
TASK_HEADS = {
    "clm": "AutoModelForCausalLM",
    "mlm": "AutoModelForMaskedLM",
    "classify": "AutoModelForSequenceClassification",
    "token_classify": "AutoModelForTokenClassification",
}


def auto_class(task: str):
    """The transformers Auto class that builds `task`'s model."""
    import transformers

    return getattr(transformers, TASK_HEADS[task])


def task_of_architecture(config) -> str:
    """Which task an exported model was trained for, from its config's architectures."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "classify"
        if arch.endswith("ForTokenClassification"):
            return "token_classify"
        if arch.endswith("ForMaskedLM"):
            return "mlm"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "clm"
    return "clm"


def preset_config(name: str, overrides: dict, vocab_size: int | None, where: str = "model.preset", special_ids: dict | None = None):
    """A transformers config for preset `name` with `model.config.*` overrides applied."""
    from transformers import AutoConfig

    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{where}: unknown model.preset '{name}'{hint}; presets: {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    model_type = spec.pop("model_type")
    spec["vocab_size"] = vocab_size or PRESET_VOCAB[model_type]
    spec.update(special_ids or {})
    cfg = AutoConfig.for_model(model_type, **spec)
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg, overrides: dict) -> None:
    known = set(cfg.to_dict())
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean 'model.config.{close[0]}'?)" if close else ""
            raise UserError(f"model.config.{key}: not a field of {type(cfg).__name__}{hint}")
        setattr(cfg, key, value)


def position_limit(cfg) -> int | None:
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def load_pretrained_config(path: str):
    from transformers import AutoConfig

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"model.from_pretrained: {path} is not a local model directory with a config.json (bigtrain never downloads from a hub)")
    return AutoConfig.from_pretrained(str(p))


def count_parameters(model) -> int:
    # ZeRO-3 partitions parameters; ds_numel keeps the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
