"""Experiment trackers: `train.report_to` names where rank 0's records go besides metrics.jsonl.

  tensorboard  output_dir/tensorboard (the default)
  wandb        Weights & Biases (`pip install 'bigtrain[wandb]'`); WANDB_MODE=offline writes the
               run under output_dir/wandb, to upload later with `wandb sync`
  mlflow       MLflow (`pip install 'bigtrain[mlflow]'`): MLFLOW_TRACKING_URI when set (MLflow's
               own convention), else train.mlflow.tracking_uri, else a file store output_dir/mlruns

Each tracker gets the resolved configuration once (bigtrain's and DeepSpeed's, flattened to
dotted keys) and then every metrics.jsonl record, at the record's own step. The tracker's run id
is kept in output_dir/trackers.json, so a resumed run (`--resume`) continues the same tracker
run; `--overwrite` starts new ones. metrics.jsonl stays the record of truth: a tracker that
fails while the run trains costs a warning, never the run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from bigtrain.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The module each tracker imports, and the extra that installs it.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
RUN_IDS = "trackers.json"


def check_report_to(report_to: list, where: str) -> None:
    """Every name known and its package importable; else one `error:` naming the extra."""
    for name in report_to:
        if name not in TRACKERS:
            raise UserError(f"{where}: unknown tracker '{name}' in train.report_to; choose from {', '.join(TRACKERS)}")
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{where}: train.report_to names '{name}', but the {module} package is not installed: pip install 'bigtrain[{extra}]'")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 0.002, 'deepspeed.zero_optimization.stage': 2, ...}; lists as JSON text."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix.rstrip(".")
    if isinstance(tree, (list, tuple)):
        return {key: json.dumps(tree)}
    return {key: tree}


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (bools and nested values left out), without 'step'."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class RunIds:
    """output_dir/trackers.json: {tracker: run id}, so a resume continues the same runs."""

    def __init__(self, output_dir: Path, resume: bool) -> None:
        self.path = output_dir / RUN_IDS
        self.ids: dict = {}
        if resume and self.path.is_file():
            try:
                self.ids = json.loads(self.path.read_text())
            except ValueError:
                self.ids = {}

    def get(self, name: str) -> Optional[str]:
        return self.ids.get(name)

    def set(self, name: str, run_id: str) -> None:
        self.ids[name] = run_id
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ids, indent=1) + "\n")
        os.replace(tmp, self.path)


class TensorBoard:
    name = "tensorboard"

    def __init__(self, output_dir: Path, params: dict, ids: RunIds, cfg) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(params, indent=1, default=str) + "\n```")

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, step)

    def close(self, status: str) -> None:
        self.writer.close()


class Wandb:
    """One wandb run per output_dir; the x axis of every chart is bigtrain's optimizer step."""

    name = "wandb"

    def __init__(self, output_dir: Path, params: dict, ids: RunIds, cfg) -> None:
        import wandb

        c = cfg.train.wandb
        # None leaves each to wandb's own environment variables (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME).
        self.run = wandb.init(project=c.project, entity=c.entity, name=c.name, id=ids.get("wandb"), resume="allow",
                              dir=str(output_dir), config=params, settings=wandb.Settings(silent=True, console="off"))
        # Steps logged by an interrupted attempt come again after a resume: bigtrain's step is a
        # metric of its own (wandb's internal step only ever increases).
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        ids.set("wandb", self.run.id)

    def log(self, record: dict) -> None:
        self.run.log({"step": record.get("step", 0), **scalars(record)})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Mlflow:
    """One MLflow run per output_dir, through MlflowClient (no global active run)."""

    name = "mlflow"

    def __init__(self, output_dir: Path, params: dict, ids: RunIds, cfg) -> None:
        c = cfg.train.mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or c.tracking_uri or (output_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store "in maintenance mode" behind this switch; a local
            # store needs no server, which is what a run without a tracking URI should get.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        self.uri, self.run_id = uri, ids.get("mlflow")
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or c.experiment
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            self.run_id = client.create_run(experiment_id, run_name=c.run_name or output_dir.name).info.run_id
            ids.set("mlflow", self.run_id)
        else:
            client.update_run(self.run_id, status="RUNNING")
        # Parameters cannot change in an MLflow run: a resume logs only keys it has not seen and
        # records a changed value (such as a longer train.max_steps) as a tag.
        seen = client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in seen]
        for i in range(0, len(new), 100):  # MLflow's limit per batch
            client.log_batch(self.run_id, params=new[i: i + 100])
        for k, v in flatten(params).items():
            if k in seen and seen[k] != str(v)[:6000]:
                client.set_tag(self.run_id, f"resumed.{k}", str(v)[:5000])

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars(record).items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


_CLASSES = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


class Trackers:
    """Rank 0's trackers: started with the run's parameters, each record fanned out to all."""

    def __init__(self, names: list, output_dir: Path, params: dict, cfg, resume: bool, warn) -> None:
        self.active: list = []
        self.warn = warn
        ids = RunIds(output_dir, resume)
        for name in names:
            try:
                self.active.append(_CLASSES[name](output_dir, params, ids, cfg))
            except Exception as e:  # noqa: BLE001 - a tracker (a network, a server) must never end a run
                warn(f"warning: tracker {name} could not start ({type(e).__name__}: {e}); metrics.jsonl has everything")

    def log(self, record: dict) -> None:
        for tracker in list(self.active):
            try:
                tracker.log(record)
            except Exception as e:  # noqa: BLE001 - as above
                self.warn(f"warning: tracker {tracker.name} stopped ({type(e).__name__}: {e}); metrics.jsonl has everything")
                self.active.remove(tracker)

    def close(self, status: str = "FINISHED") -> None:
        for tracker in self.active:
            try:
                tracker.close(status)
            except Exception as e:  # noqa: BLE001
                self.warn(f"warning: tracker {tracker.name} did not close cleanly ({type(e).__name__}: {e})")
        self.active = []
