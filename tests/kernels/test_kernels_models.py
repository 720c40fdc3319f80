"""transformers models through attn_implementation="bigtrain_triton" match "eager".

Small random-init configs (no hub downloads). Padding goes through the model's attention_mask;
packed documents go through the `segment_ids` forward keyword, and the reference is eager
attention with the equivalent block-diagonal (causal for GPT-2 / Llama) 4-D mask.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import bigtrain.kernels as bk

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, S, V = 2, 24, 96


def _configs():
    return {
        "gpt2": (GPT2LMHeadModel, GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64,
                                             bos_token_id=0, eos_token_id=0)),
        "bert": (BertForMaskedLM, BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=V, max_position_embeddings=64)),
        "roberta": (RobertaForMaskedLM, RobertaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                      intermediate_size=64, vocab_size=V,
                                                      max_position_embeddings=70, pad_token_id=1)),
        "llama": (LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=64, vocab_size=V,
                                                max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                                pad_token_id=0)),
    }


def _model(name: str, impl: str) -> torch.nn.Module:
    cls, cfg = _configs()[name]
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation=impl).to(DEVICE, torch.float32)
    return model.eval()  # no dropout: deterministic comparison


def _run(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(**inputs).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (logits * w).sum().backward()
    return logits.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _assert_matches_eager(name: str, ours: dict, ref: dict, *, valid: torch.Tensor | None = None) -> None:
    lo, go = _run(_model(name, "bigtrain_triton"), **ours)
    lr, gr = _run(_model(name, "eager"), **ref)
    if valid is not None:  # padded positions are not compared (eager gives them garbage too)
        lo, lr = lo[valid], lr[valid]
    torch.testing.assert_close(lo, lr, atol=2e-5, rtol=1e-4)
    assert len(go) == len(gr)
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def _ids() -> torch.Tensor:
    return torch.randint(2, V, (B, S), generator=torch.Generator().manual_seed(2)).to(DEVICE)


def _padding() -> torch.Tensor:
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 17:] = 0  # right padding in the second row
    return am.to(DEVICE)


def _documents() -> torch.Tensor:
    seg = torch.tensor([[0] * 7 + [1] * 10 + [2] * 7, [0] * 12 + [1] * 12])
    return seg.to(DEVICE)


def _eager_mask(seg: torch.Tensor, am: torch.Tensor, causal: bool) -> torch.Tensor:
    ok = (seg[:, None, :, None] == seg[:, None, None, :]) & am.bool()[:, None, None, :]
    if causal:
        ok = ok & torch.ones(S, S, dtype=torch.bool, device=seg.device).tril()
    return torch.zeros(ok.shape, device=seg.device).masked_fill(~ok, torch.finfo(torch.float32).min)


def _spy_on_kernel_calls(monkeypatch, mask_kwarg: str) -> list[bool]:
    """Records, per attention call, whether the kernel got `mask_kwarg` (not None)."""
    from bigtrain.kernels import transformers_integration as ti

    seen: list[bool] = []
    real = ti._flash_attn

    def spy(*args, **kwargs):
        seen.append(kwargs.get(mask_kwarg) is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ti, "_flash_attn", spy)
    return seen


def test_registered_with_transformers():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "bigtrain_triton" in AttentionInterface._global_mapping
    assert "bigtrain_triton" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("name", ["gpt2", "bert", "roberta", "llama"])
def test_padding_matches_eager(name):
    ids, am = _ids(), _padding()
    _assert_matches_eager(name, dict(input_ids=ids, attention_mask=am), dict(input_ids=ids, attention_mask=am),
             valid=am.bool())


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_packed_documents_match_eager_block_diagonal(name):
    ids, am, seg = _ids(), _padding(), _documents()
    causal = name != "bert"
    ref_mask = _eager_mask(seg, am, causal)
    _assert_matches_eager(name, dict(input_ids=ids, attention_mask=am, segment_ids=seg),
             dict(input_ids=ids, attention_mask=ref_mask), valid=am.bool())


def test_padding_free_drops_the_all_ones_mask(monkeypatch):
    # The trainer's packed rows: all-ones attention_mask + segment_ids + padding_free=True. The
    # kernel must get no padding mask (so no padding tile work), with unchanged results; without
    # padding_free the same call still applies the mask.
    seen = _spy_on_kernel_calls(monkeypatch, "key_padding_mask")
    ids, seg = _ids(), _documents()
    ones = torch.ones_like(ids)
    model = _model("llama", "bigtrain_triton")
    a = model(input_ids=ids, attention_mask=ones, segment_ids=seg, padding_free=True).logits
    assert seen and not any(seen)
    seen.clear()
    b = model(input_ids=ids, attention_mask=ones, segment_ids=seg).logits
    assert seen and all(seen)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_document_bounds_given_once_serve_every_layer(monkeypatch):
    # Without bounds each layer's attention computes them from the segment ids (here 2 layers, and
    # the backward reuses the forward's); with the batch's bounds passed once (as the trainer does)
    # no layer computes them, and logits and gradients are bitwise the same.
    from bigtrain.kernels import attention

    real, calls = attention.document_bounds, []
    monkeypatch.setattr(attention, "document_bounds", lambda seg: calls.append(1) or real(seg))
    ids, seg = _ids(), _documents()
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), segment_ids=seg, padding_free=True)
    la, ga = _run(_model("llama", "bigtrain_triton"), **kw)
    assert len(calls) == _configs()["llama"][1].num_hidden_layers == 2
    calls.clear()
    lb, gb = _run(_model("llama", "bigtrain_triton"), **kw, segment_bounds=real(seg))
    assert calls == []
    torch.testing.assert_close(la, lb, atol=0, rtol=0)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="segment_bounds must be"):
        _run(_model("llama", "bigtrain_triton"), **kw, segment_bounds=real(seg)[:, :, :-1])


def test_segment_ids_context_equals_keyword():
    ids, seg = _ids(), _documents()
    model = _model("gpt2", "bigtrain_triton")
    with bk.segment_ids_context(seg):
        a = model(input_ids=ids).logits
    b = model(input_ids=ids, segment_ids=seg).logits
    c = model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_packed_position_ids_dense_fallback_matches_eager(monkeypatch):
    # No attention_mask + per-document position_ids: transformers infers packing itself and our
    # mask function hands the kernel a dense mask; must still match eager.
    seen = _spy_on_kernel_calls(monkeypatch, "dense_mask")
    ids = _ids()
    pos = torch.tensor([list(range(10)) + list(range(14)), list(range(24))], device=DEVICE)
    kw = dict(input_ids=ids, position_ids=pos, use_cache=False)
    _assert_matches_eager("llama", kw, kw)
    assert seen and all(seen), "expected the dense-mask path"


def test_import_is_light_and_registers_later():
    code = (
        "import sys, bigtrain.kernels\n"
        "assert 'triton' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'bigtrain_triton' in AttentionInterface._global_mapping\n"
        "assert 'bigtrain_triton' in AttentionMaskInterface._global_mapping\n"
        "import torch\n"
        "try:\n"
        "    bigtrain.kernels.flash_attn(*[torch.randn(1, 1, 4, 16)] * 3)\n"
        "except RuntimeError as e:\n"
        "    assert 'model.attn_implementation=sdpa' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error on CPU without TRITON_INTERPRET')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
