"""Tiny random models of the popular model families, written to local directories (no downloads).

Each family keeps the quirks that make it differ for bigtrain's features, at toy sizes: grouped-
query attention, a head_dim that is not hidden/heads, attention biases, sliding windows shorter
than the test sequences, soft-capped attention and final logits, fused qkv projections, partial
rotary embeddings, layers without rotary embeddings, tied or untied embeddings. Written with
`save_pretrained` from each family's own config class, with a tokenizer trained here (a byte-level
BPE for the causal LMs, a WordPiece for the encoders), so `model.from_pretrained=DIR` finds both.
Imported as `families` (tests/ is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

# A 2-layer, 64-wide core; each family adds its quirks. vocab_size comes from the tokenizer.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256)
# Windows shorter than the tests' 64-token sequences, so the sliding-window layers mask something.
WINDOW = 16

CAUSAL: dict[str, tuple[str, dict]] = {
    # Llama 3: GQA, untied embeddings, llama3 rope scaling.
    "llama3": ("llama", dict(_DECODER, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Qwen2: q/k/v projections with bias, tied embeddings.
    "qwen2": ("qwen2", dict(_DECODER, tie_word_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, head_dim 32 with hidden 64 and 4 heads (head_dim != hidden/heads).
    "qwen3": ("qwen3", dict(_DECODER, head_dim=32, tie_word_embeddings=True)),
    # Mistral: a sliding window on every layer.
    "mistral": ("mistral", dict(_DECODER, sliding_window=WINDOW, tie_word_embeddings=False)),
    # Gemma 2: soft-capped attention logits and final logits, sliding window on alternate layers,
    # query_pre_attn_scalar, embeddings scaled by sqrt(hidden), tied.
    "gemma2": ("gemma2", dict(_DECODER, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # Gemma 3 (text): local/global layers, q/k norm, no soft-capping by default, tied.
    "gemma3": ("gemma3_text", dict(_DECODER, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"])),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3": ("phi3", dict(_DECODER, tie_word_embeddings=False)),
    # OLMo 2: q/k norm over the whole projection, norms after attention and MLP.
    "olmo2": ("olmo2", dict(_DECODER, tie_word_embeddings=False)),
    # GPT-NeoX (Pythia): fused query_key_value, parallel residual, rotary on 25% of each head.
    "pythia": ("gpt_neox", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True,
                                tie_word_embeddings=False)),
    # SmolLM3: every second layer without rotary embeddings (NoPE), GQA, tied.
    "smollm3": ("smollm3", dict(_DECODER, no_rope_layers=[1, 0], tie_word_embeddings=True)),
    # GPT-2: Conv1D layers, learned positions, tied.
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256)),
    # Mixtures of experts (bigtrain/moe.py): 4 experts, top-2 routing, fused expert tensors.
    "mixtral": ("mixtral", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                                tie_word_embeddings=False)),
    "qwen3-moe": ("qwen3_moe", dict(_DECODER, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=16,
                                    decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False)),
}

ENCODERS: dict[str, tuple[str, dict]] = {
    "bert": ("bert", dict(_ENCODER)),
    "roberta": ("roberta", dict(_ENCODER, max_position_embeddings=258, type_vocab_size=1)),
    # DeBERTa-v2: disentangled relative-position attention (its own attention code).
    "deberta-v2": ("deberta-v2", dict(_ENCODER, relative_attention=True, position_buckets=32,
                                      pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1)),
    # ModernBERT: alternating local (sliding window) and global attention, RoPE, no biases.
    "modernbert": ("modernbert", dict(_ENCODER, local_attention=WINDOW, global_attn_every_n_layers=2)),
}

FAMILIES = {**CAUSAL, **ENCODERS}

# Chat formats, written here after each family's instruct releases (the turn markers and what
# closes a turn, not the releases' full templates): (template, its special tokens, what follows
# each reply: "{eos}" is the tokenizer's end-of-sequence token). Families released without a
# chat format (GPT-2, Pythia) get bigtrain's default, ChatML (bigtrain/chat.py).
_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", ["<|im_start|>", "<|im_end|>"], "<|im_end|>\n")
_LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
           "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
           ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>")
# Mistral/Mixtral instruct: [INST] ... [/INST] opens the reply (no generation prompt), EOS closes it.
_INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
         "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}", ["[INST]", "[/INST]"], "{eos}")
# Gemma: the assistant's role is called "model".
_GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
          "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
          ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>\n")
# Phi-3: <|role|> markers, <|end|> closes a turn, and a whole conversation without a generation
# prompt ends with EOS (not part of any turn but the last).
_PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}",
         ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>\n")
# OLMo 2 (Tulu): <|role|> lines, EOS closes the assistant's reply. (The newlines are expressions:
# transformers' template environment drops a newline right after a {% %} tag, trim_blocks.)
_TULU = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}"
         "{{ eos_token }}{% endif %}{{ '\\n' }}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}",
         ["<|system|>", "<|user|>", "<|assistant|>"], "{eos}\n")
CHAT_STYLES: dict[str, tuple | None] = {
    "llama3": _LLAMA3, "qwen2": _CHATML, "qwen3": _CHATML, "mistral": _INST, "gemma2": _GEMMA, "gemma3": _GEMMA, "phi3": _PHI3,
    "olmo2": _TULU, "pythia": None, "smollm3": _CHATML, "gpt2": None, "mixtral": _INST, "qwen3-moe": _CHATML,
}


def write_family(name: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """`name`'s tiny model with random weights (seeded) and the tokenizer, saved in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    model_type, spec = FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {"pad_token_id": tok.pad_token_id}
    if name in CAUSAL:
        ids.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    else:  # BERT-style specials: [CLS] opens, [SEP] closes
        ids.update(cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), **spec, **ids)
    torch.manual_seed(seed)
    head = AutoModelForCausalLM if name in CAUSAL else AutoModelForMaskedLM
    model = head.from_config(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
