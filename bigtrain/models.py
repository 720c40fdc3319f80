"""Model presets and construction: transformers models, built from a preset or a local directory."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional

from bigtrain.errors import UserError
from bigtrain.pretrained import check_pretrained_dir, refuse_remote_code, remote_code_files  # noqa: F401 - models' API

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
    # A small Llama (grouped-query attention, RoPE, SwiGLU, RMSNorm): ~2.9M parameters besides the
    # embeddings. The model for tensor and sequence parallelism on CPU (AutoTP splits Llama, not GPT-2).
    "llama-tiny": dict(
        model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
        rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    # Llama 2 7B and Llama 3.1 70B shapes (for `bigtrain estimate` and cluster runs; the vocabulary
    # comes from the tokenizer, 128,256 when none is known).
    "llama-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "llama-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    # Llama 3.2 1B shape.
    "llama-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    # Mixtures of experts (bigtrain/moe.py): tiny ones for CPU tests (4 and 8 experts, top-2),
    # and the shapes of Mixtral 8x7B and Qwen3-30B-A3B for clusters.
    "mixtral-tiny": dict(
        model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=1024,
        router_aux_loss_coef=0.02, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "qwen3-moe-tiny": dict(
        model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=1024,
        router_aux_loss_coef=0.001, tie_word_embeddings=False,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6, router_aux_loss_coef=0.02, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=40960,
        rope_theta=1e6, router_aux_loss_coef=0.001, tie_word_embeddings=False,
    ),
}
# The vocabulary of the original GPT-2 / Llama 3 tokenizers (used when no tokenizer is known).
PRESET_VOCAB = {"gpt2": 50257, "llama": 128256, "bert": 30522, "roberta": 50265, "mixtral": 32000, "qwen3_moe": 151936}
ENCODER_TYPES = ("bert", "roberta")

# The transformers head of each task.
TASK_HEADS = {
    "clm": "AutoModelForCausalLM",
    "mlm": "AutoModelForMaskedLM",
    "classify": "AutoModelForSequenceClassification",
    "token_classify": "AutoModelForTokenClassification",
    "sft": "AutoModelForCausalLM",
}


def auto_class(task: str):
    """The transformers Auto class that builds `task`'s model."""
    import transformers

    return getattr(transformers, TASK_HEADS[task])


def task_of_architecture(config) -> str:
    """Which task an exported model was trained for, from its config's architectures."""
    for arch in getattr(config, "architectures", None) or []:
        if not isinstance(arch, str):
            continue
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


# Sizes that must be positive integers, with a ceiling far above any real model that still keeps
# a typo such as n_layer=10**30 from building modules (even on the meta device) until memory ends.
_LAYERS = ("n_layer", "num_hidden_layers")
_SIZES = {
    **{k: 1 << 14 for k in _LAYERS},
    **{k: 1 << 20 for k in ("n_embd", "hidden_size", "intermediate_size", "n_inner")},
    **{k: 1 << 16 for k in ("n_head", "num_attention_heads", "num_key_value_heads")},
    **{k: 1 << 24 for k in ("n_positions", "max_position_embeddings", "vocab_size", "type_vocab_size")},
}
# (width, heads) pairs: attention splits the width evenly over the heads.
_DIVIDES = (("n_embd", "n_head"), ("hidden_size", "num_attention_heads"), ("num_attention_heads", "num_key_value_heads"))


def _check_override_value(cfg, key: str, value: Any) -> Any:
    """`value` must have the type of the field's default (a None default leaves it to the config
    class); returns it, an int widened to float for a float field (`layer_norm_epsilon=1`)."""
    import math

    from bigtrain.config import as_number

    where = f"model.config.{key}"
    default = getattr(cfg, key, None)
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    if value is None or default is None:
        ok = True
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        value = as_number(value)  # bigtrain's one rule: `1e20` (YAML 1.1 reads it as a string) is a number here
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: must be a finite number, got {shown}")
        if ok and isinstance(value, int):
            try:
                value = float(value)
            except OverflowError:
                raise UserError(f"{where}: must be a finite number, got {shown}") from None
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise UserError(f"{where}: must be {type(default).__name__} like the default {default!r}, got {type(value).__name__} {shown}")
    if key in _SIZES and value is not None:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _SIZES[key]:
            raise UserError(f"{where}: must be an integer in [1, {_SIZES[key]}], got {shown}")
    return value


def apply_overrides(cfg, overrides: dict) -> None:
    known = set(cfg.to_dict())
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean 'model.config.{close[0]}'?)" if close else ""
            raise UserError(f"model.config.{key}: not a field of {type(cfg).__name__}{hint}")
        value = _check_override_value(cfg, key, value)
        try:
            setattr(cfg, key, value)
        except Exception as e:  # noqa: BLE001 - transformers' configs validate their fields' types themselves
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise UserError(f"model.config.{key}: {type(cfg).__name__} refuses {value!r}: {why}") from None
    for width, heads in _DIVIDES:
        w, h = getattr(cfg, width, None), getattr(cfg, heads, None)
        if isinstance(w, int) and isinstance(h, int) and h > 0 and w % h:
            keys = [k for k in (width, heads) if k in overrides] or [width]
            raise UserError(f"model.config.{keys[0]}: {width}={w} must be a multiple of {heads}={h}")


def position_limit(cfg) -> int | None:
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def load_pretrained_config(path: str, where: str = "model.from_pretrained"):
    """The transformers config of a local model directory; never runs code shipped with it."""
    from transformers import AutoConfig

    p = Path(path)
    try:
        found = (p / "config.json").is_file()
    except OSError:
        found = False
    if not found:
        raise UserError(f"{where}: {path} is not a local model directory with a config.json (bigtrain never downloads from a hub)")
    try:
        # trust_remote_code=False, never None: with None, transformers asks on the terminal whether
        # to run an auto_map's code, and a "y" would run it.
        return AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure to read it is a bad directory
        refuse_remote_code(p, where, e)


def count_parameters(model) -> int:
    # ZeRO-3 partitions parameters; ds_numel keeps the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# --------------------------------------------------------------------------- building the trainer's model


def run_config(cfg):
    """The run's transformers config as far as its options say, before the tokenizer is known:
    enough for the attention decision (the model's family, heads, soft-capping)."""
    if cfg.model.from_pretrained:
        hf = load_pretrained_config(cfg.model.from_pretrained)
        apply_overrides(hf, cfg.model.config)
        return hf
    return preset_config(cfg.model.preset, cfg.model.config, vocab_size=None)


def attention_heads(hf) -> tuple[int, int, int]:
    """(head_dim, query heads, key/value heads) of a transformers config."""
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return head_dim, heads, getattr(hf, "num_key_value_heads", None) or heads


def sliding_window_of(hf) -> Optional[int]:
    """The sliding window some layer of the model attends within (None: every layer sees the
    whole sequence). Newer configs list each layer's kind in layer_types; older ones set
    sliding_window (Qwen2 only with use_sliding_window)."""
    window = getattr(hf, "sliding_window", None) or getattr(hf, "local_attention", None)
    kinds = getattr(hf, "layer_types", None)
    if kinds is not None:
        return window if any("sliding" in str(k) for k in kinds) else None
    return window if getattr(hf, "use_sliding_window", True) else None


def model_class(task: str, hf):
    """The transformers class `task`'s model of this config is built as (None: no such head)."""
    try:
        return auto_class(task)._model_mapping[type(hf)]
    except KeyError:
        return None


def exact_attention(cls) -> str:
    """The exact attention transformers runs for this class: torch's SDPA, or its own "eager"
    code for families whose attention SDPA cannot express (Gemma 2's soft-capped scores,
    DeBERTa's relative positions)."""
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def fused_attention_refusal(hf, cls) -> Optional[str]:
    """Why bigtrain's fused kernel cannot compute this family's attention (None: it can). A
    family the kernel would compute differently is refused, never run with other math."""
    family = getattr(hf, "model_type", "this")
    if cls is not None and not getattr(cls, "_supports_attention_backend", False):
        return f"{family} models compute attention in their own code, not through transformers' attention interface"
    softcap = getattr(hf, "attn_logit_softcapping", None)
    if softcap:
        return f"{family} soft-caps its attention scores (attn_logit_softcapping={softcap}), which the kernel does not compute"
    return None


def attn_implementation(choice: str, on_cpu: bool, hf, cls, where: str) -> str:
    """model.attn_implementation before the self-check. "auto" is bigtrain's fused kernel on a GPU
    where it computes the family's attention, else the family's exact attention in transformers
    (SDPA, or "eager" where SDPA cannot express it). A choice the family cannot run is an error."""
    exact = exact_attention(cls)
    if choice == "sdpa" and exact == "eager":
        raise UserError(f"{where}: {hf.model_type} models cannot run attn_implementation=sdpa in transformers "
                        f"(their attention is not plain scaled dot-product); use eager (auto picks it)")
    if choice in ("sdpa", "eager"):
        return choice
    refusal = fused_attention_refusal(hf, cls)
    if choice == "auto" and (on_cpu or refusal is not None):
        return exact
    if refusal is not None:
        raise UserError(f"{where}: bigtrain_triton cannot run this model: {refusal}; use model.attn_implementation={exact} (auto picks it)")
    return "bigtrain_triton"


def choose_attention(cfg, on_cpu: bool, precision: str, local_rank: int, warn) -> tuple[str, Optional[str]]:
    """The attention a run uses, and why it fell back (None when it did not).

    bigtrain's fused kernel (see :func:`attn_implementation` for when it is a candidate) is used
    only once its self-check passed on this GPU, in this dtype and head shape
    (bigtrain/kernels/selfcheck.py, cached per combination): "auto" falls back to the family's
    exact attention with one warning; "bigtrain_triton" asked for explicitly stops with an error."""
    from bigtrain.config import cache_root, task_kind, where_of
    from bigtrain.kernels.attention import _interpret_requested

    choice, where = cfg.model.attn_implementation, where_of(cfg, "model.attn_implementation")
    hf = run_config(cfg)
    cls = model_class(task_kind(cfg), hf)
    attn = attn_implementation(choice, on_cpu, hf, cls, where)
    if attn != "bigtrain_triton":
        return attn, None
    if on_cpu and not _interpret_requested():
        raise UserError(f"{where}: bigtrain_triton needs a CUDA GPU and this machine has none; use "
                        "model.attn_implementation=sdpa (or auto), or set TRITON_INTERPRET=1 to run the kernel "
                        "in Triton's CPU interpreter (slow: for tests)")
    import torch

    from bigtrain.kernels.selfcheck import DTYPES, verify

    device = torch.device("cpu") if on_cpu else torch.device("cuda", local_rank)
    head_dim, heads_q, heads_kv = attention_heads(hf)
    verdict = verify(DTYPES[precision], head_dim, heads_q, heads_kv, device, cache_root(cfg),
                     seq=128 if on_cpu else 192)
    if verdict.ok:
        return attn, None
    exact = exact_attention(cls)
    if choice == "bigtrain_triton":
        raise UserError(f"{where}: {verdict.why()}; use model.attn_implementation={exact} (auto falls back by itself)")
    warn(f"warning: {verdict.why()}; training with attn_implementation={exact} instead")
    return exact, verdict.why()


def model_config(cfg, tokenizer, task):
    """The transformers config of the run's model: a preset sized to the tokenizer, or a
    pretrained directory's config with the overrides; then what the task needs (labels)."""
    from bigtrain.config import where_of
    from bigtrain.errors import UserError

    vocab = len(tokenizer)
    if cfg.model.from_pretrained:
        hf = load_pretrained_config(cfg.model.from_pretrained)
        apply_overrides(hf, cfg.model.config)
        vocab = max(vocab, getattr(hf, "vocab_size", vocab))  # a larger tokenizer: build_model resizes the embedding
    else:
        # Round the vocabulary up to a multiple of 64: faster matmuls, same model.
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": bos, "pad_token_id": tokenizer.pad_token_id}
        hf = preset_config(cfg.model.preset, cfg.model.config, vocab_size=((vocab + 63) // 64) * 64, where=where_of(cfg, "model.preset"), special_ids=ids)
    # task=sft may add its chat template's tokens to a pretrained model's tokenizer: the embedding
    # grows to match (build_model resizes it). Any other mismatch is a wrong tokenizer.
    grown = bool(getattr(task, "added_tokens", False)) and cfg.model.from_pretrained
    if hf.vocab_size < vocab and not grown:
        raise UserError(f"{where_of(cfg, 'model.config')}: the tokenizer has {vocab} tokens but the model's embedding holds {hf.vocab_size} (model.config.vocab_size)")
    limit = position_limit(hf)
    if limit is not None and cfg.data.seq_len > limit:
        raise UserError(f"{where_of(cfg, 'data.seq_len')}: data.seq_len={cfg.data.seq_len} exceeds the model's {limit} positions")
    task.configure(hf)
    from bigtrain.moe import configure as configure_experts

    configure_experts(hf)  # an MoE model's loss includes its router's load-balancing term
    hf.use_cache = False
    hf.eos_token_id = tokenizer.eos_token_id
    hf.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    hf.pad_token_id = tokenizer.pad_token_id
    return hf


def count_parameters_meta(task_name: str, hf_config) -> int:
    """Parameters of the model, counted on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in auto_class(task_name).from_config(hf_config).parameters())


def build_model(cfg, hf_config, ds_config: dict, attn: str, labeled: bool, tokenizer_size: int, task=None):
    """The transformers model; returns (model, the HfDeepSpeedConfig to hold while ZeRO-3's
    zero.Init construction is on, or None)."""
    if attn == "bigtrain_triton":
        import bigtrain.kernels  # registers the attention function with transformers

        bigtrain.kernels.set_deterministic(cfg.model.attn_deterministic)
    # Import the model's module (and torch._dynamo, which transformers' masking pulls in)
    # before zero.Init patches tensor construction: importing them inside it fails.
    import torch._dynamo  # noqa: F401

    from bigtrain.config import task_kind

    head = auto_class(task_kind(cfg))
    head._model_mapping[type(hf_config)]
    holder = None
    zero_init = cfg.deepspeed.zero3_init
    if zero_init == "auto":
        zero_init = count_parameters_meta(task_kind(cfg), hf_config) > 1_000_000_000
    if ds_config["zero_optimization"]["stage"] == 3 and zero_init:
        # transformers' ZeRO-3 integration: from_config/from_pretrained create the parameters
        # partitioned (deepspeed.zero.Init) and gather them for weight init and loading.
        # transformers keeps only a weak reference to this object: the caller holds it.
        from transformers.integrations import HfDeepSpeedConfig

        holder = HfDeepSpeedConfig(ds_config)
    if cfg.model.from_pretrained:
        # A new task head (e.g. a classifier on a pretrained encoder or GPT) starts at random;
        # a head of another size (other labels) is replaced.
        model = head.from_pretrained(cfg.model.from_pretrained, config=hf_config, attn_implementation=attn, ignore_mismatched_sizes=labeled)
        if model.get_input_embeddings().weight.shape[0] < tokenizer_size:
            model.resize_token_embeddings(tokenizer_size)
            hf_config.vocab_size = model.config.vocab_size  # checkpoints and the export save this config
    else:
        model = head.from_config(hf_config, attn_implementation=attn)
    if cfg.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from bigtrain.config import where_of
    from bigtrain.lora import lora_settings, wrap

    settings = lora_settings(cfg, getattr(task, "added_tokens", None) if task is not None else None)
    if settings is not None:
        model = wrap(model, settings, where=where_of(cfg, "model.lora.target_modules"))
    return model, holder
