"""train.compile: torch.compile through DeepSpeed's engine.compile(), checked against eager.

One pair of 1-rank CLI runs of the tiny GPT-2 (fp32, ZeRO-0, dropout off: inductor draws its own
dropout masks, so with dropout the two runs could not agree), identical but for train.compile,
run side by side. The compiled run must give the same per-step losses and evaluation, really be
compiled (its log says how many graphs dynamo compiled), save checkpoints and an export with the
model's own parameter names (no `_orig_mod.` prefix), and resume from its checkpoint to the same
losses as without the interruption.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from common import SMALL

pytestmark = pytest.mark.slow

STEPS = 6
NO_DROPOUT = ["model.config.resid_pdrop=0", "model.config.embd_pdrop=0", "model.config.attn_pdrop=0"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def eval_loss(run: Path) -> float:
    return [r["eval_loss"] for r in records(run) if "eval_loss" in r][-1]


@pytest.fixture(scope="module")
def runs(cli, corpus, tmp_path_factory):
    """The eager and the compiled run, side by side (2 cores): (eager dir, compiled dir, compiled args, compiled result)."""
    base = tmp_path_factory.mktemp("compile")
    common = ["train", f"data.train_files={corpus}", *SMALL, *NO_DROPOUT, f"train.max_steps={STEPS}", "train.log_every=1",
              "train.eval_every=100", "train.save_every=3", "train.keep_last=3"]
    args = {c: [*common, f"train.compile={c}", f"output_dir={base / c}"] for c in ("false", "true")}
    # Tokenize once first: two runs preparing the same cache entry at once would race.
    from bigtrain.config import load_config
    from bigtrain.corpus import ensure_prepared

    ensure_prepared(load_config(None, args["false"][1:]))
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(args, pool.map(lambda a: cli(a, timeout=900), args.values())))
    for c, r in done.items():
        assert r.returncode == 0, (c, r.stderr[-3000:])
    return base / "false", base / "true", args["true"], done


def test_compiled_run_matches_eager(runs):
    eager, compiled, _, done = runs
    # Compile was really on: the startup line, and dynamo's count of the graphs it compiled
    # (one for training, one for evaluation without gradients), with no graph break.
    assert "train.compile: the model is compiled with torch.compile" in done["true"].stderr
    summary = re.search(r"train\.compile: (\d+) graph\(s\) compiled, (\d+) graph break\(s\)", done["true"].stderr)
    assert summary, done["true"].stderr[-3000:]
    assert int(summary[1]) >= 2 and int(summary[2]) == 0, summary[0]
    assert "train.compile" not in done["false"].stderr
    a, b = losses(eager), losses(compiled)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:  # fp32: inductor's fused kernels only round differently (measured ~1e-7)
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=0), (step, a, b)
    assert a[STEPS] < a[1] - 0.2  # it trained: the comparison is not of two constant curves
    assert eval_loss(compiled) == pytest.approx(eval_loss(eager), rel=1e-5, abs=0)


def test_checkpoint_and_export_keep_the_parameter_names(runs):
    eager, compiled, _, _ = runs
    for step in (3, STEPS):
        name = f"checkpoints/step_{step:08d}/mp_rank_00_model_states.pt"
        keys = list(torch.load(compiled / name, map_location="cpu", weights_only=False)["module"])
        assert keys == list(torch.load(eager / name, map_location="cpu", weights_only=False)["module"])
        assert keys and not any("_orig_mod" in k for k in keys), keys[:5]
    from safetensors import safe_open

    exported = {}
    for run in (eager, compiled):
        with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
            exported[run] = sorted(f.keys())
    assert exported[compiled] == exported[eager] and not any("_orig_mod" in k for k in exported[compiled])


def test_compiled_resume_continues_with_the_same_losses(runs, cli, tmp_path):
    """The compiled run stopped after its step-3 checkpoint, resumed with compile on."""
    _, compiled, args, _ = runs
    crashed = tmp_path / "crashed"
    shutil.copytree(compiled, crashed)
    shutil.rmtree(crashed / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(crashed / "model")
    (crashed / "checkpoints" / "latest").write_text("step_00000003")
    (crashed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(compiled) if r["step"] <= 3))
    r = cli([*[a for a in args if not a.startswith("output_dir=")], f"output_dir={crashed}", "--resume", "auto"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "train.compile: the model is compiled" in r.stderr
    straight, resumed = losses(compiled), losses(crashed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=0), (step, resumed, straight)


def test_non_bool_value_is_one_error_line(capsys, tmp_path):
    from bigtrain.cli import main

    code = main(["train", "train.compile=maybe", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "train.compile" in lines[0] and "maybe" in lines[0] and "bool" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
