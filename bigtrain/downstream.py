"""Downstream evaluation with EleutherAI's lm-evaluation-harness (the optional extra bigtrain[eval]).

The harness owns the tasks: their prompts, few-shot examples, request types and metrics. bigtrain
gives it a model: `DistributedLM`, the harness's own Hugging Face wrapper (`HFLM`) around a model
already in memory (the live model under the DeepSpeed engine during training, or one loaded for
`bigtrain eval --tasks`), which shards the requests over the data-parallel ranks through the
harness's distributed interface (rank, world size, gathers over torch.distributed) instead of
`accelerate`:

- the harness's evaluator hands each rank every world_size-th document of each task and pads the
  shorter ranks with repeats of their last request, so every rank runs the same number of
  requests; `logits_cache=False` and a fixed batch size then make the number of forward passes the
  same on every rank, which ZeRO-3 needs (each forward gathers the parameters, a collective);
- the per-document metrics are gathered on rank 0, which aggregates them (the harness's
  `_process_results`); the numbers are broadcast so every rank logs the same record.

Tasks come from the harness's registry or from local YAML files (`include_path`); a task's
relative `data_files` are read relative to the include path (bigtrain loads the tasks from there),
so a directory of tasks and their data can be copied anywhere, an offline cluster included. No
dataset or model is downloaded by bigtrain; a stock task whose data is not cached locally fails
at startup with one error line naming it.

Metrics are reported as `downstream/<task>/<metric>` (the harness's `acc,none` is `acc`; a metric
of another filter keeps it: `exact_match,flexible-extract`).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bigtrain.errors import UserError

EXTRA = "pip install 'bigtrain[eval]' (lm-evaluation-harness)"


def require_harness(what: str) -> None:
    """UserError naming the extra when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"{what} needs lm-evaluation-harness, which is not installed: {EXTRA}") from None


@dataclass
class Request:
    """What to evaluate: the harness's task names and options (eval.downstream, bigtrain eval --tasks)."""

    tasks: list
    include_path: Optional[str] = None
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8


@contextlib.contextmanager
def _in_directory(path: Optional[str]):
    """Relative data_files of local tasks are read relative to their include path."""
    if path is None:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def task_manager(req: Request, where: str):
    """The harness's TaskManager for `req`: the include path's tasks alone when they are all there
    (indexing the harness's ~15,000 stock task files takes seconds), else the stock ones too."""
    require_harness(where)
    import logging

    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):  # its notes on a model passed in memory are for its own launcher
        logging.getLogger(name).setLevel(logging.ERROR)
    include = str(Path(req.include_path).resolve()) if req.include_path else None
    if include is not None and not Path(include).is_dir():
        raise UserError(f"{where}: include_path {req.include_path} is not a directory")
    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_tasks for t in req.tasks):
            return local
    return TaskManager(include_path=include, include_defaults=True)


def load_tasks(req: Request, where: str, manager=None) -> dict:
    """The harness's task objects, their data loaded; UserError (naming `where` and the task or
    file) for an unknown task, a broken task file or missing data."""
    manager = manager or task_manager(req, where)
    include = str(Path(req.include_path).resolve()) if req.include_path else None
    unknown = [t for t in req.tasks if t not in manager.all_tasks]
    if unknown:
        hint = f" (none in {req.include_path})" if include else " (give include_path: a directory of task YAML files)"
        raise UserError(f"{where}: unknown lm-evaluation-harness task(s) {', '.join(unknown)}{hint}")
    try:
        with _in_directory(include):
            loaded = manager.load(list(req.tasks))
    except Exception as e:  # noqa: BLE001 - the harness's and datasets' errors: one line, naming the task's files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: loading task(s) {', '.join(req.tasks)} failed: {type(e).__name__}: {first}") from None
    _configure(loaded["tasks"], req.num_fewshot)
    return loaded


def _configure(tasks: dict, num_fewshot: Optional[int]) -> None:
    """Few-shot settings as the harness's own `simple_evaluate` makes them (so the numbers match its
    CLI's): num_fewshot overrides a task's default unless the task fixes 0; without it, a task
    without a default gets 0; the few-shot sampler's seed is 1234 (the CLI's default)."""
    for task in tasks.values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif num_fewshot is None and task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)


def _model_class():
    """`DistributedLM`, defined on first use (lm_eval is an optional import)."""
    global DistributedLM
    if "DistributedLM" in globals():
        return DistributedLM
    from lm_eval.models.huggingface import HFLM

    class DistributedLM(HFLM):  # noqa: D401 - see the module docstring
        """HFLM on a model in memory, its requests sharded over torch.distributed's ranks."""

        def __init__(self, model, tokenizer, batch_size: int, rank: int, world_size: int, group=None) -> None:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, logits_cache=False)
            self._rank, self._world_size, self.group = rank, world_size, group
            self.requests_seen = 0  # loglikelihood(_rolling) requests this rank ran (tests count them)

        def all_gather(self, tensor):
            import torch
            import torch.distributed as dist

            parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
            dist.all_gather(parts, tensor, group=self.group)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj, dst=0):
            import torch.distributed as dist

            out = [None] * self._world_size if self._rank == dst else None
            dist.gather_object(obj, out, dst=dst, group=self.group)
            return out

        def barrier(self) -> None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = True, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            self.requests_seen += len(requests)
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            self.requests_seen += len(requests)
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

    return DistributedLM


def run(model, tokenizer, req: Request, task_dict: dict, rank: int = 0, world_size: int = 1) -> tuple[dict, Any]:
    """Evaluate `task_dict` on `model` (every rank calls it); returns (the harness's results
    dictionary, the same on every rank; the LM wrapper)."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    lm = _model_class()(model, tokenizer, req.batch_size, rank, world_size)
    # The evaluator seeds nothing here, but task samplers draw from Python's and numpy's global
    # generators: training must not notice (its data order and dropout use their own state).
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        results = evaluate(lm=lm, task_dict=task_dict, limit=req.limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    results = dict(results) if results is not None else None  # rank 0's; None elsewhere
    if world_size > 1:
        import torch.distributed as dist

        box = [results]
        dist.broadcast_object_list(box, src=0)
        results = box[0]
    return results, lm


def flat_metrics(results: dict) -> dict[str, float]:
    """`downstream/<task>/<metric>` -> value, from the harness's results dictionary."""
    out = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if "_stderr" in name or name == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(float(value)):
                continue
            out[f"downstream/{task}/{name if filt in ('', 'none') else f'{name},{filt}'}"] = float(value)
    return out


def request_of(d) -> Request:
    """The Request of a config's eval.downstream."""
    return Request(list(d.tasks), d.include_path, d.limit, d.num_fewshot, d.batch_size)


class InLoop:
    """eval.downstream during training: the tasks are checked when the trainer starts (before any
    step), then run on the live model at evaluation steps (every `every` steps, and the last)."""

    def __init__(self, cfg, where: str) -> None:
        d = cfg.eval.downstream
        self.req, self.every, self.where = request_of(d), d.every, where
        self.manager = task_manager(self.req, where)
        loaded = load_tasks(self.req, where, self.manager)  # a bad task, task file or missing data: one error line now
        generating = [name for name, task in loaded["tasks"].items() if task.get_config("output_type") == "generate_until"]
        if generating and cfg.deepspeed.zero_stage == 3:
            # Generation runs as many forward passes as each rank's answers are long: under ZeRO-3
            # the ranks' parameter gathers would not pair up.
            raise UserError(f"{where}: task(s) {', '.join(generating)} generate text, which eval.downstream cannot run "
                            "under ZeRO-3 (score them with `bigtrain eval MODEL_DIR --tasks` on an export)")

    def due(self, step: int, last: bool) -> bool:
        return last or self.every is None or step % self.every == 0

    def run(self, model, tokenizer, rank: int, world_size: int) -> dict[str, float]:
        """Every rank: the record's `downstream/...` numbers (the same on every rank) and the
        number of requests the ranks ran together (`downstream/requests`)."""
        import torch

        # Loaded again each time: the harness keeps each evaluation's requests and answers on its task objects.
        results, lm = run(model, tokenizer, self.req, load_tasks(self.req, self.where, self.manager), rank, world_size)
        count = torch.tensor([lm.requests_seen], dtype=torch.int64)
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(count)
        return {**flat_metrics(results), "downstream/requests": int(count.item())}


def evaluate_dir(model_dir: str, req: Request, json_path: Optional[str], log=print) -> dict:
    """`bigtrain eval MODEL_DIR --tasks ...`: an exported model (or a checkpoint or run, exported
    first into a temporary directory) on the tasks; one process, or every rank under a launcher
    (torchrun, deepspeed: the requests are sharded). Rank 0 prints the metrics and writes --json."""
    import json
    import tempfile

    from bigtrain.launch import under_launcher

    require_harness("bigtrain eval --tasks")
    task_dict = load_tasks(req, "--tasks")
    rank, world = 0, 1
    if under_launcher():
        from bigtrain.process import dist_env, init_distributed, setup_accelerator

        init_distributed(setup_accelerator(), 30)
        rank, world = dist_env().rank, dist_env().world_size
    with tempfile.TemporaryDirectory(prefix="bigtrain-eval-") as tmp:
        model, tokenizer = _load_model(model_dir, Path(tmp), rank, world, log)
        results, lm = run(model, tokenizer, req, task_dict, rank, world)
    import torch

    count = torch.tensor([lm.requests_seen], dtype=torch.int64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(count)
    if rank == 0:
        for key, value in flat_metrics(results).items():
            print(f"{key}\t{value:.6g}")
        log(f"evaluated {int(count.item())} requests on {world} rank(s)")
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps({"results": results["results"]}, indent=1, default=str) + "\n")
    return results


def _load_model(model_dir: str, tmp: Path, rank: int, world: int, log) -> tuple:
    """A causal LM and its tokenizer from an exported directory, or a checkpoint/run exported first."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigtrain.tokenizer import load_tokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():  # a checkpoint or a run: rank 0 exports, the others wait
        if rank == 0:
            from bigtrain.export import export

            log(f"exporting {model_dir} to evaluate it")
            export(model_dir, tmp / "model")
        if world > 1:
            import torch.distributed as dist

            box = [str(tmp / "model")]
            dist.broadcast_object_list(box, src=0)
            path = Path(box[0])
        else:
            path = tmp / "model"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"--tasks: {model_dir} is not a causal LM the harness can score: {str(e).splitlines()[0]}") from None
    return model, load_tokenizer(str(path))
