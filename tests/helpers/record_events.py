"""A callback that writes every event it sees, in order, to a JSON-lines file (tests/test_extending.py)."""

from __future__ import annotations

import json

from bigtrain.api import Callback


class Recorder(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, event: str, state, **extra) -> None:
        if state.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "step": state.step, **extra}) + "\n")

    def on_train_start(self, state) -> None:
        self._write("train_start", state)

    def on_step_end(self, state, result) -> None:
        self._write("step_end", state, applied=hasattr(result, "loss"))

    def on_log(self, state, record) -> None:
        self._write("log", state, record_step=record["step"], loss=record["loss"])

    def on_eval(self, state, evaluation) -> None:
        self._write("eval", state, metrics=sorted(evaluation.record))

    def on_save(self, state, path) -> None:
        self._write("save", state, path=str(path))

    def on_stop(self, state, reason) -> None:
        self._write("stop", state, reason=reason)

    def on_train_end(self, state, outcome) -> None:
        self._write("train_end", state, status=outcome.status)
