"""Typed run configuration: YAML file + dotted `key=value` overrides, validated before anything runs.

The whole configuration is one tree of dataclasses (`Config`). A YAML file and command-line
overrides are merged into a plain dict, every key is checked against the dataclass fields
(unknown keys get a "did you mean" suggestion), every value against the field's type, and
cross-field rules (batch arithmetic, precision) are checked last. Every error names where the
value came from: `file.yaml:LINE (key)` or `override key=value`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from bigtrain.errors import UserError
from bigtrain.layout import data_parallel_size
from bigtrain.plugins import is_reference, load_object
from bigtrain.pretrained import check_pretrained_dir
from bigtrain.trackers import check_report_to

TASKS = ("clm", "mlm", "classify", "token_classify", "sft")  # their classes: tasks.BUILTIN_TASKS
LABELED_TASKS = ("classify", "token_classify")
LABELED_FORMATS = ("tsv", "csv", "jsonl", "conll")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OFFLOAD = ("none", "cpu", "nvme")
ATTN = ("auto", "bigtrain_triton", "sdpa", "eager")


@dataclass
class LoraConfig:
    # LoRA adapters through peft (bigtrain/lora.py), for causal LMs (clm, sft): r > 0 turns them
    # on, and then only the adapters train. alpha scales the update (alpha / r).
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    # Module names to adapt (None: peft's default for the model family: q_proj and v_proj for
    # Llama, c_attn for GPT-2, ...).
    target_modules: Optional[list] = None


@dataclass
class ModelConfig:
    preset: str = "tiny"
    # Overrides of the architecture (any field of the transformers config class), e.g. n_layer.
    config: dict = field(default_factory=dict)
    # A local Hugging Face model directory to start from (never a hub name: bigtrain works offline).
    from_pretrained: Optional[str] = None
    # auto: bigtrain_triton on CUDA, sdpa on CPU.
    attn_implementation: str = "auto"
    # bigtrain_triton's backward: false = dQ summed with fp32 atomics (fastest; dQ's last bits may
    # vary run to run), true = a separate dQ kernel, bitwise repeatable (~40% more backward work).
    attn_deterministic: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # Files, directories or globs of .txt/.py/.md (text), .jsonl (a `text` field), or a
    # `datasets` directory saved with save_to_disk. "@stdlib" is the Python standard library's
    # own source files: the corpus of the default job.
    train_files: list = field(default_factory=lambda: ["@stdlib"])
    valid_files: Optional[list] = None
    # Fraction of training documents held out for validation when valid_files is absent.
    valid_fraction: float = 0.005
    # A local tokenizer directory; absent: a byte-level BPE is trained on train_files.
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    seq_len: int = 128
    # packed: documents concatenated with EOS and cut into seq_len blocks (document ids kept);
    # line_by_line: each non-empty line is one example, truncated and padded.
    mode: str = "packed"
    # What one document is in a text file: the whole file, a paragraph or a line.
    sample_by: str = "document"
    text_field: str = "text"
    on_decode_error: str = "error"
    # The longest line (bytes between newlines) a text or JSON-lines file may hold. Longer lines are
    # refused before tokenizing (naming FILE:LINE): a multi-megabyte line is almost never prose, and
    # tokenizers need ~100x its size in memory. Raise it for JSON-lines files of long documents.
    max_line_bytes: int = 4 << 20
    # classify / token_classify: file format (tsv, csv, jsonl, conll; None: from the extension)
    # and what to do with a malformed row (error: stop at it; skip: skip, count and report).
    format: Optional[str] = None
    on_bad_rows: str = "error"
    # mlm: fraction of tokens chosen for prediction (80% [MASK], 10% random, 10% kept), and
    # whether all subwords of a chosen word are masked together.
    mlm_probability: float = 0.15
    whole_word_mask: bool = False
    # sft (bigtrain/chat.py): which tokens the loss learns (assistant: the replies and their
    # end-of-turn token; all: every token), and a conversation longer than seq_len
    # (truncate: keep its first seq_len tokens; skip; error). data.mode=packed packs
    # conversations apart from each other, line_by_line pads one per example.
    train_on: str = "assistant"
    on_long: str = "truncate"
    # Worker processes for tokenization (None: all cores).
    num_proc: Optional[int] = None
    # Weighted sources, a list of mappings {name, files, weight} (optional per source: text_field,
    # sample_by); absent: data.train_files is the one source, named "train". See docs/data.md.
    sources: Optional[Any] = None
    # A directory written by `bigtrain data prepare`: training reads its token shards (clm, mlm).
    prepared: Optional[str] = None
    # Without data.prepared, training prepares up to this many bytes of input itself (into the
    # cache); a larger corpus stops with the `bigtrain data prepare` command to run first.
    auto_prepare_max_bytes: int = 1_000_000_000
    # A tokenizer trained by bigtrain (no data.tokenizer) learns from a seeded sample of the
    # training sources of about this many bytes, shared by weight.
    tokenizer_sample_bytes: int = 200_000_000
    # Where tokenized, packed datasets are cached (None: $BIGTRAIN_CACHE or ~/.cache/bigtrain).
    cache_dir: Optional[str] = None


@dataclass
class WandbConfig:
    # None: wandb's own environment variables (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME), else its
    # defaults. WANDB_MODE=offline writes the run under output_dir/wandb (`wandb sync` uploads it).
    project: Optional[str] = None
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class MlflowConfig:
    # MLFLOW_TRACKING_URI wins when set (MLflow's convention); None: a file store output_dir/mlruns.
    tracking_uri: Optional[str] = None
    # MLFLOW_EXPERIMENT_NAME wins when set.
    experiment: str = "bigtrain"
    # None: the output directory's name.
    run_name: Optional[str] = None


@dataclass
class ProfileConfig:
    # torch.profiler traces of steps start .. start + steps - 1 on every rank, under
    # output_dir/profile/ (and a CUDA memory snapshot); start 0: no profiling.
    start: int = 0
    steps: int = 2


@dataclass
class TrainConfig:
    micro_batch_size: int = 16
    grad_accum: int = 1
    # Optional check: must equal micro_batch_size * grad_accum * data-parallel world size.
    global_batch_size: Optional[int] = None
    max_steps: int = 400
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    keep_last: int = 2
    # Write checkpoints in a background thread: the step loop stops only to copy the state to host
    # memory (bigtrain/async_save.py). Off by default: the copy costs host memory the size of this
    # rank's share of a checkpoint, for as long as the write takes.
    async_save: bool = False
    # At the end of a run, export the final (or best) checkpoint to output_dir/model (false: keep
    # only the checkpoints; `bigtrain export` writes the model when it is wanted).
    export: bool = True
    # The evaluation metric that picks the best checkpoint, which is kept and exported
    # (None: eval_f1 for classify/token_classify, eval_loss otherwise; loss: lower is better).
    best_metric: Optional[str] = None
    progress: bool = True
    # A non-finite loss (or gradient norm): skip the step (its samples are named), stopping with a
    # checkpoint after max_nonfinite_steps such steps in a row; or stop at once.
    on_nonfinite: str = "skip"
    max_nonfinite_steps: int = 3
    # Dump every thread's stack when a step runs longer than max(watchdog_min_seconds,
    # watchdog_factor x the median step time): the collective timeout then ends the job.
    watchdog_factor: float = 10.0
    watchdog_min_seconds: float = 120.0
    # One run per output_dir (bigtrain/runlock.py): a lock held by a run on another host whose
    # refresh is older than this is taken over (its run is gone). Same host: the pid decides.
    lock_stale_seconds: float = 300.0
    # Print a short generated sample at the end (clm).
    sample_prompt: str = "def "
    sample_tokens: int = 48
    # Where rank 0's metrics go besides metrics.jsonl (bigtrain/trackers.py): tensorboard, wandb, mlflow.
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # Compile the model with torch.compile (inductor) through DeepSpeed's engine.compile(); the
    # first training step and the first evaluation wait for the compilation (docs/hot-path.md).
    compile: bool = False
    # One device's peak TFLOP/s for the logged MFU (None: a table of GPUs; on CPU a measured matmul).
    peak_tflops: Optional[float] = None
    # clm/sft: compute the loss in chunks of tokens, never the full batch x seq x vocab fp32 logits
    # (bigtrain/loss.py). auto: on when micro_batch_size x seq_len x vocab_size >= 2**26 (256 MiB).
    chunked_loss: Union[bool, str] = "auto"
    # User callbacks (bigtrain.api.Callback): `module.path:Class`, `path/to/file.py:Class`, or a
    # mapping {class: REFERENCE, other keys: the constructor's keyword arguments}.
    callbacks: Any = field(default_factory=list)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "auto"
    offload_optimizer: str = "none"
    offload_param: str = "none"
    nvme_path: str = "/tmp/bigtrain_nvme"
    activation_checkpointing: bool = False
    # A user's whole ds_config (a JSON file path or an inline mapping), merged over bigtrain's.
    config: Union[str, dict, None] = None
    # ZeRO-3: create parameters already partitioned (deepspeed.zero.Init). auto: only for models
    # too big to build whole on one rank (> 1B parameters); smaller ones are built whole, then
    # partitioned, which gives bit-for-bit the same initial weights as stages 0-2.
    zero3_init: Union[bool, str] = "auto"
    # Collective timeout, so a lost or stuck rank never hangs the job forever (fractions allowed).
    timeout_minutes: float = 30.0
    # Model parallelism (bigtrain/parallel.py): the linear layers split over this many ranks
    # (DeepSpeed AutoTP), or each sequence split over this many ranks (DeepSpeed Ulysses). The
    # data-parallel size is world size / (tensor_parallel x sequence_parallel).
    tensor_parallel: int = 1
    sequence_parallel: int = 1
    # Mixture-of-experts models (bigtrain/moe.py): the experts split over this many ranks
    # (DeepSpeed AutoEP); the other weights stay data parallel over the whole world.
    expert_parallel: int = 1


@dataclass
class DownstreamConfig:
    # lm-evaluation-harness tasks run on the live model at evaluations (bigtrain/downstream.py;
    # the extra bigtrain[eval]); [] is off. include_path: a directory of task YAML files (their
    # relative data_files are read from it); limit: documents per task; num_fewshot: None keeps
    # each task's own; every: steps between them (None: at every evaluation).
    tasks: list = field(default_factory=list)
    include_path: Optional[str] = None
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    every: Optional[int] = None
    batch_size: int = 8


@dataclass
class EvalConfig:
    # sft: greedy replies to up to this many validation conversations (their last assistant
    # turn), scored as eval_exact_match; 0 skips generation.
    generate_examples: int = 16
    max_new_tokens: int = 64
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)


@dataclass
class ConfigOrigin:
    """Where a loaded Config came from, and what is parsed from it once: not configuration (never
    dumped, never read from YAML). `where_of(key)` names the file:line or override that set a key;
    `args` redo the config (the command-line arguments)."""

    where_of: Callable[[str], str] = lambda key: "config"  # noqa: E731
    args: list = field(default_factory=list)
    user_ds_config: Optional[dict] = None  # deepspeed.config, parsed
    source_specs: Optional[list] = None  # data.sources / train_files, checked


@dataclass
class Config:
    # A built-in task (TASKS) or a user's class: `module.path:Class` or `path/to/file.py:Class`
    # (bigtrain/api.py, docs/extending.md), with its own options in task_options.
    task: str = "clm"
    task_options: dict = field(default_factory=dict)
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Not configuration: where it came from (load_config sets it; see ConfigOrigin).
    origin: ConfigOrigin = field(default_factory=ConfigOrigin, repr=False, compare=False, metadata={"internal": True})

    def to_dict(self) -> dict:
        """The configuration (config.yaml, trackers), without its origin."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata.get("internal")}


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)


# --------------------------------------------------------------------------- loading


def _yaml_locations(text: str, path: str) -> dict[str, str]:
    """Map each dotted key in a YAML document to 'path:line' (1-based), for error messages."""
    locations: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                locations[key] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode):  # list items: 'data.sources[1].weight'
            for i, item in enumerate(node.value):
                key = f"{prefix.rstrip('.')}[{i}]"
                locations[key] = f"{path}:{item.start_mark.line + 1}"
                walk(item, key + ".")

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            walk(root, "")
    except (yaml.YAMLError, RecursionError):
        pass
    return locations


def _show(value: Any, limit: int = 80) -> str:
    """repr() of a value for an error message, cut short (a 5000-digit number is one long line)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - e.g. a recursive structure too deep to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_bad_scalar(text: str) -> Optional[tuple[int, str]]:
    """(1-based line, problem) of the first scalar that YAML parses but cannot construct.

    PyYAML raises plain ValueError/AttributeError (no line) for tagged scalars such as
    `!!timestamp 2020-13-45` or `!!int 0x`; constructing the scalars one by one finds the line.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    stack = [root] if root is not None else []
    scalars = []
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            scalars.append(node)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in reversed(node.value) for n in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    for node in scalars:
        try:
            yaml.SafeLoader("").construct_object(node, deep=True)
        except Exception as e:  # noqa: BLE001 - whatever the constructor raises is the problem
            return node.start_mark.line + 1, f"cannot read {node.value[:40]!r} as {node.tag.rsplit(':', 1)[-1]}: {e}"
    return None


def load_yaml(path: str) -> tuple[dict, dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML: nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - PyYAML's constructors raise ValueError and others, without a line
        bad = _first_bad_scalar(text)
        where, problem = (f"{path}:{bad[0]}", bad[1]) if bad else (path, f"{type(e).__name__}: {e}")
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: the config must be a mapping of keys, not {type(data).__name__}")
    return data, _yaml_locations(text, path)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"override '{item}' must look like key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception:  # noqa: BLE001 - YAMLError, or ValueError & co. from tags such as !!int 0x: keep the text
        value = raw
    return key, value


def _set_dotted(tree: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"{where}: '{part}' is not a section, cannot set '{key}'")
        node = nxt
    node[parts[-1]] = value


# Fields whose value is a free-form mapping: keys below them are not checked here.
_FREE_FORM = {"model.config", "deepspeed.config"}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type in _SECTIONS):
            keys.extend(_all_keys(_SECTIONS[f.type] if isinstance(f.type, str) else f.type, name + "."))
    return keys


_SECTIONS = {
    "ModelConfig": ModelConfig,
    "LoraConfig": LoraConfig,
    "EvalConfig": EvalConfig,
    "DataConfig": DataConfig,
    "TrainConfig": TrainConfig,
    "WandbConfig": WandbConfig,
    "MlflowConfig": MlflowConfig,
    "ProfileConfig": ProfileConfig,
    "DeepSpeedConfig": DeepSpeedConfig,
}


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.6)
    if not close:
        # Also try the last component alone (e.g. 'lr' -> 'train.lr').
        last = key.split(".")[-1]
        by_last = [k for k in _all_keys(Config) if k.split(".")[-1] == last]
        close = by_last[:1] or difflib.get_close_matches(
            last, [k.split(".")[-1] for k in _all_keys(Config)], n=1, cutoff=0.75
        )
        if close and "." not in close[0]:
            close = [k for k in _all_keys(Config) if k.endswith("." + close[0]) or k == close[0]][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def as_number(value: Any) -> Any:
    """The one rule for numbers written as text: a string that Python's float() reads is that float.

    YAML 1.1 (PyYAML) reads `1e20`, `1.0e20` and `1E-3` as strings (its floats need a dot and a
    signed exponent), and a `key=value` override is read as YAML. Callers apply this only where the
    expected type is a float (bigtrain's float keys; a `model.config.*` key whose default is a
    float), so a path or a name that happens to look like a number stays a string. Anything
    float() cannot read is returned unchanged, for the caller's usual type error.
    """
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotated type `tp`; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except UserError as e:
                errors.append(e)
        expected = " or ".join(_type_name(a) for a in args)
        raise UserError(f"{where}: '{key}' must be {expected}, got {type(value).__name__} {_show(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        value = as_number(value)  # YAML 1.1 reads '3e-4' (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                v = float(value)
            except OverflowError:  # an int beyond the float range (10**400)
                v = math.inf
            if not math.isfinite(v):
                raise UserError(f"{where}: '{key}' must be a finite number, got {_show(value)}")
            return v
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise UserError(f"{where}: '{key}' must be a path or a list of paths, got {_show(value)}")
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - every field type is listed above
        return value
    raise UserError(f"{where}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {_show(value)}")


def _build(cls: type, raw: dict, prefix: str, where_of) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in known:
            raise UserError(f"{where_of(dotted)}: unknown config key '{dotted}'{_suggest(dotted)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{where_of(dotted)}: '{dotted}' is a section and needs a mapping of keys, got {_show(value)}")
            kwargs[key] = _build(tp, value, dotted + ".", where_of)
        else:
            kwargs[key] = _coerce(value, tp, dotted, where_of(dotted))
    return cls(**kwargs)


def _check_choice(value: Any, choices: tuple, key: str, where_of) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value)[:200], [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{where_of(key)}: '{key}' must be one of {', '.join(map(str, choices))}; got {_show(value)}{hint}")


def _check_range(value: float, key: str, where_of, lo=None, hi=None, lo_open=False) -> None:
    bad = value != value or (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)  # NaN fails
    if bad:
        if lo is not None and hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo}, {hi}]"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo}"
        else:
            rng = f"<= {hi}"
        raise UserError(f"{where_of(key)}: '{key}' must be {rng}, got {_show(value)}")


def load_user_ds_config(value: Union[str, dict, None], where: str) -> dict:
    """The user's own ds_config: a JSON file or an inline mapping."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    p = Path(value)
    try:
        if not p.is_file():  # a FIFO or device is no config file either: never opened
            raise UserError(f"{where}: deepspeed.config file not found: {value}")
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:  # e.g. a name too long, or unreadable
        raise UserError(f"{where}: cannot read deepspeed.config {value}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{value}:{e.lineno}: invalid JSON in deepspeed.config: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{value}: not valid UTF-8 at byte {e.start}") from None
    except RecursionError:
        raise UserError(f"{value}: invalid JSON in deepspeed.config: nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"{value}:1: deepspeed.config must hold a JSON object")
    return data


# ds_config sections that bigtrain fills or reads: a user's value for one must be a mapping too
# (`"fp16": 5` would otherwise surface as an AttributeError, or as DeepSpeed's own traceback).
DS_SECTIONS = ("optimizer", "scheduler", "zero_optimization", "fp16", "bf16", "amp", "activation_checkpointing",
               "checkpoint", "data_types", "aio", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger")


def _check_json_mapping(value: dict, key: str, where_of) -> None:
    """A free-form mapping (model.config, deepspeed.config) must survive json.dumps: both are
    written as JSON later (config.json, ds_config.json), long after the run has started."""
    bad_key = next((k for k in value if not isinstance(k, str)), None)
    if bad_key is not None:
        raise UserError(f"{where_of(key)}: '{key}' keys must be strings, got {type(bad_key).__name__} {_show(bad_key)}")
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError) as e:
        raise UserError(f"{where_of(key)}: '{key}' must hold plain JSON values (numbers, strings, booleans, lists, mappings): {e}") from None


def _path_values(cfg: Config) -> list[tuple[str, Any]]:
    d = cfg.data
    out = [("output_dir", cfg.output_dir), ("data.tokenizer", d.tokenizer), ("data.cache_dir", d.cache_dir),
           ("model.from_pretrained", cfg.model.from_pretrained), ("deepspeed.nvme_path", cfg.deepspeed.nvme_path)]
    if isinstance(cfg.deepspeed.config, str):
        out.append(("deepspeed.config", cfg.deepspeed.config))
    out += [("data.train_files", f) for f in d.train_files] + [("data.valid_files", f) for f in d.valid_files or []]
    out.append(("data.prepared", d.prepared))
    return out


def validate(cfg: Config, where_of) -> None:
    """Cross-field and range rules. Batch rules that need the world size live in `check_batch`."""
    # One check after another, in a fixed order: a config with several mistakes always reports the same first one.
    _validate_choices(cfg, where_of)
    _validate_data_numbers(cfg, where_of)
    _validate_train_numbers(cfg, where_of)
    _validate_deepspeed(cfg, where_of)
    _validate_downstream(cfg, where_of)
    if cfg.model.from_pretrained:
        check_pretrained_dir(cfg.model.from_pretrained, where_of("model.from_pretrained"))
    if not str(cfg.output_dir).strip():
        raise UserError(f"{where_of('output_dir')}: 'output_dir' is empty")


def _validate_downstream(cfg: Config, where_of) -> None:
    """eval.downstream: task names, ranges, and a model the harness can score (a causal LM whose
    every rank holds whole samples: no tensor or sequence parallelism)."""
    d = cfg.eval.downstream
    if not isinstance(d.tasks, list) or not all(isinstance(t, str) and t.strip() for t in d.tasks):
        raise UserError(f"{where_of('eval.downstream.tasks')}: eval.downstream.tasks must be a list of task names, got {_show(d.tasks)}")
    for key, lo in (("limit", 1), ("num_fewshot", 0), ("every", 1), ("batch_size", 1)):
        if getattr(d, key) is not None:
            _check_range(getattr(d, key), f"eval.downstream.{key}", where_of, lo=lo, hi=1 << 30)
    if not d.tasks:
        return
    if task_kind(cfg) not in ("clm", "sft"):
        raise UserError(f"{where_of('eval.downstream.tasks')}: eval.downstream scores a causal LM (task=clm or sft), not task={cfg.task}")
    for key in ("tensor_parallel", "sequence_parallel"):
        if getattr(cfg.deepspeed, key) > 1:
            raise UserError(f"{where_of('eval.downstream.tasks')}: eval.downstream needs every rank to hold whole samples: "
                            f"not with deepspeed.{key}={getattr(cfg.deepspeed, key)}")


def _validate_choices(cfg: Config, where_of) -> None:
    """No NUL byte in any path; every key with a fixed set of values holds one of them."""
    for key, value in _path_values(cfg):
        if isinstance(value, str) and "\0" in value:
            raise UserError(f"{where_of(key)}: '{key}' contains a NUL byte: {_show(value)}")
    if is_reference(cfg.task):
        custom_task_options(cfg, where_of)
    else:
        _check_choice(cfg.task, TASKS, "task", where_of)
        if cfg.task_options:
            raise UserError(f"{where_of('task_options')}: task_options are for a user's task class (task: module:Class); "
                            f"task={cfg.task} takes its settings from data.* and train.*")
    callback_specs(cfg, where_of)
    _check_choice(cfg.model.attn_implementation, ATTN, "model.attn_implementation", where_of)
    _check_choice(cfg.data.mode, ("packed", "line_by_line"), "data.mode", where_of)
    _check_choice(cfg.data.sample_by, ("document", "paragraph", "line"), "data.sample_by", where_of)
    _check_choice(cfg.data.on_decode_error, ("error", "replace"), "data.on_decode_error", where_of)
    _check_choice(cfg.data.on_bad_rows, ("error", "skip"), "data.on_bad_rows", where_of)
    _check_choice(cfg.data.train_on, ("assistant", "all"), "data.train_on", where_of)
    _check_choice(cfg.data.on_long, ("truncate", "skip", "error"), "data.on_long", where_of)
    _check_range(cfg.eval.generate_examples, "eval.generate_examples", where_of, lo=0, hi=1 << 20)
    lora = cfg.model.lora
    _check_range(lora.r, "model.lora.r", where_of, lo=0, hi=1 << 16)
    _check_range(lora.alpha, "model.lora.alpha", where_of, lo=0.0, hi=1e6, lo_open=True)
    _check_range(lora.dropout, "model.lora.dropout", where_of, lo=0.0, hi=0.99)
    if lora.r > 0 and task_kind(cfg) not in ("clm", "sft"):
        raise UserError(f"{where_of('model.lora.r')}: model.lora is for causal LMs (task=clm or sft), not task={cfg.task}")
    if lora.target_modules is not None and (not isinstance(lora.target_modules, list) or not lora.target_modules
                                            or not all(isinstance(m, str) and m for m in lora.target_modules)):
        raise UserError(f"{where_of('model.lora.target_modules')}: 'model.lora.target_modules' must be a non-empty list of module names, got {_show(lora.target_modules)}")
    _check_range(cfg.eval.max_new_tokens, "eval.max_new_tokens", where_of, lo=1, hi=1 << 16)
    if cfg.data.format is not None:
        _check_choice(cfg.data.format, LABELED_FORMATS, "data.format", where_of)
    _check_range(cfg.data.mlm_probability, "data.mlm_probability", where_of, lo=0.0, hi=1.0, lo_open=True)
    best = cfg.train.best_metric
    if is_reference(cfg.task):  # a user's task names its own metrics
        return _validate_deepspeed_choices(cfg, where_of)
    allowed = ("eval_loss", "eval_accuracy", "eval_f1") if cfg.task in LABELED_TASKS else ("eval_loss",) + (("eval_accuracy",) if cfg.task == "mlm" else ())
    allowed += ("eval_exact_match",) if cfg.task == "sft" else ()
    if best is not None:
        _check_choice(best, allowed, "train.best_metric", where_of)
    _validate_deepspeed_choices(cfg, where_of)


def _validate_deepspeed_choices(cfg: Config, where_of) -> None:
    _check_choice(cfg.deepspeed.zero_stage, (0, 1, 2, 3), "deepspeed.zero_stage", where_of)
    _check_choice(cfg.deepspeed.precision, PRECISIONS, "deepspeed.precision", where_of)
    _check_choice(cfg.deepspeed.offload_optimizer, OFFLOAD, "deepspeed.offload_optimizer", where_of)
    _check_choice(cfg.deepspeed.offload_param, OFFLOAD, "deepspeed.offload_param", where_of)
    _check_choice(cfg.deepspeed.zero3_init, ("auto", True, False), "deepspeed.zero3_init", where_of)


def _validate_data_numbers(cfg: Config, where_of) -> None:
    """Ranges of the data.* numbers, and at least one training file."""
    d = cfg.data
    _check_range(d.seq_len, "data.seq_len", where_of, lo=2, hi=1 << 20)
    _check_range(d.vocab_size, "data.vocab_size", where_of, lo=300, hi=1 << 22)
    _check_range(d.valid_fraction, "data.valid_fraction", where_of, lo=0.0, hi=0.5)
    _check_range(d.max_line_bytes, "data.max_line_bytes", where_of, lo=1, hi=1 << 40)
    if d.num_proc is not None:
        _check_range(d.num_proc, "data.num_proc", where_of, lo=1, hi=1024)
    if not d.train_files:
        raise UserError(f"{where_of('data.train_files')}: 'data.train_files' is empty: give at least one file, directory or glob")
    _check_range(d.auto_prepare_max_bytes, "data.auto_prepare_max_bytes", where_of, lo=0, hi=1 << 60)
    _check_range(d.tokenizer_sample_bytes, "data.tokenizer_sample_bytes", where_of, lo=1 << 10, hi=1 << 40)
    source_specs(cfg, where_of)


def _validate_train_numbers(cfg: Config, where_of) -> None:
    """Ranges of the train.* numbers (and deepspeed.timeout_minutes, checked in their midst)."""
    t = cfg.train
    for key in ("micro_batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "eval_batches", "save_every", "keep_last"):
        _check_range(getattr(t, key), f"train.{key}", where_of, lo=1, hi=1 << 40)
    _check_range(t.warmup_steps, "train.warmup_steps", where_of, lo=0, hi=1 << 40)
    _check_range(t.sample_tokens, "train.sample_tokens", where_of, lo=0, hi=1 << 20)
    _check_range(t.seed, "train.seed", where_of, lo=0, hi=2**32 - 1)
    _check_range(t.lr, "train.lr", where_of, lo=0.0, hi=10.0, lo_open=True)
    _check_range(t.min_lr_ratio, "train.min_lr_ratio", where_of, lo=0.0, hi=1.0)
    _check_range(t.weight_decay, "train.weight_decay", where_of, lo=0.0, hi=10.0)
    _check_range(t.beta1, "train.beta1", where_of, lo=0.0, hi=1.0)
    _check_range(t.beta2, "train.beta2", where_of, lo=0.0, hi=1.0)
    _check_range(t.grad_clip, "train.grad_clip", where_of, lo=0.0, hi=1e9)
    _check_range(cfg.deepspeed.timeout_minutes, "deepspeed.timeout_minutes", where_of, lo=0.05, hi=10080)
    _check_choice(t.on_nonfinite, ("skip", "stop"), "train.on_nonfinite", where_of)
    _check_range(t.max_nonfinite_steps, "train.max_nonfinite_steps", where_of, lo=1, hi=1 << 20)
    _check_range(t.watchdog_factor, "train.watchdog_factor", where_of, lo=1.0, hi=1e6)
    _check_range(t.watchdog_min_seconds, "train.watchdog_min_seconds", where_of, lo=0.0, hi=1e7)
    _check_range(t.lock_stale_seconds, "train.lock_stale_seconds", where_of, lo=1.0, hi=1e7)
    if t.global_batch_size is not None:
        _check_range(t.global_batch_size, "train.global_batch_size", where_of, lo=1, hi=1 << 40)
    if t.peak_tflops is not None:
        _check_range(t.peak_tflops, "train.peak_tflops", where_of, lo=0.0, hi=1e9, lo_open=True)
    _check_choice(t.chunked_loss, ("auto", True, False), "train.chunked_loss", where_of)
    if t.chunked_loss is True and (task_kind(cfg) not in ("clm", "sft") or cfg.deepspeed.sequence_parallel > 1):
        why = f"task={cfg.task}" if task_kind(cfg) not in ("clm", "sft") else f"deepspeed.sequence_parallel={cfg.deepspeed.sequence_parallel} (it computes its own loss)"
        raise UserError(f"{where_of('train.chunked_loss')}: train.chunked_loss=true is for the causal-LM loss of task=clm or sft, not {why}")
    _check_range(t.profile.start, "train.profile.start", where_of, lo=0, hi=1 << 40)
    _check_range(t.profile.steps, "train.profile.steps", where_of, lo=1, hi=1 << 20)
    last = t.profile.start + t.profile.steps - 1
    if t.profile.start and last > t.max_steps:
        raise UserError(f"{where_of('train.profile.start')}: train.profile covers steps {t.profile.start}-{last}, beyond train.max_steps={t.max_steps}")
    check_report_to(t.report_to, where_of("train.report_to"))


def _validate_deepspeed(cfg: Config, where_of) -> None:
    """Offload needs ZeRO; model.config and deepspeed.config must be plain JSON; precision must agree with deepspeed.config."""
    ds = cfg.deepspeed
    if ds.offload_param != "none" and ds.zero_stage != 3:
        raise UserError(f"{where_of('deepspeed.offload_param')}: 'deepspeed.offload_param={ds.offload_param}' needs deepspeed.zero_stage=3 (got {ds.zero_stage})")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        raise UserError(f"{where_of('deepspeed.offload_optimizer')}: 'deepspeed.offload_optimizer={ds.offload_optimizer}' needs deepspeed.zero_stage >= 1")
    check_parallel_config(cfg, where_of)
    _check_json_mapping(cfg.model.config, "model.config", where_of)
    user = user_ds_config(cfg, where_of)
    _check_json_mapping(user, "deepspeed.config", where_of)
    for section in DS_SECTIONS:
        if section in user and not isinstance(user[section], dict):
            raise UserError(f"{where_of('deepspeed.config')}: deepspeed.config '{section}' must be a mapping, got {_show(user[section])}")
    decide_precision(cfg, None, where_of)  # conflicts between deepspeed.precision and deepspeed.config


def check_parallel_config(cfg, where_of) -> None:
    """The rules that need no world size and no model: sizes, task, ZeRO stage, not both."""
    ds = cfg.deepspeed
    for key in ("tensor_parallel", "sequence_parallel", "expert_parallel"):
        value = getattr(ds, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{where_of('deepspeed.' + key)}: 'deepspeed.{key}' must be a whole number, got {value!r}")
        _check_range(value, f"deepspeed.{key}", where_of, lo=1, hi=1 << 12)
    if ds.tensor_parallel == 1 and ds.sequence_parallel == 1:
        return
    key = "deepspeed.tensor_parallel" if ds.tensor_parallel > 1 else "deepspeed.sequence_parallel"
    if ds.tensor_parallel > 1 and ds.sequence_parallel > 1:
        raise UserError(f"{where_of(key)}: deepspeed.tensor_parallel={ds.tensor_parallel} with deepspeed.sequence_parallel="
                        f"{ds.sequence_parallel}: DeepSpeed does not combine AutoTP with Ulysses; choose one")
    if cfg.task != "clm":
        raise UserError(f"{where_of(key)}: {key.split('.')[1]} is for causal LM training (task=clm), not task={cfg.task}")
    if cfg.data.mode != "packed":
        raise UserError(f"{where_of(key)}: {key.split('.')[1]} needs data.mode=packed (full-length sequences)")
    if ds.zero_stage == 0:
        # Ulysses reduces gradients through the ZeRO optimizer, and a ZeRO-0 checkpoint of a split
        # model cannot be converted to DeepSpeed's universal format (resume in another layout, export).
        raise UserError(f"{where_of('deepspeed.zero_stage')}: {key.split('.')[1]} needs deepspeed.zero_stage 1, 2 or 3 "
                        f"(got 0: DeepSpeed cannot convert a ZeRO-0 checkpoint of a split model)")
    if ds.sequence_parallel > 1:
        if cfg.data.seq_len % ds.sequence_parallel:
            raise UserError(f"{where_of('data.seq_len')}: data.seq_len={cfg.data.seq_len} does not divide by "
                            f"deepspeed.sequence_parallel={ds.sequence_parallel}")


def check_batch(cfg: Config, world_size: int, where_of=None) -> int:
    """Batch-size arithmetic. Returns the global batch size (samples per optimizer step)."""
    where_of = where_of or (lambda key: "config")
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum
    dp = data_parallel_size(cfg, world_size, where_of)  # ranks holding different samples
    global_batch = per_step * dp
    ranks = f"{dp} data-parallel rank(s)" if dp != world_size else f"{world_size} rank(s)"
    size = f"world_size={world_size}" if dp == world_size else f"data-parallel size={dp} (world_size {world_size} / model-parallel ranks)"
    if t.global_batch_size is not None and t.global_batch_size != global_batch:
        hint = ""
        if t.global_batch_size % (t.micro_batch_size * dp) == 0:
            hint = f"; with micro_batch_size={t.micro_batch_size} on {ranks} use train.grad_accum={t.global_batch_size // (t.micro_batch_size * dp)}"
        raise UserError(
            f"{where_of('train.global_batch_size')}: train.global_batch_size={t.global_batch_size} does not divide into "
            f"micro_batch_size={t.micro_batch_size} x grad_accum={t.grad_accum} x {size} = {global_batch}{hint}"
        )
    user = user_ds_config(cfg, where_of)
    for key, ours in (("train_micro_batch_size_per_gpu", t.micro_batch_size), ("gradient_accumulation_steps", t.grad_accum), ("train_batch_size", global_batch)):
        theirs = user.get(key)
        if isinstance(theirs, int) and not isinstance(theirs, bool) and theirs != ours:
            raise UserError(
                f"{where_of('deepspeed.config')}: deepspeed.config sets {key}={theirs} but the train.* keys give {ours} "
                f"(micro_batch_size={t.micro_batch_size}, grad_accum={t.grad_accum}, {size})"
            )
    return global_batch


def split_config_args(items: list[str]) -> tuple[Optional[str], list[str]]:
    """`[CONFIG.yaml] [key=value ...]` from the command line -> (config path or None, overrides)."""
    config, overrides = None, []
    for i, item in enumerate(items):
        if "=" not in item and i == 0:
            config = item
        elif "=" not in item:
            raise UserError(f"unexpected argument '{item}': overrides look like key=value, and only the first argument may be a config file")
        else:
            overrides.append(item)
    return config, overrides


def load_config(path: Optional[str], overrides: list[str]) -> Config:
    """Merge a YAML file and `key=value` overrides into a validated `Config`."""
    raw: dict = {}
    locations: dict[str, str] = {}
    if path:
        raw, locations = load_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        where = f"override {item if len(item) <= 100 else item[:97] + '...'}"
        locations[key] = where
        # A dotted override below a section clears any YAML location of its parents' children.
        _set_dotted(raw, key, value, where)

    def where_of(key: str) -> str:
        k = key
        while k:
            if k in locations:
                return locations[k]
            k = k[: k.rindex("[")] if k.endswith("]") else k.rpartition(".")[0]  # data.sources[1] -> data.sources
        # A section that only an override (or YAML line) below it created: `x.y=1` -> 'x'.
        below = next((where for loc, where in locations.items() if loc.startswith(key + ".")), None)
        return below or path or "defaults"

    cfg = _build(Config, raw, "", where_of)
    validate(cfg, where_of)
    cfg.origin = ConfigOrigin(where_of, ([path] if path else []) + list(overrides))
    return cfg


def where_of(cfg: Config, key: str) -> str:
    return cfg.origin.where_of(key)


where_of_cfg = where_of  # for functions whose `where_of` parameter hides this one


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_keys_doc() -> list[tuple[str, Any]]:
    """All keys with their defaults (for `bigtrain train --help` and the README)."""
    out = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, prefix + f.name + ".")
            else:
                out.append((prefix + f.name, v))

    walk(Config(), "")
    return out


def cache_root(cfg: Config) -> Path:
    root = cfg.data.cache_dir or os.environ.get("BIGTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bigtrain")
    return Path(root)


def user_ds_config(cfg: Config, where: Optional[Callable[[str], str]] = None) -> dict:
    """The user's own ds_config (`deepspeed.config`), parsed once per Config and kept on it."""
    if cfg.origin.user_ds_config is None:
        locate = where or (lambda key: where_of(cfg, key))
        cfg.origin.user_ds_config = load_user_ds_config(cfg.deepspeed.config, locate("deepspeed.config"))
    return cfg.origin.user_ds_config


def decide_precision(cfg: Config, on_cpu: Optional[bool], where: Optional[Callable[[str], str]] = None) -> Optional[str]:
    """The one place that decides fp32, bf16 or fp16, from deepspeed.precision and the user's
    deepspeed.config. Refuses contradictions; with on_cpu=None (config validation, no device
    known yet) it only checks them and returns None."""
    where = where or (lambda key: where_of(cfg, key))
    user = user_ds_config(cfg, where)
    fp16_on = isinstance(user.get("fp16"), dict) and bool(user["fp16"].get("enabled"))
    bf16_on = isinstance(user.get("bf16"), dict) and bool(user["bf16"].get("enabled"))
    p = cfg.deepspeed.precision
    if fp16_on and bf16_on:
        raise UserError(f"{where('deepspeed.config')}: deepspeed.config enables both fp16 and bf16; choose one (deepspeed.precision)")
    if (fp16_on and p == "bf16") or (bf16_on and p == "fp16"):
        other = "fp16" if fp16_on else "bf16"
        raise UserError(f"{where('deepspeed.precision')}: deepspeed.precision={p} but deepspeed.config enables {other}: fp16 and bf16 cannot both be on")
    if on_cpu is None:
        return None
    if p == "auto":
        if fp16_on or bf16_on:
            p = "fp16" if fp16_on else "bf16"
        elif on_cpu:
            p = "fp32"
        else:
            import torch

            p = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if p == "fp16" and on_cpu:
        raise UserError(f"{where('deepspeed.precision')}: deepspeed.precision=fp16 needs a GPU: DeepSpeed does not support fp16 on CPU (use bf16 or fp32)")
    return p


# --------------------------------------------------------------------------- data sources


@dataclass(frozen=True)
class SourceSpec:
    """One weighted training source: `data.sources[i]`, or data.train_files as the source "train"."""

    name: str
    files: tuple
    weight: float
    text_field: str
    sample_by: str
    key: str  # the config key that holds it, for messages


SOURCE_KEYS = ("name", "files", "weight", "text_field", "sample_by")
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def source_specs(cfg: Config, where_of=None) -> list[SourceSpec]:
    """The training sources, checked once per Config (kept on it). Errors name the entry."""
    if cfg.origin.source_specs is not None:
        return cfg.origin.source_specs
    where_of = where_of or (lambda key: globals()["where_of"](cfg, key))
    d = cfg.data
    if d.sources is None:
        specs = [SourceSpec("train", tuple(d.train_files), 1.0, d.text_field, d.sample_by, "data.train_files")]
    else:
        if not isinstance(d.sources, list) or not d.sources:
            raise UserError(f"{where_of('data.sources')}: 'data.sources' must be a non-empty list of mappings {{name, files, weight}}, got {_show(d.sources)}")
        specs = [_source_spec(cfg, i, entry, where_of) for i, entry in enumerate(d.sources)]
        names = [s.name for s in specs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise UserError(f"{where_of('data.sources')}: data.sources: source name '{dup}' appears more than once")
    cfg.origin.source_specs = specs
    return specs


def _source_spec(cfg: Config, i: int, entry: Any, where_of) -> SourceSpec:
    key = f"data.sources[{i}]"
    where = where_of(key)
    if not isinstance(entry, dict):
        raise UserError(f"{where}: '{key}' must be a mapping {{name, files, weight}}, got {_show(entry)}")
    unknown = [k for k in entry if k not in SOURCE_KEYS]
    if unknown:
        raise UserError(f"{where_of(f'{key}.{unknown[0]}')}: unknown key '{unknown[0]}' in {key} (known: {', '.join(SOURCE_KEYS)})")
    for required in ("name", "files"):
        if required not in entry:
            raise UserError(f"{where}: {key} has no '{required}'")
    name = entry["name"]
    if not isinstance(name, str) or not _SOURCE_NAME.fullmatch(name):
        raise UserError(f"{where_of(key + '.name')}: {key}.name must be 1-64 letters, digits, '_', '.' or '-' (it names a directory), got {_show(name)}")
    files = _coerce(entry["files"], list, f"{key}.files", where_of(key + ".files"))
    if not files:
        raise UserError(f"{where_of(key + '.files')}: {key}.files: source '{name}' has no files")
    weight = as_number(entry.get("weight", 1.0))
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(float(weight)) or float(weight) <= 0:
        raise UserError(f"{where_of(key + '.weight')}: {key}.weight: source '{name}': a weight must be a positive finite number, got {_show(entry.get('weight'))}")
    text_field = entry.get("text_field", cfg.data.text_field)
    sample_by = entry.get("sample_by", cfg.data.sample_by)
    if not isinstance(text_field, str) or not text_field:
        raise UserError(f"{where_of(key + '.text_field')}: {key}.text_field: source '{name}': must be a non-empty string, got {_show(text_field)}")
    _check_choice(sample_by, ("document", "paragraph", "line"), f"{key}.sample_by", where_of)
    return SourceSpec(name, tuple(files), float(weight), text_field, sample_by, key)


# --------------------------------------------------------------------------- user code


# The models a user's task can train (`model_task` on its class; bigtrain/api.py).
MODEL_TASKS = ("clm", "mlm", "classify", "token_classify")
_TASK_MEMBERS = ("model_task", "tokenizer_dir", "prepare", "open", "load", "configure", "use_attention", "schedule",
                 "describe", "progress", "batch", "evaluate")


def task_class(cfg: Config, where_of=None) -> type:
    """The class a `task: module:Class` names, checked to be a task (bigtrain.api.Task)."""
    where = (where_of or (lambda k: where_of_cfg(cfg, k)))("task")
    cls = load_object(cfg.task, where)
    if not isinstance(cls, type):
        raise UserError(f"{where}: task {cfg.task} is not a class")
    missing = [m for m in _TASK_MEMBERS if not hasattr(cls, m)]
    if missing:
        raise UserError(f"{where}: task class {cls.__name__} lacks {', '.join(missing)} (bigtrain.api.Task; subclass bigtrain.api.BaseTask)")
    if getattr(cls, "model_task", None) not in MODEL_TASKS:
        raise UserError(f"{where}: {cls.__name__}.model_task must be one of {', '.join(MODEL_TASKS)}, got {_show(getattr(cls, 'model_task', None))}")
    return cls


def custom_task_options(cfg: Config, where_of=None) -> Any:
    """task_options built into the task class's `Options` dataclass (typed, each key checked
    where it was set); None for a class without Options (then task_options must be empty)."""
    where_of = where_of or (lambda k: where_of_cfg(cfg, k))
    cls = task_class(cfg, where_of)
    options = getattr(cls, "Options", None)
    if options is None or not dataclasses.is_dataclass(options):
        if cfg.task_options:
            raise UserError(f"{where_of('task_options')}: {cls.__name__} takes no task_options (it has no Options dataclass)")
        return None
    known = [f.name for f in dataclasses.fields(options)]
    for key in cfg.task_options:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean 'task_options.{close[0]}'?)" if close else f" ({cls.__name__}.Options has {', '.join(known) or 'none'})"
            raise UserError(f"{where_of(f'task_options.{key}')}: unknown config key 'task_options.{key}'{hint}")
    return _build(options, cfg.task_options, "task_options.", where_of)


def task_kind(cfg: Config) -> str:
    """The kind of model the run trains: the task's name for a built-in one ("sft" trains a
    causal LM like "clm"), a user's task class's `model_task`."""
    return task_class(cfg).model_task if is_reference(cfg.task) else cfg.task


def callback_specs(cfg: Config, where_of=None) -> list[tuple[type, dict, str]]:
    """train.callbacks as (class, keyword arguments, "where: key"), each entry checked where it was set."""
    where_of = where_of or (lambda k: where_of_cfg(cfg, k))
    entries = cfg.train.callbacks
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, list):
        raise UserError(f"{where_of('train.callbacks')}: 'train.callbacks' must be a list of 'module:Class' references, got {_show(entries)}")
    out = []
    for i, entry in enumerate(entries):
        key = f"train.callbacks[{i}]"
        ref, kwargs = (entry.get("class"), {k: v for k, v in entry.items() if k != "class"}) if isinstance(entry, dict) else (entry, {})
        if not isinstance(ref, str):
            raise UserError(f"{where_of(key)}: '{key}' must be 'module:Class' or a mapping with a 'class' key, got {_show(entry)}")
        cls = load_object(ref, f"{where_of(key)}: {key}")
        if not isinstance(cls, type) or not callable(getattr(cls, "on_step_end", None)):
            raise UserError(f"{where_of(key)}: {key}: {ref} is not a callback class (subclass bigtrain.api.Callback)")
        out.append((cls, kwargs, f"{where_of(key)}: {key}"))
    return out
