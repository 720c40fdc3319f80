"""Model parallelism through DeepSpeed: tensor parallelism (AutoTP) and sequence parallelism (Ulysses).

ZeRO splits the optimizer states, gradients and (stage 3) the parameters over the data-parallel
ranks, but every rank still runs the whole model on whole sequences. Two more splits, both
DeepSpeed's own, are configured here:

  deepspeed.tensor_parallel=N    AutoTP: each linear layer's weight is split over N ranks (column-
                                 wise for q/k/v, gate and up projections, row-wise with an
                                 all-reduce for the output and down projections, as the model's
                                 transformers `tp_plan` says). The N ranks see the same samples.
  deepspeed.sequence_parallel=N  Ulysses (DeepSpeed's ALST): each rank holds 1/N of every sequence;
                                 around the core attention an all-to-all gives each rank the whole
                                 sequence for 1/N of the heads. The N ranks see the same samples.

Layout.  world = data-parallel x tensor-parallel x sequence-parallel. DeepSpeed puts the ranks of
one tensor- or sequence-parallel group next to each other (ranks 0-1, 2-3, ...), so the
data-parallel rank is rank // (tp x sp). The batch schedule is keyed by the data-parallel rank
and size: every rank of a group gets the same samples, and the global batch is
micro_batch_size x grad_accum x data-parallel size. The two are not combined (DeepSpeed 0.19
does not compose AutoTP with Ulysses).

Sequence-parallel loss.  Rank r of a group of N holds tokens [r S/N, (r+1) S/N) of each
sequence. The labels are shifted on the whole sequence before slicing (the last token of a slice
predicts the first of the next), the position ids are the slice's own. The loss of the unsplit
model is the token-weighted mean over the whole sequence:

    L = sum_r sum_{t in slice r} l_t / T,      T = the group's target count (all-reduced, no grad)

Each rank computes its own share  L_r = sum_{t in slice r} l_t / T  and reports L = sum_r L_r
(an all-reduce of the detached shares). The value handed to the engine is L_r + (L - L_r).detach():
it reads as L (the curve, the non-finite checks, evaluation) and differentiates as L_r. Summed
over the group, the L_r gradients are the unsplit model's; DeepSpeed's gradient reduction at ZeRO
1-2 sums over the group and divides by the data-parallel size, which is exactly that. ZeRO-3's
reduce-scatter divides by the whole world instead, so there the backward share is N x L_r
(both measured against one process's gradient norm: tests/test_parallel.py).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

from bigtrain.errors import UserError
from bigtrain.loss import IGNORE
from bigtrain.config import check_parallel_config  # noqa: F401 - parallel's API
from bigtrain.layout import Layout, data_parallel_size, describe_saved_layout, layout_of  # noqa: F401 - parallel's API



def check_model(cfg, hf_config, where_of, world: Optional[int] = None) -> None:
    """Model-dependent rules: heads that divide, a model AutoTP knows how to split, experts that
    the expert-parallel size divides."""
    from bigtrain.moe import check as check_experts

    check_experts(cfg, hf_config, world, where_of)
    ds = cfg.deepspeed
    heads = _first(hf_config, "num_attention_heads", "n_head")
    kv = _first(hf_config, "num_key_value_heads") or heads
    for key, n in (("deepspeed.tensor_parallel", ds.tensor_parallel), ("deepspeed.sequence_parallel", ds.sequence_parallel)):
        if n == 1:
            continue
        for what, count in (("attention heads", heads), ("key/value heads", kv)):
            if count and count % n:
                raise UserError(f"{where_of(key)}: {key.split('.')[1]}={n} does not divide the model's {count} {what} "
                                f"({hf_config.model_type}); each rank must hold whole heads")
    if ds.tensor_parallel > 1:
        _check_tp_plan(hf_config, where_of)
    if ds.sequence_parallel > 1:
        _check_ulysses(cfg, hf_config, where_of)


def _check_ulysses(cfg, hf_config, where_of) -> None:
    """What DeepSpeed's Ulysses cannot split correctly, refused before any rank starts."""
    from bigtrain.models import exact_attention, model_class, sliding_window_of

    where, family = where_of("deepspeed.sequence_parallel"), hf_config.model_type
    if getattr(hf_config, "num_key_value_heads", None) is None:
        raise UserError(f"{where}: DeepSpeed's Ulysses cannot split '{family}' models: it reads the config's "
                        f"num_key_value_heads, which {family} configs do not have; use ZeRO alone")
    window = sliding_window_of(hf_config)
    if window:
        # Measured (tests/test_models.py): Mistral and Gemma 3 trained with other losses than one
        # process, as if the window were not there.
        raise UserError(f"{where}: DeepSpeed's Ulysses cannot split '{family}' models with sliding-window attention "
                        f"(sliding_window={window}): each rank builds the window's mask for its own slice of the "
                        "sequence, so attention would differ from one process; use ZeRO alone")
    attn = cfg.model.attn_implementation
    if attn == "eager" or (attn == "auto" and exact_attention(model_class(cfg.task, hf_config)) == "eager"):
        raise UserError(f"{where}: DeepSpeed's Ulysses wraps transformers' registered attention functions, and "
                        f"{family} runs its own eager attention; use ZeRO alone")


def _check_tp_plan(hf_config, where_of) -> None:
    """AutoTP splits a model by its transformers tensor-parallel plan, and DeepSpeed refuses a
    plan with a partition style it does not apply (its SUPPORTED_STYLES): say so before any rank starts."""
    import deepspeed
    from deepspeed.module_inject.tp_plan_converter import SUPPORTED_STYLES

    plan = getattr(hf_config, "base_model_tp_plan", None)
    where = where_of("deepspeed.tensor_parallel")
    if not plan:
        raise UserError(f"{where}: DeepSpeed's AutoTP cannot split model type "
                        f"'{hf_config.model_type}' (no transformers tensor-parallel plan; GPT-2's Conv1D layers are refused "
                        "by AutoTP); use a Llama-family model such as model.preset=llama-tiny, or ZeRO alone")
    unsupported = sorted({style for style in plan.values() if style.lower() not in SUPPORTED_STYLES})
    if unsupported:
        raise UserError(f"{where}: DeepSpeed's AutoTP cannot split model type '{hf_config.model_type}': its transformers "
                        f"tensor-parallel plan uses {', '.join(unsupported)}, which DeepSpeed {deepspeed.__version__} does not "
                        "apply; use ZeRO alone or sequence parallelism")


def check_model_before_launch(cfg, where_of, world: Optional[int] = None) -> None:
    """`check_model` on the model's config alone (no tokenizer yet): `train --nproc` runs it before
    starting any rank."""
    ds = cfg.deepspeed
    if ds.tensor_parallel == 1 and ds.sequence_parallel == 1 and ds.expert_parallel == 1:
        return
    from bigtrain.models import apply_overrides, load_pretrained_config, preset_config

    if cfg.model.from_pretrained:
        hf = load_pretrained_config(cfg.model.from_pretrained)
        apply_overrides(hf, cfg.model.config)
    else:
        hf = preset_config(cfg.model.preset, cfg.model.config, vocab_size=None, where=where_of("model.preset"))
    check_model(cfg, hf, where_of, world)


def _first(obj, *names) -> Optional[int]:
    for name in names:
        value = getattr(obj, name, None)
        if value:
            return value
    return None


def ds_config_entries(cfg) -> dict[str, Any]:
    """What the ds_config needs for the layout (engine.build_ds_config merges it in)."""
    ds = cfg.deepspeed
    out: dict[str, Any] = {}
    if ds.tensor_parallel > 1:
        # Full logits on every rank (the loss, evaluation and sampling read them): without this a
        # tied lm_head is split by vocabulary and each rank's logits hold only its share.
        out["tensor_parallel"] = {"autotp_size": ds.tensor_parallel, "vocab_parallel_lm_head": False}
    if ds.sequence_parallel > 1:
        out["sequence_parallel_size"] = ds.sequence_parallel
    from bigtrain.moe import ds_config_entry

    out.update(ds_config_entry(cfg))
    return out


def register_sequence_parallel(model, attn: str, cfg):
    """Ulysses around the model's core attention (`attn`, any transformers attention registry
    entry: sdpa or bigtrain_triton). Returns (mpu for deepspeed.initialize or None if sp=1, undo).

    DeepSpeed replaces `attn` in transformers' process-wide attention registry with its all-to-all
    wrapper. Left there, every later model of this process that uses `attn` (rank 0's end-of-run
    sample, an export check) would enter a collective that the other ranks never join and hang:
    the trainer calls `undo()` when training is over, which puts the original function back."""
    sp = cfg.deepspeed.sequence_parallel
    if sp == 1:
        return None, lambda: None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS[attn]
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn, sequence_parallel_size=sp,
        micro_batch_size=cfg.train.micro_batch_size, seq_length=cfg.data.seq_len, seq_length_is_variable=True)

    def undo() -> None:
        ALL_ATTENTION_FUNCTIONS[attn] = original

    return mpu, undo


class SequenceShard:
    """Runs one micro-batch of a sequence-parallel group on this rank's slice (see the module
    docstring for the loss)."""

    def __init__(self, layout: Layout, zero_stage: int) -> None:
        from deepspeed.utils import groups

        self.sp, self.rank = layout.sp, layout.sp_rank
        self.group = groups._get_sequence_parallel_group()
        self.backward_scale = float(self.sp) if zero_stage == 3 else 1.0

    def __call__(self, model, batch: dict):
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        ids, labels = batch["input_ids"], batch["labels"]
        n = ids.shape[1] // self.sp
        piece = slice(self.rank * n, (self.rank + 1) * n)
        targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:][:, piece]  # shifted on the whole sequence
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)[:, piece]
        # The whole sequence's documents (Ulysses attention sees every position).
        extra = {k: batch[k] for k in ("segment_ids", "segment_bounds") if k in batch}
        out = model(input_ids=ids[:, piece], position_ids=positions, use_cache=False, **extra)
        logits = out.logits.float()
        total = (targets != IGNORE).sum().float()
        dist.all_reduce(total, group=self.group)
        share = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
        share = share / total.clamp(min=1.0)
        whole = share.detach().clone()
        dist.all_reduce(whole, group=self.group)
        scaled = share * self.backward_scale
        return SimpleNamespace(loss=scaled + (whole - scaled).detach(), logits=out.logits)
