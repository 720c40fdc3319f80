"""DeepSpeed: the ds_config, `deepspeed.initialize`, compilation and the fp16 loss-scale watch.
(The process around it, ranks, the process group and exit, is bigtrain/process.py.)

The ds_config is a template from ds_configs/ (zero{stage}.json, with "auto" placeholders in the
style of transformers' DeepSpeed integration), filled from bigtrain's keys, then the user's own
`deepspeed.config` merged over it.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any, Callable, Optional

from bigtrain.config import Config, check_batch, decide_precision, user_ds_config, where_of
from bigtrain.parallel import ds_config_entries


def template_name(stage: int, offload_optimizer: str, offload_param: str) -> str:
    """The ds_configs/ template for a stage and offload choice (the keys then fill its "auto"s)."""
    if stage == 3 and "nvme" in (offload_optimizer, offload_param):
        return "zero3_nvme"
    if stage == 3 and offload_optimizer == "cpu" and offload_param == "cpu":
        return "zero3_offload"
    if stage == 2 and offload_optimizer == "cpu":
        return "zero2_offload"
    return f"zero{stage}"


def load_template(name: str) -> dict:
    text = resources.files("bigtrain.ds_configs").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def _fill(node: Any, values: dict, path: str = "") -> Any:
    """Replace every "auto" in the template by values[dotted path]."""
    if isinstance(node, dict):
        return {k: _fill(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node == "auto":
        if path not in values:
            raise KeyError(f"no value for 'auto' at {path}")
        return values[path]
    return node


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_ds_config(cfg: Config, world_size: int, on_cpu: bool) -> dict:
    """The full DeepSpeed JSON for this run."""
    t, ds = cfg.train, cfg.deepspeed
    global_batch = check_batch(cfg, world_size, lambda k: where_of(cfg, k))
    precision = decide_precision(cfg, on_cpu)
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": global_batch,
        "gradient_clipping": t.grad_clip,
        "optimizer.params.lr": t.lr,
        "optimizer.params.betas": [t.beta1, t.beta2],
        "optimizer.params.weight_decay": t.weight_decay,
        "scheduler.params.total_num_steps": t.max_steps,
        # DeepSpeed needs at least one warmup step; with warmup_steps=0 that step starts at full lr.
        "scheduler.params.warmup_num_steps": max(1, min(t.warmup_steps, t.max_steps - 1)),
        "scheduler.params.warmup_min_ratio": 0.0 if t.warmup_steps > 0 else 1.0,
        "scheduler.params.cos_min_ratio": t.min_lr_ratio,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        # ZeRO-3 bucket sizes (DeepSpeed's defaults; tune in deepspeed.config for very large models).
        "zero_optimization.reduce_bucket_size": 5e8,
        "zero_optimization.stage3_prefetch_bucket_size": 5e7,
        "zero_optimization.stage3_param_persistence_threshold": 1e5,
    }
    for kind in ("optimizer", "param"):
        values[f"zero_optimization.offload_{kind}.pin_memory"] = not on_cpu
        values[f"zero_optimization.offload_{kind}.nvme_path"] = ds.nvme_path
    conf = _fill(load_template(template_name(ds.zero_stage, ds.offload_optimizer, ds.offload_param)), values)
    zo = conf["zero_optimization"]
    for kind, key in (("optimizer", ds.offload_optimizer), ("param", ds.offload_param)):
        if key == "none":
            zo.pop(f"offload_{kind}", None)
        else:
            entry = zo.setdefault(f"offload_{kind}", {})
            entry["device"] = key
            entry.setdefault("pin_memory", not on_cpu)
            if key == "nvme":
                entry.setdefault("nvme_path", ds.nvme_path)
    if ds.offload_optimizer == "none" and (on_cpu or (precision == "fp32" and ds.zero_stage == 0)):
        # torch's fused AdamW: on CPU DeepSpeed's FusedAdam would be a JIT-compiled op (same
        # math), and with fp32 at ZeRO-0, where DeepSpeed has no overflow check, it is the one
        # optimizer that can skip a non-finite step on the device (`found_inf`, see steps.py).
        conf["optimizer"]["params"].update(torch_adam=True, fused=True)
    conf.update(ds_config_entries(cfg))
    if cfg.deepspeed.tensor_parallel > 1:
        # DeepSpeed builds its batch arithmetic before the tensor-parallel groups exist and
        # counts the whole world as data parallel: give it micro batch and accumulation only.
        conf.pop("train_batch_size", None)
    conf = deep_merge(conf, user_ds_config(cfg))
    return conf


def precision_of(ds_config: dict) -> str:
    if ds_config.get("bf16", {}).get("enabled") is True:
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled") is True:
        return "fp16"
    return "fp32"


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and normalization weights (1-D parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    # Named: DeepSpeed's expert parallelism splits each group into expert and shared parameters by name.
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups


def initialize(model, ds_config: dict, weight_decay: float, mpu=None):
    """`deepspeed.initialize` with bigtrain's parameter groups (and Ulysses' mpu); returns the engine."""
    import deepspeed

    if ds_config.get("expert_parallel", {}).get("enabled"):
        from bigtrain.moe import install_autoep_compat

        install_autoep_compat()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay), config=ds_config, mpu=mpu)
    return engine


def compile_engine(engine) -> None:
    """train.compile: torch.compile the engine's model, through DeepSpeed's own `engine.compile()`.

    Why DeepSpeed's and not `torch.compile(model)` before `deepspeed.initialize`:
    - `engine.compile()` compiles in place (`nn.Module.compile`): `engine.module` stays the
      transformers model, so checkpoints, the export and `save_pretrained` see the same state dict
      keys as without compile. `torch.compile(model)` returns an `OptimizedModule` wrapper whose
      keys carry an `_orig_mod.` prefix, and DeepSpeed would checkpoint those.
    - The engine knows it is compiled (`engine.is_compiled`, its compile settings for compiled
      autograd and DeepCompile), and its ZeRO-3 parameter-gathering hooks are
      `torch.compiler.disable`d: they run eager between the compiled pieces.
    - It uses the accelerator's backend: inductor on CUDA and on CPU (a C++ compiler is needed).
    Checked on CPU here (DeepSpeed 0.19.8, torch 2.13): ZeRO-0, losses equal to eager to ~1e-7
    (tests/test_compile.py). DeepCompile (ds_config `compile.deepcompile`) stays off unless the
    user's deepspeed.config turns it on; this is plain torch.compile of the model.
    Compiling is lazy: the first forward in training mode (and the first evaluation, without
    gradients) compiles; later steps run the compiled graphs.
    """
    _pin_loss_function(engine.module)
    engine.compile()


def _pin_loss_function(module) -> None:
    """A transformers model whose class name maps to no loss type (GPT2LMHeadModel, ...) looks
    its loss up on every forward and logs a `warning_once` that it falls back to ForCausalLMLoss;
    dynamo cannot trace a logging call and breaks the forward graph there on every compile. Set
    that same fallback once, so the forward and its loss compile as one graph."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING

    for m in module.modules():
        if isinstance(m, PreTrainedModel) and "_loss_function" not in m.__dict__ and getattr(m, "loss_type", None) not in LOSS_MAPPING:
            m.loss_function = LOSS_MAPPING["ForCausalLM"]


def compile_summary() -> str:
    """What torch.compile did in this process: graphs compiled and graph breaks (dynamo's counters)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    return f"{graphs} graph(s) compiled, {breaks} graph break(s)"


# DeepSpeed's DynamicLossScaler raises a bare Exception with this text when it would go below its minimum.
DEEPSPEED_MIN_SCALE_MESSAGE = "loss scale already at minimum"


def loss_scale_of(engine) -> float:
    """The current dynamic loss scale of an fp16 engine (FP16_Optimizer, ZeRO 1-3 all expose it)."""
    return float(engine.optimizer.loss_scale)


class LossScaleWatch:
    """fp16 with DeepSpeed's dynamic loss scaling: see and report every skipped step.

    DeepSpeed skips an optimizer step whose gradients hold inf/NaN, and halves the scale after
    `hysteresis` such steps in a row; it raises the scale again after `loss_scale_window` clean
    steps. A skipped step leaves the weights and the LR schedule as they were, so checkpoints
    around it stay good. Once overflowing steps have driven the scale down to `min_loss_scale`,
    gradients overflow even unscaled; the next overflow would make DeepSpeed raise. The run has
    diverged, and bigtrain stops it instead of burning GPU hours, keeping the last checkpoint it
    wrote (it writes none at that point).

    `read_scale` and `step_applied` are the engine's (`loss_scale_of`, `engine.was_step_applied`);
    they are parameters so the logic can be tested on CPU, where DeepSpeed refuses fp16.
    No host synchronisation is added: DeepSpeed already read the overflow flag on the host.
    """

    def __init__(self, read_scale: Callable[[], float], step_applied: Callable[[], bool], min_scale: float) -> None:
        self.read_scale = read_scale
        self.step_applied = step_applied
        self.min_scale = float(min_scale)
        self.scale = float(read_scale())
        self.skipped = 0
        self.floor_step: Optional[int] = None

    @classmethod
    def for_engine(cls, engine, ds_config: dict) -> "LossScaleWatch":
        min_scale = ds_config.get("fp16", {}).get("min_loss_scale", 1)
        return cls(lambda: loss_scale_of(engine), engine.was_step_applied, min_scale)

    def after_step(self, step: int) -> Optional[dict]:
        """Call once per optimizer step; returns a metrics record when the step was skipped."""
        applied = self.step_applied()
        before, self.scale = self.scale, float(self.read_scale())
        if applied:
            return None
        self.skipped += 1
        if self.scale <= self.min_scale:
            self.floor_step = step  # overflowing steps brought it to the floor: nothing left to lower
        return {"step": step, "skipped_step": True, "reason": "fp16 overflow", "loss_scale_before": before, "loss_scale": self.scale}

    def floor_message(self, step: int) -> str:
        return (
            f"fp16 loss scale fell to its minimum ({self.min_scale:g}) at step {step} after overflowing steps "
            f"({self.skipped} skipped in this run): the loss has diverged in fp16"
        )
