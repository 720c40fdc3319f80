"""Mixture-of-experts models: expert parallelism through DeepSpeed's AutoEP, and router health.

Expert parallelism (`deepspeed.expert_parallel: N`).  DeepSpeed's AutoEP replaces each MoE block
of a transformers model (Mixtral, Qwen3-MoE, ...) with its own layer whose experts are split over
N ranks: a token's hidden state travels (all-to-all) to the ranks holding its top-k experts and
back. The experts' memory is divided by N; the non-expert weights stay data-parallel over the
whole world. The router, its top-k choice and the model's loss are transformers' own, so the
per-step losses and gradient norms equal one process's (tests/test_moe.py).

The loss.  bigtrain sets the model's `output_router_logits`, so transformers adds the
load-balancing loss times the model's own `router_aux_loss_coef` to the language-model loss it
returns: that sum is what trains. The auxiliary loss is also recorded on its own (`aux_loss`).

Router health.  At log steps metrics.jsonl gets `aux_loss` and `expert_load`: per MoE layer the
largest number of tokens routed to one expert over the mean per expert (1.0 = perfectly balanced,
the number of experts = every token to one expert), from the last micro-batch's router logits.
It is computed on the device at every step and read with the step's other numbers at log steps.
transformers' MoE blocks drop no tokens, so no drop fraction is reported.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from bigtrain.errors import UserError

# The config attributes that hold the number of experts and the experts per token, per family.
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "top_k")


def num_experts(hf_config) -> Optional[int]:
    """The number of routed experts of an MoE config (None: a dense model)."""
    for name in _EXPERTS:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def experts_per_token(hf_config) -> int:
    for name in _TOP_K:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def configure(hf_config) -> None:
    """An MoE model returns its router logits, so its loss includes the load-balancing term."""
    if num_experts(hf_config) is not None:
        hf_config.output_router_logits = True


def check(cfg, hf_config, world: Optional[int], where_of) -> None:
    """deepspeed.expert_parallel against the model and the layout, before any rank starts (an MoE
    model's tensor or sequence parallelism, with or without experts split, is refused first)."""
    ep, experts = cfg.deepspeed.expert_parallel, num_experts(hf_config)
    if experts is not None:
        _check_split_moe(cfg, hf_config, where_of)
    if ep == 1:
        return
    where = where_of("deepspeed.expert_parallel")
    if experts is None:
        raise UserError(f"{where}: deepspeed.expert_parallel={ep}, but {hf_config.model_type} is a dense model (no experts); "
                        "use a mixture of experts such as model.preset=mixtral-tiny, or expert_parallel=1")
    if experts % ep:
        raise UserError(f"{where}: deepspeed.expert_parallel={ep} does not divide the model's {experts} experts; "
                        "each rank must hold the same number of whole experts")
    if world is not None and world % ep:
        raise UserError(f"{where}: the world size {world} does not divide into expert-parallel groups of {ep}; "
                        f"use a multiple of {ep} ranks")


def _check_split_moe(cfg, hf_config, where_of) -> None:
    """Tensor and sequence parallelism of an MoE model, refused (measured in tests/test_models.py)."""
    ds, family = cfg.deepspeed, hf_config.model_type
    if ds.sequence_parallel > 1:
        raise UserError(f"{where_of('deepspeed.sequence_parallel')}: sequence parallelism of {family} (a mixture of experts) "
                        "would compute the router's load-balancing loss on each rank's slice of the sequence, not on the "
                        "whole micro-batch (measured: the loss differs from one process's); use deepspeed.expert_parallel")
    if ds.tensor_parallel > 1:
        raise UserError(f"{where_of('deepspeed.tensor_parallel')}: tensor parallelism of {family} (a mixture of experts) is "
                        "not verified: against one process its gradient norms drifted by 1e-4 in 3 steps (measured, "
                        "routing decisions flipping on rounding); use deepspeed.expert_parallel")


def ds_config_entry(cfg) -> dict[str, Any]:
    """The ds_config's expert_parallel section (empty for expert_parallel=1)."""
    ep = cfg.deepspeed.expert_parallel
    if ep == 1:
        return {}
    import torch

    # Grouped GEMMs need a GPU; on CPU the experts run one matmul each.
    return {"expert_parallel": {"enabled": True, "autoep_size": ep, "use_grouped_mm": torch.cuda.is_available()}}


def install_autoep_compat() -> None:
    """Let DeepSpeed 0.19.8's AutoEP read transformers >= 5.23's output-capture registry.

    transformers 5.23 made `utils.output_capturing._CAN_RECORD_REGISTRY` a dict subclass whose
    `get(model)` takes a model (and no default) and whose `__setitem__` keys by the model's class.
    AutoEP (deepspeed/module_inject/auto_ep_presets/base.py) still treats it as a plain dict of
    class-name keys: `registry.get(key, default)` fails with "_CanRecordRegistry.get() takes 2
    positional arguments but 3 were given". This gives the registry object a subclass that answers
    both: string keys as a plain dict, models as transformers does. Remove it when DeepSpeed's
    AutoEP calls the registry the new way (tests/test_moe.py passes with this function a no-op).
    """
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    base = type(registry)
    if registry is None or base is dict or getattr(base, "_bigtrain_compat", False):
        return

    class _Registry(base):
        _bigtrain_compat = True

        def get(self, key, default=None):
            if isinstance(key, str):
                return dict.get(self, key, default)
            return super().get(key)

        def __setitem__(self, key, value) -> None:
            if isinstance(key, str):
                dict.__setitem__(self, key, value)
            else:
                super().__setitem__(key, value)

    registry.__class__ = _Registry


class RouterMonitor:
    """The last step's router numbers, kept on the device until a log step reads them."""

    def __init__(self, experts: int, top_k: int) -> None:
        self.experts, self.top_k = experts, top_k
        self.aux = None  # the mean auxiliary loss over the step's micro-batches (0-d tensor)
        self.load = None  # per layer: max tokens per expert / mean (1-d tensor)
        self._aux_sum, self._count = None, 0

    def observe(self, output) -> None:
        """After each training forward: the auxiliary loss and the router's choices (no host read)."""
        import torch

        aux = getattr(output, "aux_loss", None)
        if aux is not None:
            aux = aux.detach().float()
            self._aux_sum = aux if self._aux_sum is None else self._aux_sum + aux
            self._count += 1
        logits = getattr(output, "router_logits", None)
        if logits:
            loads = []
            for layer in logits:
                chosen = layer.detach().topk(self.top_k, dim=-1).indices.reshape(-1)
                # scatter_add, not bincount: on a GPU bincount reads its input's maximum back.
                counts = torch.zeros(self.experts, device=chosen.device).scatter_add_(0, chosen, torch.ones(chosen.shape, device=chosen.device))
                loads.append(counts.max() / counts.mean().clamp_min(1e-9))
            self.load = torch.stack(loads)

    def end_step(self) -> None:
        if self._count:
            self.aux, self._aux_sum, self._count = self._aux_sum / self._count, None, 0

    def numbers(self) -> dict:
        """Host values for metrics.jsonl (a log step: the one place the device is read)."""
        out: dict = {}
        if self.aux is not None:
            out["aux_loss"] = float(self.aux)
        if self.load is not None:
            out["expert_load"] = [round(float(x), 4) for x in self.load.tolist()]
            out["expert_load_max"] = max(out["expert_load"])  # one number for trackers and the report
        return out


def active_parameters(model, experts: int, top_k: int) -> int:
    """Parameters a token passes through: all but the (experts - top_k) / experts share of the
    routed experts' weights (transformers' `*.experts.*` parameters, counted before AutoEP)."""
    total = routed = 0
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        if ".experts." in name:
            routed += n
    return total - routed * (experts - top_k) // experts


def hf_state_dict(autoep: dict, expected_shapes: dict) -> dict:
    """An AutoEP model's full state dict (every expert, fp32: DeepSpeed's universal conversion)
    renamed to the Hugging Face model's, for the export.

    AutoEP replaces a block's router with `router.gate` (aliased as `gate.gate`) and its experts
    with grouped tensors w1 (gate projection), w3 (up) as [experts, ffn, hidden] and w2 (down) as
    [experts, hidden, ffn] (DeepSpeed's moe/ep_repack.py). transformers 5 keeps the router in
    `gate.weight` and the experts as `experts.gate_up_proj` (w1 and w3 stacked along the ffn
    dimension) and `experts.down_proj`, each either as above or transposed: the expected shapes
    say which (checked, never guessed)."""
    import torch

    out: dict = {}
    for key, value in autoep.items():
        prefix, _, leaf = key.rpartition(".experts.")
        if key.endswith(".gate.gate.weight"):
            continue  # AutoEP's alias of router.gate.weight (the same parameter)
        if key.endswith(".router.gate.weight"):
            out[key.replace(".router.gate.weight", ".gate.weight")] = value
        elif leaf == "w1":  # w3 (up) joins it here
            name = f"{prefix}.experts.gate_up_proj"
            fused = torch.cat([value, autoep[f"{prefix}.experts.w3"]], dim=1)
            out[name] = fused if tuple(expected_shapes.get(name, ())) == tuple(fused.shape) else fused.transpose(1, 2).contiguous()
        elif leaf == "w3":
            continue
        elif leaf == "w2":
            name = f"{prefix}.experts.down_proj"
            want = tuple(expected_shapes.get(name, ()))
            out[name] = value if want == tuple(value.shape) else value.transpose(1, 2).contiguous()
        else:
            out[key] = value
    return out


def autoep_state_dict(hf: dict, hidden_size: int) -> dict:
    """The inverse of hf_state_dict: a Hugging Face MoE model's router and experts under AutoEP's
    names and layout (w1, w3 as [experts, ffn, hidden], w2 as [experts, hidden, ffn]); the other
    parameters are left out."""
    out: dict = {}
    for key, value in hf.items():
        prefix, _, leaf = key.rpartition(".experts.")
        if leaf == "gate_up_proj":
            fused = value if value.shape[2] == hidden_size else value.transpose(1, 2)
            ffn = fused.shape[1] // 2
            out[f"{prefix}.experts.w1"], out[f"{prefix}.experts.w3"] = fused[:, :ffn], fused[:, ffn:]
        elif leaf == "down_proj":
            out[f"{prefix}.experts.w2"] = value if value.shape[1] == hidden_size else value.transpose(1, 2)
        elif key.endswith(".gate.weight") and ".experts." not in key:
            out[key.replace(".gate.weight", ".router.gate.weight")] = value
    return out


# The per-parameter files of a universal checkpoint that hold tensors (step.pt holds the step count).
_UNIVERSAL_STATES = ("fp32", "exp_avg", "exp_avg_sq")


def _add_universal_names(zero: Path, sources: list[Path], convert) -> list[str]:
    """Write `convert({name: tensor})`'s new names as parameter folders of the universal
    checkpoint in `zero` (weights and both Adam moments, each converted the same way; the step
    count copied), each written under a temporary name and renamed. Returns the names written."""
    import torch

    written: dict[str, Path] = {}
    for state in _UNIVERSAL_STATES:
        loaded = {}
        for p in sources:
            if (p / f"{state}.pt").is_file():
                saved = torch.load(p / f"{state}.pt", weights_only=True)
                loaded[p.name] = saved["param"] if isinstance(saved, dict) else saved
        for name, (tensor, meta) in convert(loaded).items():
            written[name] = tmp = zero / f".tmp-{name}"
            tmp.mkdir(exist_ok=True)
            torch.save({"param": tensor.contiguous(), "cat_dim": 0, **meta}, tmp / f"{state}.pt")
    for name, tmp in written.items():
        if (sources[0] / "step.pt").is_file():  # ZeRO-1/2: the same step count per parameter (ZeRO-3: none)
            shutil.copyfile(sources[0] / "step.pt", tmp / "step.pt")
        shutil.rmtree(zero / name, ignore_errors=True)
        tmp.rename(zero / name)
    return list(written)


def add_hf_names(universal: Path, expected_shapes: dict) -> None:
    """Give an AutoEP universal checkpoint (DeepSpeed's ds_to_universal: every expert, each
    parameter's fp32 weights and Adam moments in zero/NAME/) the Hugging Face model's parameter
    folders too, so a run at expert_parallel=1 (transformers' own MoE blocks) loads it. The
    AutoEP folders stay: the same checkpoint still resumes with expert parallelism."""
    zero = Path(universal) / "zero"
    sources = sorted(p for p in zero.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")
                     and (".experts.w" in p.name or p.name.endswith(".router.gate.weight")))

    def convert(loaded: dict) -> dict:
        return {k: (v, {}) for k, v in hf_state_dict(loaded, expected_shapes).items() if k not in loaded}

    _add_universal_names(zero, sources, convert)


def add_autoep_names(universal: Path, hidden_size: int, experts: int, ep: int) -> None:
    """Give a one-process MoE checkpoint's universal form AutoEP's parameter folders (marked as
    expert parameters, as DeepSpeed's conversion marks them, so each rank takes its experts) and
    the optimizer group AutoEP's experts live in, so a run with expert_parallel=ep loads it.
    DeepSpeed restores optimizer groups by position: AutoEP adds a third group, `ep_size_<ep>`,
    which takes the weight-decay group's settings (experts are matrices, which decay)."""
    import torch

    zero = Path(universal) / "zero"
    sources = sorted(p for p in zero.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")
                     and (".experts.gate_up_proj" in p.name or ".experts.down_proj" in p.name
                          or (p.name.endswith(".gate.weight") and not p.name.endswith(".router.gate.weight"))))
    marked = {"is_expert_param": True, "ep_num_experts": experts}

    def convert(loaded: dict) -> dict:
        return {k: (v, marked if ".experts." in k else {}) for k, v in autoep_state_dict(loaded, hidden_size).items()}

    _add_universal_names(zero, sources, convert)
    state = torch.load(zero / "optimizer_state.pt", weights_only=False)  # written by ds_to_universal just before
    groups = [g for g in state["param_groups"] if not g.get("moe")]
    decay = next(g for g in groups if g.get("weight_decay", 0) > 0) if any(g.get("weight_decay", 0) > 0 for g in groups) else groups[0]
    state["param_groups"] = groups + [{**decay, "name": f"ep_size_{ep}", "moe": True, "params": [len(groups)]}]
    tmp = zero / ".tmp-optimizer_state.pt"
    torch.save(state, tmp)
    tmp.replace(zero / "optimizer_state.pt")
