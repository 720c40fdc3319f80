"""Export a bigtrain checkpoint (any ZeRO stage) as a Hugging Face model directory.

Memory: the weights are written shard by shard. For ZeRO checkpoints DeepSpeed's
`zero_to_fp32` reads the partitioned fp32 master weights lazily (memory-mapped; ZeRO-3
parameters are gathered from the ranks' partitions one tensor at a time), and bigtrain
materialises only the tensors of the shard being written, then frees them. The model is never
built with real weights and never held twice: the key check runs on a meta-device model.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from bigtrain.checkpoint import check_pickles, load_weights_only, read_state, resolve_checkpoint
from bigtrain.errors import UserError

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # the Hugging Face default, "5GB"


def lazy_state_dict(ckpt: Path) -> dict:
    """name -> tensor, or DeepSpeed's lazy GatheredTensor (`.contiguous()` materialises it)."""
    state = read_state(ckpt)
    if state.get("zero_stage", 0) == 0 and state.get("precision", "fp32") == "fp32":
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{ckpt}: no mp_rank_*_model_states.pt: not a complete DeepSpeed checkpoint")
        return load_weights_only(files[0], mmap=True)["module"]
    if state.get("tensor_parallel", 1) > 1 or state.get("expert_parallel", 1) > 1:
        return _universal_state_dict(ckpt)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)


def _universal_state_dict(ckpt: Path) -> dict:
    """A tensor- or expert-parallel checkpoint: each rank saved its slices of the split layers
    (or its experts, in files of their own), which zero_to_fp32 does not join. DeepSpeed's universal conversion does (once, kept next to the
    checkpoint, as for a resume at another world size): one fp32 file per whole parameter."""
    from bigtrain.checkpoint import to_universal

    root = to_universal(ckpt) / "zero"
    out = {}
    for p in sorted(root.iterdir()):
        if (p / "fp32.pt").is_file():
            saved = load_weights_only(p / "fp32.pt")
            # A dict with the whole tensor; from a ZeRO-3 checkpoint, the flat tensor alone
            # (export() gives it the model's shape).
            out[p.name] = saved["param"] if isinstance(saved, dict) else saved
    return out


def _shaped(lazy: dict, shapes: dict) -> dict:
    """Flat tensors (a ZeRO-3 universal checkpoint's) in the model's shapes; the rest as they are."""
    import math

    def fit(name, t):
        want = shapes.get(name)
        if want is not None and hasattr(t, "dim") and t.dim() == 1 and len(want) > 1 and t.numel() == math.prod(want):
            return t.view(want)
        return t

    return {k: fit(k, v) for k, v in lazy.items()}


def _write_model_dir(out: Path, hf: Path, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` writes the weights (and config) into a temporary sibling of `out`; the
    checkpoint's tokenizer files join them and the whole directory is renamed into place, so an
    interrupted export never leaves a half-written model where the old one was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=out.parent))
    try:
        fill(tmp)
        for f in iter_checkpoint_files(hf):
            shutil.copy2(f, tmp / f.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    return out


def _export_lora(ckpt: Path, out: Path, config, state: dict, max_shard_bytes: int, adapter_only: bool) -> Path:
    """A LoRA run: the wrapped model rebuilt from the checkpoint, then peft's merged weights (a
    plain transformers model) or its adapter directory (adapter_config.json, adapter_model.safetensors)."""
    from bigtrain.lora import rebuild

    model = rebuild(model_class_for(config, state.get("task")), config, state["lora"], lazy_state_dict(ckpt))

    def fill(tmp: Path) -> None:
        if adapter_only:
            # A chat template's new tokens grew the embedding: the adapter directory carries it.
            model.save_pretrained(str(tmp), save_embedding_layers=bool(state.get("resized_embedding")))
            return
        weights = model.merge_and_unload().state_dict()
        _, tied, arch = _expected_keys(config, state.get("task"))
        write_weights(weights, [k for k in weights if k not in tied], tmp, max_shard_bytes)
        config.architectures, config.dtype = [arch], "float32"
        config.save_pretrained(str(tmp))

    return _write_model_dir(out, ckpt / "hf", fill)


def model_class_for(config, task: str | None = None):
    """The transformers Auto class of the checkpoint's task (from trainer_state.json, else from
    the config's `architectures`)."""
    from bigtrain.models import auto_class, task_of_architecture

    return auto_class(task or task_of_architecture(config))


def _expected_shapes(config, task: str | None = None) -> dict:
    import torch

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_class_for(config, task).from_config(config).state_dict().items()}


def checkpoint_shapes(ckpt: Path) -> dict:
    """The Hugging Face model's parameter shapes for a checkpoint (its hf/ config and task)."""
    from bigtrain.models import load_pretrained_config

    return _expected_shapes(load_pretrained_config(str(ckpt / "hf"), where=str(ckpt)), read_state(ckpt).get("task"))


def _expected_keys(config, task: str | None = None) -> tuple[set, set, str]:
    """(state-dict keys, keys tied to another weight, class name), from a meta-device model."""
    import torch

    with torch.device("meta"):
        model = model_class_for(config, task).from_config(config)
    keys = set(model.state_dict().keys())
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings", False) else set()
    # transformers drops tied copies when saving; do the same so loading gives one shared tensor.
    tied |= {k for k in keys if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    return keys, tied, type(model).__name__


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy split in key order: a new shard starts when the next tensor would pass max_bytes."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _nbytes(t) -> int:
    import math

    return math.prod(t.shape) * 4  # written as fp32


def write_weights(lazy: dict, names: list[str], out: Path, max_shard_bytes: int) -> list[Path]:
    """Write `names` from `lazy` as fp32 safetensors shards (+ the index when there are several)."""
    from safetensors.torch import save_file

    plan = _shards({n: _nbytes(lazy[n]) for n in names}, max_shard_bytes)
    files = ["model.safetensors"] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map, total = {}, 0
    for fname, keys in zip(files, plan):
        shard = {}
        for k in keys:
            t = lazy[k].contiguous()
            shard[k] = (t.float() if t.is_floating_point() else t).clone()  # own storage: no shared or mmap'd views
            total += shard[k].numel() * shard[k].element_size()
            weight_map[k] = fname
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        del shard, t
        gc.collect()
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out / f for f in files]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def iter_checkpoint_files(hf: Path) -> Iterator[Path]:
    """The tokenizer (and other small) files saved with a checkpoint; never weights."""
    for f in sorted(hf.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES):
            yield f


def export(src: str | Path, out_dir: str | Path, overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, trust: bool = False,
           adapter_only: bool = False) -> Path:
    """Write config.json, the weights (fp32 safetensors, sharded) and the tokenizer of `src` into `out_dir`.

    Everything is written to a temporary sibling directory first and renamed into place, so an
    interrupted export never leaves a half-written model where the old one was.
    """
    ckpt = resolve_checkpoint(src, what="export")
    if not trust:
        check_pickles(ckpt, what="export")  # DeepSpeed's zero_to_fp32 unpickles freely
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"export: {out} exists and is not empty (pass --overwrite to replace it)")
    from bigtrain.models import load_pretrained_config

    state = read_state(ckpt)
    if state.get("lora") or adapter_only:
        if not state.get("lora"):
            raise UserError(f"export --adapter-only: checkpoint {ckpt} has no LoRA adapters (model.lora.r was 0)")
        config = load_pretrained_config(str(ckpt / "hf"), where="export")
        return _export_lora(ckpt, out, config, state, max_shard_bytes, adapter_only)
    weights = checkpoint_weights(ckpt, trust=True)
    return write_model(weights, weights.lazy, out, max_shard_bytes)


@dataclass
class CheckpointWeights:
    """A checkpoint's model weights as the Hugging Face model names them (lazily materialized)."""

    ckpt: Path
    config: Any  # the transformers config (checkpoint's hf/)
    lazy: dict  # name -> tensor or DeepSpeed's lazy GatheredTensor (`.contiguous()`)
    names: list  # what the export writes: every weight but tied ones
    arch: str


def checkpoint_weights(ckpt: Path, trust: bool, what: str = "export") -> CheckpointWeights:
    """Read (lazily) and check a checkpoint's full weights: any ZeRO stage, tensor- or expert-parallel."""
    from bigtrain.models import load_pretrained_config

    if not trust:
        check_pickles(ckpt, what=what)  # DeepSpeed's zero_to_fp32 unpickles freely
    config = load_pretrained_config(str(ckpt / "hf"), where=what)
    state = read_state(ckpt)
    if state.get("lora"):
        raise UserError(f"{what}: checkpoint {ckpt} holds LoRA adapters: use `bigtrain export` (it merges them) and work from that")
    lazy = lazy_state_dict(ckpt)
    expected, tied, arch = _expected_keys(config, state.get("task"))
    if state.get("expert_parallel", 1) > 1:  # AutoEP's names and layout back to the Hugging Face model's
        from bigtrain.moe import hf_state_dict

        shapes = _expected_shapes(config, state.get("task"))
        lazy = _shaped(hf_state_dict(lazy, shapes), shapes)
        wrong = [k for k, v in lazy.items() if k in shapes and tuple(v.shape) != shapes[k]]
        if wrong:
            raise UserError(f"{what}: checkpoint {ckpt}: AutoEP's weights do not map onto the model's: {wrong[:3]}")
    missing = sorted(expected - set(lazy) - tied)
    unexpected = sorted(set(lazy) - expected)
    if missing or unexpected:
        raise UserError(f"{what}: checkpoint {ckpt} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return CheckpointWeights(ckpt, config, lazy, [k for k in lazy if k not in tied], arch)


def write_model(weights: CheckpointWeights, tensors: dict, out: Path, max_shard_bytes: int) -> Path:
    """`tensors` (weights.names, materialized one at a time) as a Hugging Face directory at `out`,
    with the checkpoint's config and tokenizer."""
    config = weights.config

    def fill(tmp: Path) -> None:
        write_weights(tensors, weights.names, tmp, max_shard_bytes)
        config.architectures, config.dtype = [weights.arch], "float32"  # what the weights are
        config.save_pretrained(str(tmp))

    return _write_model_dir(out, weights.ckpt / "hf", fill)


def adapt_universal(universal: Path, ckpt: Path, saved_ep: int, ep: int) -> None:
    """Make the universal form of `ckpt` (trained at expert_parallel=saved_ep) loadable at ep.
    Between two expert-parallel sizes DeepSpeed's AutoEP reshards the experts itself; to and
    from one process's layout the parameters change names (transformers' vs AutoEP's)."""
    if (saved_ep > 1) == (ep > 1):
        return
    from bigtrain.models import load_pretrained_config
    from bigtrain.moe import add_autoep_names, add_hf_names, num_experts

    if ep == 1:
        add_hf_names(universal, checkpoint_shapes(ckpt))
    else:
        hf = load_pretrained_config(str(ckpt / "hf"), where=str(ckpt))
        add_autoep_names(universal, hf.hidden_size, num_experts(hf), ep)
