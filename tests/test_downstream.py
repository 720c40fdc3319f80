"""Downstream evaluation (lm-evaluation-harness on local tasks, examples/downstream/) and checkpoint
averaging: the in-loop numbers equal the harness's own CLI run on the export of the same step,
requests are sharded over the ranks, bad tasks and a missing extra are one error line before
training, and `bigtrain average` is the mean of the exported checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import REPO, SMALL

pytestmark = pytest.mark.slow

TASKS_DIR = REPO / "examples" / "downstream"
TASKS = "stdlib_next_line,stdlib_docstrings"
LIMIT = 8  # documents per task: an even split over 2 ranks, no padding requests
DOWNSTREAM = [f"eval.downstream.tasks=[{TASKS}]", f"eval.downstream.include_path={TASKS_DIR}", f"eval.downstream.limit={LIMIT}",
              "eval.downstream.batch_size=4"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(cli, corpus, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-3, 4 steps, checkpoints at 2 and 4, downstream evaluation at step 4."""
    out = tmp_path_factory.mktemp("downstream") / "run"
    r = cli(["train", f"data.train_files={corpus}", *SMALL, "deepspeed.zero_stage=3", "train.max_steps=4", "train.save_every=2",
             "train.eval_every=4", "train.eval_batches=1", "train.keep_last=5", f"output_dir={out}", *DOWNSTREAM, "--nproc", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def harness_cli(model: Path, out: Path) -> dict:
    """lm-evaluation-harness's own CLI (`lm_eval --model hf`) on an exported model: its results JSON."""
    import forkserver

    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    argv = ["-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu",
            "--include_path", ".", "--tasks", TASKS, "--limit", str(LIMIT), "--batch_size", "1", "--output_path", str(out)]
    if forkserver.available():  # `python -m lm_eval` as typed, without paying for torch's imports again
        r = forkserver.run(argv, env, str(TASKS_DIR), None, 600)
    else:
        r = subprocess.run([sys.executable, *argv], cwd=TASKS_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def test_in_loop_scores_equal_the_harness_cli_on_the_export_and_one_rank(trained, cli, tmp_path):
    """Step 4's downstream record (2 ranks, ZeRO-3, the live model) equals `lm_eval --model hf` on
    `bigtrain export` of step 4, and `bigtrain eval --tasks` (one process) on the same export; the
    two ranks ran each request once (their count = the one process's)."""
    (at4,) = [r for r in records(trained) if any(k.startswith("downstream/") for k in r)]
    assert at4["step"] == 4
    model = tmp_path / "step4"
    r = cli(["export", str(trained / "checkpoints" / "step_00000004"), str(model)])
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = harness_cli(model, tmp_path / "harness")
    one = tmp_path / "one.json"
    r = cli(["eval", str(model), "--tasks", TASKS, "--include-path", str(TASKS_DIR), "--limit", str(LIMIT), "--json", str(one)])
    assert r.returncode == 0, r.stderr[-3000:]
    ours = json.loads(one.read_text())["results"]
    for task in TASKS.split(","):
        for key, value in theirs[task].items():
            if not isinstance(value, float) or "stderr" in key:
                continue
            name = key.split(",")[0]
            assert close(ours[task][key], value), (task, key, ours[task][key], value)
            assert close(at4[f"downstream/{task}/{name}"], value), (task, key, at4, value)
    assert theirs["stdlib_next_line"]["acc,none"] in {k / LIMIT for k in range(LIMIT + 1)}
    assert f"evaluated {at4['downstream/requests']} requests" in r.stderr  # 2 ranks: each request once


def test_downstream_runs_only_at_its_steps_and_the_report_charts_each_task(trained, tmp_path):
    """Downstream numbers appear at the evaluation steps only (step 4 here), with the run's
    other evaluation; no other record carries them. `bigtrain report` draws a chart per task."""
    from bigtrain.report import write_report

    with_downstream = [r["step"] for r in records(trained) if "downstream/requests" in r]
    assert with_downstream == [4]
    page = write_report(str(trained), str(tmp_path / "report.html")).read_text()
    assert "Downstream: stdlib_next_line" in page and "Downstream: stdlib_docstrings" in page


@pytest.mark.parametrize("override,needle", [
    (f"eval.downstream.include_path={REPO / 'nowhere'}", "is not a directory"),
    ("eval.downstream.tasks=[stdlib_next_line,no_such_task]", "unknown lm-evaluation-harness task(s) no_such_task"),
    ("task=mlm", "eval.downstream scores a causal LM (task=clm or sft), not task=mlm"),
])
def test_bad_downstream_config_is_one_error_line_before_training(capsys, corpus, tmp_path, override, needle):
    from bigtrain.cli import main

    code = main(["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=2", f"output_dir={tmp_path / 'run'}", *DOWNSTREAM, override])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0], err[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_broken_task_file_or_missing_data_names_it(capsys, corpus, tmp_path):
    from bigtrain.cli import main

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text((TASKS_DIR / "stdlib_next_line.yaml").read_text().replace("stdlib_next_line", "broken")
                                       .replace("stdlib_mc.jsonl", "missing.jsonl"))
    code = main(["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=2", f"output_dir={tmp_path / 'run'}",
                 "eval.downstream.tasks=[broken]", f"eval.downstream.include_path={tasks}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "broken" in errors[0] and "missing.jsonl" in errors[0], err[-2000:]


def test_without_the_extra_asking_for_downstream_is_one_error_line(capsys, corpus, tmp_path, monkeypatch):
    from bigtrain.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-evaluation-harness were not installed
    code = main(["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=2", f"output_dir={tmp_path / 'run'}", *DOWNSTREAM])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'bigtrain[eval]'" in err and "Traceback" not in err, err[-2000:]


def test_average_is_the_mean_of_the_exported_checkpoints(trained, cli, tmp_path):
    from safetensors.torch import load_file

    exports = {}
    for step in (2, 4):
        exports[step] = tmp_path / f"export{step}"
        r = cli(["export", str(trained / "checkpoints" / f"step_{step:08d}"), str(exports[step])])
        assert r.returncode == 0, r.stderr[-3000:]
    r = cli(["average", str(trained), "--last", "2", "-o", str(tmp_path / "avg")])
    assert r.returncode == 0, r.stderr[-3000:]
    avg, a, b = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "avg", exports[2], exports[4]))
    assert avg.keys() == a.keys() == b.keys()
    for k in avg:
        want = (a[k].double() + b[k].double()) / 2
        assert avg[k].dtype == torch.float32 and torch.allclose(avg[k].double(), want, rtol=1e-7, atol=1e-9), k
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the two checkpoints really differ
    r = cli(["average", str(trained), "--last", "1", "-o", str(tmp_path / "one")])
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "one" / name).read_bytes() == (exports[4] / name).read_bytes(), name


@pytest.mark.parametrize("args,needle", [
    (["--last", "3"], "--last must be between 1 and the 2 checkpoint(s)"),
    (["--last", "0"], "--last must be between 1 and the 2 checkpoint(s)"),
    (["--steps", "2,6"], "has no checkpoint step_00000006"),
    (["--steps", "two"], "--steps must be step numbers"),
])
def test_average_bad_choice_is_one_error_line(trained, capsys, tmp_path, args, needle):
    from bigtrain.cli import main

    code = main(["average", str(trained), *args, "-o", str(tmp_path / "avg")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and needle in err, err
    assert not (tmp_path / "avg").exists()


def test_a_generation_task_under_zero3_is_refused_before_training(capsys, corpus, tmp_path):
    """Generation runs a data-dependent number of forward passes per rank: under ZeRO-3 the ranks'
    gathers would not pair up, so such a task is one error line at startup."""
    from bigtrain.cli import main

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gen.yaml").write_text("task: gen_lines\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
                                    f"{TASKS_DIR / 'stdlib_mc.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
                                    'doc_to_text: "{{context}}"\ndoc_to_target: "{{choices[label]}}"\n'
                                    "metric_list:\n  - metric: exact_match\n")
    code = main(["train", f"data.train_files={corpus}", *SMALL, "train.max_steps=2", f"output_dir={tmp_path / 'run'}",
                 "deepspeed.zero_stage=3", "eval.downstream.tasks=[gen_lines]", f"eval.downstream.include_path={tasks}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "gen_lines generate text" in errors[0], err[-2000:]
