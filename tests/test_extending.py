"""bigtrain as a library: a user's task and callback (examples/custom_task.py, custom_callback.py),
written only against bigtrain.api, trained by `bigtrain train` from a config that names them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from common import REPO

TASK = f"{REPO / 'examples' / 'custom_task.py'}:ReverseTask"
STOPPER = f"{REPO / 'examples' / 'custom_callback.py'}:EarlyStopping"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


RECORDER = f"{REPO / 'tests' / 'helpers' / 'record_events.py'}:Recorder"
SHORT = ["train.max_steps=100", "train.eval_every=25", "train.save_every=25", "train.log_every=1", "train.progress=false"]


def callbacks(events: Path) -> str:
    """Early stopping that no evaluation can satisfy (min_delta 100): training ends at the
    second evaluation; and a recorder of every event."""
    return (f"train.callbacks=[{{class: '{STOPPER}', metric: eval_loss, patience: 1, min_delta: 100}}, "
            f"{{class: '{RECORDER}', path: '{events}'}}]")


@pytest.fixture(scope="module")
def reverse_run(cli, tmp_path_factory):
    """examples/custom_task.yaml, shortened (evaluations and checkpoints every 25 steps)."""
    root = tmp_path_factory.mktemp("extending")
    out = root / "reverse"
    r = cli(["train", str(REPO / "examples" / "custom_task.yaml"), f"task={TASK}", f"output_dir={out}", *SHORT,
             callbacks(root / "events.jsonl")])
    return r, out, root


def test_a_users_task_trains_and_its_metric_improves(reverse_run):
    r, out, _ = reverse_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bigtrain: reverse llama-tiny" in r.stderr, r.stderr[-2000:]  # the task's own name in the startup line
    evals = {x["step"]: x for x in records(out) if "eval_reverse_accuracy" in x}
    # Chance is 0.1 per digit; 50 steps of training take it well past that, and past step 25's.
    assert sorted(evals) == [25, 50], evals
    assert evals[50]["eval_reverse_accuracy"] > max(0.3, evals[25]["eval_reverse_accuracy"] + 0.1), evals
    state = json.loads((out / "checkpoints" / "step_00000050" / "trainer_state.json").read_text())
    assert state["task"] == "clm"  # what the export builds: the model the task trains
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(out / "model")).architectures == ["LlamaForCausalLM"]


def test_early_stopping_ends_the_run_at_the_evaluation_that_did_not_improve(reverse_run):
    r, out, _ = reverse_run
    steps = [x["step"] for x in records(out) if "loss" in x]
    assert steps == list(range(1, 51)), steps  # stopped at the second evaluation, not at train.max_steps=100
    assert "stopping at step 50: early stopping: eval_loss has not improved" in r.stderr, r.stderr[-2000:]
    assert (out / "model" / "config.json").is_file()  # a run stopped on purpose is exported
    # Each save records how long the loop stood still for it, under the checkpoint's name.
    saves = [(x["step"], x["checkpoint"]) for x in records(out) if x.get("checkpoint_blocking_s", 0) > 0]
    assert saves == [(25, "step_00000025"), (50, "step_00000050")], saves


def test_every_event_reaches_a_callback_in_order(reverse_run):
    _, out, root = reverse_run
    events = [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "train_start" and kinds[-2:] == ["stop", "train_end"], kinds
    assert [e["step"] for e in events if e["event"] == "step_end"] == list(range(1, 51))
    assert [e["step"] for e in events if e["event"] == "eval"] == [25, 50]
    assert [(e["step"], Path(e["path"]).name) for e in events if e["event"] == "save"] == [(25, "step_00000025"), (50, "step_00000050")]
    logged = {x["step"]: x["loss"] for x in records(out) if "loss" in x}
    assert {e["record_step"]: e["loss"] for e in events if e["event"] == "log"} == logged  # what metrics.jsonl got
    assert events[-2]["reason"].startswith("early stopping") and events[-1]["status"] == "stopped"
    # Each step's events come in the loop's order: step end, its logs, its evaluation, its checkpoint.
    at50 = [e["event"] for e in events if e["step"] == 50]
    assert at50[0] == "step_end" and at50.index("eval") < at50.index("save") < at50.index("stop"), at50


def test_a_users_task_resumes_exactly(reverse_run, cli, tmp_path):
    """From step 25's checkpoint: steps 26-50 repeat the straight run's losses bitwise (the
    schedule's position, the weights and the optimizer all restored)."""
    _, out, _ = reverse_run
    again = tmp_path / "again"
    r = cli(["train", str(REPO / "examples" / "custom_task.yaml"), f"task={TASK}", f"output_dir={again}", *SHORT,
             callbacks(tmp_path / "events.jsonl"), "--resume", str(out / "checkpoints" / "step_00000025")])
    assert r.returncode == 0, r.stderr[-3000:]
    straight = {x["step"]: x["loss"] for x in records(out) if "loss" in x}
    resumed = {x["step"]: x["loss"] for x in records(again) if "loss" in x}
    assert sorted(resumed) == list(range(26, 51)) and all(resumed[s] == straight[s] for s in resumed), (resumed, straight)


def test_a_checkpoint_from_before_the_one_schedule_is_refused(reverse_run, cli, tmp_path):
    """A checkpoint without "data_order" (written before every task used the one schedule) of a
    task that used the old order: its data position would pick other samples, so resuming is
    refused with one error line, and the checkpoint is left as it was."""
    import hashlib
    import shutil

    _, out, _ = reverse_run
    old = tmp_path / "step_00000025"
    shutil.copytree(out / "checkpoints" / "step_00000025", old)
    state = json.loads((old / "trainer_state.json").read_text())
    assert state.pop("data_order") == "mixture-v1"
    (old / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((old / "manifest.json").read_text())  # as the old bigtrain sealed it
    data = (old / "trainer_state.json").read_bytes()
    manifest["files"]["trainer_state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (old / "manifest.json").write_text(json.dumps(manifest))
    r = cli(["train", str(REPO / "examples" / "custom_task.yaml"), f"task={TASK}", f"output_dir={tmp_path / 'again'}", *SHORT,
             callbacks(tmp_path / "events.jsonl"), "--resume", str(old)])
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "older sample order (batch-v1)" in errors[0] and str(old) in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and (old / "trainer_state.json").read_bytes() == data


def test_early_stopping_on_a_constructed_evaluation_sequence():
    sys.path.insert(0, str(REPO / "examples"))
    from custom_callback import EarlyStopping

    from bigtrain.api import TrainState

    def stopped_at(values, **kw):
        cb, state = EarlyStopping(**kw), TrainState(0, 0, 100, Path("."), 0, 1)
        for i, v in enumerate(values):
            cb.on_eval(state, SimpleNamespace(record={"eval_loss": v, "eval_acc": v}))
            if state.stop_reason:
                return i
        return None

    losses = [3.0, 2.5, 2.6, 2.55, 2.7, 1.0]
    assert stopped_at(losses, patience=2) == 3  # 2.6 and 2.55 do not beat 2.5
    assert stopped_at(losses, patience=3) == 4
    assert stopped_at(losses, patience=1, min_delta=0.6) == 1  # 3.0 -> 2.5 is not an improvement of 0.6
    assert stopped_at([0.1, 0.2, 0.3, 0.3, 0.25], metric="eval_acc", mode="max", patience=2) == 4
    assert stopped_at([1.0, 0.9, 0.8, 0.7]) is None


@pytest.mark.parametrize("args, needle, key", [
    ([f"task={REPO}/examples/no_such_file.py:Task"], "no_such_file.py does not exist", "task"),
    ([f"task={REPO}/examples/custom_task.py:NoSuchTask"], "has no 'NoSuchTask'", "task"),
    ([f"task={REPO}/examples/custom_callback.py:EarlyStopping"], "lacks model_task, tokenizer_dir", "task"),
    ([f"task={TASK}", "task_options.digitz=3"], "unknown config key 'task_options.digitz'", "task_options.digitz"),
    ([f"task={TASK}", "task_options.digits=three"], "'task_options.digits' must be int", "task_options.digits"),
    (["task=clm", "task_options.digits=3"], "task_options are for a user's task class", "task_options"),
    (["train.callbacks=[no_such_module:Stop]"], "no module named 'no_such_module'", "train.callbacks[0]"),
    ([f"train.callbacks=[{TASK}]"], "is not a callback class", "train.callbacks[0]"),
    ([f"train.callbacks=[{{class: '{STOPPER}', patience: 0}}]"], "EarlyStopping(patience=0) failed", "train.callbacks[0]"),
    ([f"task={TASK}", "deepspeed.tensor_parallel=2", "--nproc", "2"], "is for causal LM training (task=clm)", "deepspeed.tensor_parallel"),
])
def test_bad_user_code_is_one_error_line_naming_the_key(capsys, tmp_path, args, needle, key):
    from bigtrain.cli import main

    out = tmp_path / "run"
    code = main(["train", f"output_dir={out}", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert key in err[0], err  # the config key, after where it was set (the override here)
    assert not out.exists()


def test_bigtrain_eval_runs_a_users_task_on_the_export(reverse_run, cli, tmp_path):
    """`bigtrain eval MODEL_DIR task=...`: the task's own evaluation on the exported (best, step
    50) model, in one process, gives the numbers the run logged at that step."""
    _, out, _ = reverse_run
    r = cli(["eval", str(out / "model"), f"task={TASK}", f"output_dir={tmp_path / 'eval'}", "--output", str(tmp_path / "eval.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "eval.json").read_text())
    logged = next(x for x in records(out) if x.get("step") == 50 and "eval_reverse_accuracy" in x)
    assert got["eval_reverse_accuracy"] == logged["eval_reverse_accuracy"], (got, logged)
    assert abs(got["eval_loss"] - logged["eval_loss"]) <= 1e-6 * logged["eval_loss"], (got, logged)


def test_the_train_state_is_saved_and_restored_as_a_whole(reverse_run):
    """What every checkpoint keeps of the TrainState, back into a fresh state; a checkpoint from
    before skipped_steps and last_eval were kept restores with none skipped and no evaluation."""
    from bigtrain.api import TrainState

    _, out, _ = reverse_run
    saved = json.loads((out / "checkpoints" / "step_00000050" / "trainer_state.json").read_text())
    assert saved["step"] == 50 and saved["samples_seen"] == 50 * 32 and saved["skipped_steps"] == 0
    assert saved["last_eval"]["step"] == 50 and "eval_reverse_accuracy" in saved["last_eval"]
    fresh = TrainState(0, 0, 100, out, 0, 1)
    fresh.restore(saved)
    assert fresh.saved() == {k: saved[k] for k in ("step", "samples_seen", "skipped_steps", "last_eval")}
    old = TrainState(0, 0, 100, out, 0, 1)
    old.restore({"step": 7, "samples_seen": 28})
    assert (old.step, old.samples_seen, old.skipped_steps, old.last_eval) == (7, 28, 0, {})
