"""Text generation from an exported model directory."""

from __future__ import annotations

from pathlib import Path

from bigtrain.errors import UserError


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """Sample a continuation of `prompt` (greedy when temperature is 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise UserError(f"generate: {model_dir} is not a model directory (no config.json); export one with 'bigtrain export'")
    if max_new_tokens < 1:
        raise UserError(f"generate: --max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"generate: --temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise UserError(f"generate: --top-k must be >= 0, got {top_k}")
    from bigtrain.models import load_pretrained_config
    from bigtrain.tokenizer import load_tokenizer

    # Never the directory's own code: configs and tokenizers load with trust_remote_code=False.
    config = load_pretrained_config(str(p), where="generate")
    tok = load_tokenizer(str(p), where="generate")
    model = AutoModelForCausalLM.from_pretrained(str(p), config=config, trust_remote_code=False)
    model.eval()
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tok.eos_token_id]])
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=top_k or None)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tok.decode(out[0], skip_special_tokens=True)
