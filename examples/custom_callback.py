"""A callback written only against bigtrain's public API (bigtrain.api): early stopping.

After each evaluation it compares the watched metric with the best so far; when `patience`
evaluations in a row have not improved it by more than `min_delta`, it asks the loop to stop
(after that step's checkpoint, if one is due; the best checkpoint is kept and exported as usual).

    train:
      callbacks:
        - {class: examples/custom_callback.py:EarlyStopping, metric: eval_loss, patience: 3}
"""

from __future__ import annotations

from typing import Optional

from bigtrain.api import Callback


class EarlyStopping(Callback):
    def __init__(self, metric: str = "eval_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min") -> None:
        if patience < 1 or mode not in ("min", "max"):
            raise ValueError("patience must be >= 1 and mode 'min' or 'max'")
        self.metric, self.patience, self.min_delta, self.sign = metric, patience, min_delta, 1.0 if mode == "min" else -1.0
        self.best: Optional[float] = None
        self.bad = 0

    def state_dict(self) -> dict:  # saved with each checkpoint: a resumed run goes on counting
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = state["best"], state["bad"]

    def on_eval(self, state, evaluation) -> None:
        value = evaluation.record.get(self.metric)
        if value is None:
            return
        if self.best is None or self.sign * (self.best - value) > self.min_delta:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            state.request_stop(f"early stopping: {self.metric} has not improved on {self.best:.4f} by more than "
                               f"{self.min_delta} in {self.patience} evaluation(s)")
