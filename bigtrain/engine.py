"""DeepSpeed: the distributed environment, the ds_config, and `deepspeed.initialize`.

The ds_config is a template from ds_configs/ (zero{stage}.json, with "auto" placeholders in the
style of transformers' DeepSpeed integration), filled from bigtrain's keys, then the user's own
`deepspeed.config` merged over it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import socket
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any, Callable, Optional

from bigtrain.config import Config, check_batch, decide_precision, user_ds_config, where_of
from bigtrain.errors import UserError
from bigtrain.parallel import ds_config_entries


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def setup_accelerator() -> bool:
    """Choose DeepSpeed's accelerator before deepspeed is imported. Returns True when on CPU."""
    on_cpu = not has_cuda()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # bigtrain works offline: never let transformers or datasets reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return on_cpu


def free_port() -> int:
    """A free TCP port for a rendezvous, below Linux's ephemeral range (32768-60999): a port the
    kernel handed out would be free now but could go to any outgoing connection (gloo opens many)
    before rank 0 listens on it."""
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> DistEnv:
    """Rank, local rank and world size from deepspeed/torchrun (RANK...) or srun (SLURM_*)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    else:
        rank, world, local = 0, 1, 0
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
    if world == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise UserError("MASTER_ADDR and MASTER_PORT must be set for a multi-rank run (the deepspeed/torchrun launchers and bigtrain's SLURM templates set them)")
    return DistEnv(rank, local, world)


def init_distributed(on_cpu: bool, timeout_minutes: float) -> None:
    import deepspeed
    import torch

    from torch.distributed import distributed_c10d

    if not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(minutes=timeout_minutes)
    # DeepSpeed makes its own process groups (data parallel, ...) without a timeout, so they
    # would get torch's default (30 minutes, 10 for NCCL) and a lost peer would hang the job
    # that long: make deepspeed.timeout_minutes the default of every group made from here on.
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", timeout=timeout)
    # Whatever way the process ends, tear the groups down while the interpreter is still whole:
    # gloo's worker threads can hold async work whose destruction at interpreter exit aborts
    # the process (SIGABRT, "terminate called without an active exception").
    import atexit

    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


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


def leave(code: int):
    """End a rank's process after an orderly close without the interpreter's teardown.

    With the process group already destroyed and every file of ours closed, C++ destructors run
    at interpreter exit still aborted a rank now and then ("terminate called without an active
    exception", exit -6: about one test-suite run in three, in different tests, after the work had
    ended correctly). Nothing of ours needs them: run the Python exit handlers (atexit: ours and a
    caller's), flush, and go without the C++ teardown.
    """
    import atexit
    import logging

    release_shm_buffers()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def release_shm_buffers() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffers in /dev/shm (RAM): DeepSpeed leaves
    them behind (tens of MB per rank and run), and they add up until the machine runs out of memory."""
    import glob

    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_*_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env.get('LOCAL_RANK', '0')}"
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except OSError:
            pass


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
