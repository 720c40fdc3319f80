"""bigtrain's extension API: a task or a callback written outside bigtrain, named in a config.

    task: examples/custom_task.py:ReverseTask       # or my_package.tasks:ReverseTask
    task_options: {digits: 6}                       # the task's own typed options
    train:
      callbacks:
        - examples/custom_callback.py:EarlyStopping # or {class: ..., patience: 2}

Everything here is public and stable; the rest of bigtrain is not (docs/extending.md).

A task (`Task`) is the whole contract between the trainer and the data: the trainer, the
evaluation, `bigtrain eval` and the export call nothing else on it and set nothing on it. It
names the model it trains (`model_task`: one of bigtrain's model kinds), gives the tokenizer,
the training micro-batches (dicts of tensors the model's forward takes, `labels` included) in an
order a schedule decides, and the evaluation. Subclass `BaseTask` for the defaults.

A callback (`Callback`) sees the loop through events, each with the `TrainState`: train start,
the end of every step (with the step's `StepResult`, whose numbers are still on the device:
reading them makes the host wait, docs/hot-path.md), each metrics record logged (host numbers),
each evaluation, each checkpoint saved, a stop (with its reason) and the end of training. A
callback may ask for an evaluation, a checkpoint or a stop at the current step through the state.
Callbacks run on every rank, with the same numbers on each; a request from any rank counts on
all ranks only if every rank makes it (they see the same events, so they do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable

# What a task's code builds on (stable names): an evaluation's result, how an evaluation reaches
# the other ranks, the seeded and resumable order of sample ids that the built-in tasks use, and
# the label that is not learned.
from bigtrain.mixture import MixtureSchedule
from bigtrain.evaluation import Comm, Evaluation
from bigtrain.loss import IGNORE

__all__ = ["Task", "BaseTask", "Schedule", "Callback", "TrainState", "Evaluation", "Comm", "MixtureSchedule", "IGNORE", "MODEL_TASKS"]

# The models a task can train (bigtrain/models.py builds them): causal LM, masked LM, a sequence
# classifier, a token classifier.
MODEL_TASKS = ("clm", "mlm", "classify", "token_classify")


@runtime_checkable
class Schedule(Protocol):
    """Which samples each step takes: the sample ids of the global batch at a position (every
    rank's), and this rank's micro-batches there (arrays of sample ids for `Task.batch`)."""

    def global_ids(self, position: int) -> list[int]: ...

    def micro_batches(self, position: int) -> list: ...


@runtime_checkable
class Task(Protocol):
    """The contract between the trainer and a task (every member is used; see BaseTask)."""

    name: str  # shown in the startup line and trainer_state.json
    model_task: str  # the model it trains: "clm", "mlm", "classify" or "token_classify"
    best_metric: Optional[str]  # the evaluation metric that picks the best checkpoint (None: eval_loss)
    added_tokens: list[int]  # ids of tokens the task added to a pretrained tokenizer (the embedding grows)

    @property
    def tokenizer_dir(self) -> Path: ...

    def prepare(self, rank: int, joined: bool, log: Callable[[str], None]) -> None:
        """Read, check and cache the data: called on every rank before the process group exists
        (joined=False: bad data stops the job before any collective) and after (joined=True)."""

    def open(self) -> None:
        """Open what `prepare` made (before the tokenizer is loaded)."""

    def load(self, tokenizer) -> None:
        """The datasets, tokenized with the run's tokenizer."""

    def configure(self, hf_config) -> None:
        """What the model's config needs from the data (labels), before the model is built."""

    def use_attention(self, attn_implementation: str) -> None:
        """The attention the run chose (a task that packs documents hands bigtrain_triton segment ids)."""

    def schedule(self, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int) -> Schedule: ...

    def describe(self) -> str:
        """A few words on the data for the startup line."""

    def progress(self, position: int) -> dict:
        """Numbers about the data at sample `position` for metrics.jsonl (epochs per source...)."""

    def batch(self, indices, position: int) -> dict:
        """One training micro-batch (CPU tensors; the prefetch thread calls it)."""

    def evaluate(self, forward: Callable[[dict], Any], comm) -> "Evaluation":
        """Validation metrics: `forward(batch)` is the model's output on a device batch."""


class BaseTask:
    """Defaults for a user's task: no labels to configure, no added tokens, evaluation by loss."""

    name = "custom"
    model_task = "clm"
    best_metric: Optional[str] = None
    added_tokens: list[int] = []

    def prepare(self, rank: int, joined: bool, log: Callable[[str], None]) -> None:
        pass

    def open(self) -> None:
        pass

    def configure(self, hf_config) -> None:
        pass

    def use_attention(self, attn_implementation: str) -> None:
        pass

    def describe(self) -> str:
        return self.name

    def progress(self, position: int) -> dict:  # noqa: ARG002 - nothing to report by default
        return {}


@dataclass
class TrainState:
    """Where training is: the one object the trainer advances, saves with every checkpoint
    (`saved()`, in trainer_state.json) and restores as a whole on a resume (`restore`); the
    callbacks see it and make their requests through it."""

    step: int
    samples_seen: int
    max_steps: int
    output_dir: Path
    rank: int
    world_size: int
    last_eval: dict = field(default_factory=dict)
    skipped_steps: int = 0  # non-finite steps skipped so far, over every resume
    stop_reason: Optional[str] = None
    eval_requested: bool = False
    save_requested: bool = False

    def saved(self) -> dict:
        """What a checkpoint keeps of the state (the requests are this step's only)."""
        return {"step": self.step, "samples_seen": self.samples_seen, "skipped_steps": self.skipped_steps, "last_eval": self.last_eval}

    def restore(self, saved: dict) -> None:
        """The state of a checkpoint (older ones lack skipped_steps and last_eval: 0 and none)."""
        self.step, self.samples_seen = saved["step"], saved["samples_seen"]
        self.skipped_steps, self.last_eval = saved.get("skipped_steps", 0), dict(saved.get("last_eval") or {})

    def request_stop(self, reason: str) -> None:
        """End training after this step (its evaluation and checkpoint, if due or requested)."""
        self.stop_reason = self.stop_reason or reason

    def request_eval(self) -> None:
        self.eval_requested = True

    def request_save(self) -> None:
        self.save_requested = True


class Callback:
    """Subclass and override the events you need (each does nothing by default)."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_phase(self, name: str) -> None:
        """After each part of a step: "data", "forward", "backward", "step" (timing tools)."""

    def on_step_end(self, state: TrainState, result) -> None:
        pass

    def on_log(self, state: TrainState, record: dict) -> None:
        pass

    def on_eval(self, state: TrainState, evaluation) -> None:
        pass

    def on_save(self, state: TrainState, path: Path) -> None:
        pass

    def on_stop(self, state: TrainState, reason: str) -> None:
        pass

    def on_train_end(self, state: TrainState, outcome) -> None:
        pass

    def state_dict(self) -> dict:
        """What a resumed run needs of this callback (JSON-able; saved in every checkpoint's
        trainer_state.json). Empty: nothing to save."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, when a run resumes from a checkpoint."""
