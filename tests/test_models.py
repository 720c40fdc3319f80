"""The model-family matrix: every family of tests/families.py through bigtrain's features, from a
local directory as a user's `model.from_pretrained=DIR`, and docs/models.md generated from it.

Per family, one shared run per layout (several assertions on each): ZeRO-3 on 2 ranks (trains,
exports exactly), a resume of it, and for causal LMs tensor parallel 2 and sequence parallel 2
against it. The one-process features (the fused kernel, the chunked loss, LoRA, compile's graph
capture, the SFT chat format) run for every family in one process (tests/helpers/family_checks.py). A feature a family cannot have must be
refused before training with one `error:` line; anything else (a traceback, a hang, numbers off)
fails here. The progress bar and the end-of-run sample are off as in common.SMALL (see there).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

import families
from common import REPO

pytestmark = pytest.mark.slow

RUN = ["data.seq_len=64", "train.max_steps=4", "train.save_every=2", "train.keep_last=5", "train.log_every=1",
       "train.eval_every=4", "train.eval_batches=1", "train.warmup_steps=0", "train.lr=1e-2",
       "train.progress=false", "train.sample_tokens=0"]
# Global batch 4 in every layout.
LAYOUTS = {
    "train": ["deepspeed.zero_stage=3", "train.micro_batch_size=2", "--nproc", "2"],
    "tp2": ["deepspeed.zero_stage=1", "deepspeed.tensor_parallel=2", "train.micro_batch_size=4", "--nproc", "2"],
    "sp2": ["deepspeed.zero_stage=1", "deepspeed.sequence_parallel=2", "train.micro_batch_size=4", "--nproc", "2"],
}
# Runs compared by their curves only save once, at the end (step 2's checkpoint is for the resume),
# and export nothing (the "train" run's export is the one tested).
ONE_SAVE = ["train.save_every=4", "train.export=false"]
CAUSAL, ENCODERS = list(families.CAUSAL), list(families.ENCODERS)
# A family whose parallel layouts also run in bf16 (CPU bf16, DeepSpeed's own bf16 path): Qwen3,
# whose per-head q/k norms are the most a split layout can get wrong.
BF16 = ("qwen3",)
LORA_ZERO2 = "qwen2"


def task_of(name: str) -> str:
    return "clm" if name in families.CAUSAL else "mlm"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, corpus) -> Path:
    from bigtrain.tokenizer import train_bpe, train_wordpiece

    root = tmp_path_factory.mktemp("zoo")
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    train_bpe(texts, 512, root / "tok-bpe")
    train_wordpiece(texts, 512, root / "tok-wordpiece")
    for name in families.FAMILIES:
        families.write_family(name, root / name, root / ("tok-bpe" if name in families.CAUSAL else "tok-wordpiece"))
    return root


def outcome(r) -> dict:
    """ok, or refused with its one error line; anything else fails the test that reads it."""
    if r.returncode == 0:
        return {"status": "ok"}
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and errors, ("neither trained nor refused with an error line", r.returncode, r.stderr[-3000:])
    return {"status": "refused", "why": errors[0].split(": ", 2)[-1]}


@pytest.fixture(scope="module")
def runs(cli, corpus, zoo, tmp_path_factory) -> dict:
    """{(family, layout): (CompletedProcess, output_dir)}; layout "resume" continues "train" from step 2."""
    root = tmp_path_factory.mktemp("family-runs")
    out = {}
    for name in families.FAMILIES:
        base = ["train", f"task={task_of(name)}", f"model.from_pretrained={zoo / name}", f"data.train_files={corpus}", *RUN]
        for layout in ["train", "tp2", "sp2"] if name in families.CAUSAL else ["train"]:
            d = root / name / layout
            once = [] if layout == "train" else ONE_SAVE
            out[name, layout] = (cli([*base, f"output_dir={d}", *LAYOUTS[layout], *once]), d)
        if out[name, "train"][0].returncode == 0:
            d = root / name / "resume"
            step2 = root / name / "train" / "checkpoints" / "step_00000002"
            out[name, "resume"] = (cli([*base, f"output_dir={d}", *LAYOUTS["train"], "train.export=false", "--resume", str(step2)]), d)
        if name in BF16:  # the parallel layouts in bf16 too
            for layout in ("train", "tp2", "sp2"):
                d = root / name / f"{layout}-bf16"
                out[name, f"{layout}-bf16"] = (cli([*base, f"output_dir={d}", *LAYOUTS[layout], *ONE_SAVE, "deepspeed.precision=bf16"]), d)
        if name == LORA_ZERO2:
            d = root / name / "lora-zero2"
            out[name, "lora-zero2"] = (cli([*base, f"output_dir={d}", "model.lora.r=4", "deepspeed.zero_stage=2",
                                            "train.micro_batch_size=2", "--nproc", "2"]), d)
    return out


@pytest.fixture(scope="module")
def checks(zoo, cache_dir, tmp_path_factory) -> dict:
    """tests/helpers/family_checks.py's results, every family in one process."""
    import forkserver

    out = tmp_path_factory.mktemp("family-checks") / "checks.json"
    argv = [str(REPO / "tests" / "helpers" / "family_checks.py"), str(zoo), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    if forkserver.available():
        r = forkserver.run(argv, env, tempfile.gettempdir(), None, 900)
    else:
        import subprocess
        import sys

        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def curve(run: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_a_family_trains_under_zero3_on_two_ranks(runs, name):
    r, d = runs[name, "train"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stderr and "ZeRO-3" in r.stderr, r.stderr[-2000:]
    losses = curve(d)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4][0] < losses[1][0], losses


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_a_family_resumes_exactly(runs, name):
    r, d = runs[name, "resume"]
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    straight, resumed = curve(runs[name, "train"][1]), curve(d)
    assert sorted(resumed) == [3, 4] and all(resumed[s] == straight[s] for s in (3, 4)), (resumed, straight)


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_a_family_exports_the_weights_it_trained(runs, zoo, name):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from bigtrain.models import auto_class

    d = runs[name, "train"][1]
    head = auto_class(task_of(name))
    exported = head.from_pretrained(str(d / "model"), dtype=torch.float32).eval()
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(d / "checkpoints"), tag="step_00000004")
    reference = head.from_config(exported.config).eval()
    missing, unexpected = reference.load_state_dict(gathered, strict=False)
    tied = {k for k in missing if reference.config.tie_word_embeddings}
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    reference.tie_weights()
    ids = torch.randint(5, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("layout", ["tp2", "sp2"])
@pytest.mark.parametrize("name", CAUSAL)
def test_a_split_family_trains_as_the_zero3_run_or_is_refused(runs, name, layout):
    r, d = runs[name, layout]
    if outcome(r)["status"] == "refused":
        return  # one error line, exit 2 (outcome checked it); docs/models.md lists the reason
    got, want = curve(d), curve(runs[name, "train"][1])
    assert sorted(got) == [1, 2, 3, 4], got
    assert not (d / "model").exists() and (d / "checkpoints" / "step_00000004").is_dir()  # train.export=false
    for s in got:
        for x, y, what in zip(got[s], want[s], ("loss", "grad_norm")):
            assert abs(x - y) <= 1e-5 * abs(y), (name, layout, s, what, x, y)


@pytest.mark.parametrize("layout", ["tp2", "sp2"])
@pytest.mark.parametrize("name", BF16)
def test_bf16_parallel_layouts_train_as_the_bf16_zero3_run(runs, name, layout):
    """bf16 rounds each layout's sums differently: per-step losses within 2e-2 relative (a bf16
    value has 8 bits of mantissa, 4e-3; four steps of drift between two roundings), gradient norms
    within 5e-2; and the run really was bf16 (its startup line)."""
    (r, d), (r0, d0) = runs[name, f"{layout}-bf16"], runs[name, "train-bf16"]
    assert r.returncode == 0 and r0.returncode == 0, (r.stderr[-2000:], r0.stderr[-2000:])
    assert ", bf16," in r.stderr and ", bf16," in r0.stderr, r.stderr[-2000:]
    got, want = curve(d), curve(d0)
    assert sorted(got) == [1, 2, 3, 4], got
    for s in got:
        assert abs(got[s][0] - want[s][0]) <= 2e-2 * abs(want[s][0]), (s, got[s], want[s])
        assert abs(got[s][1] - want[s][1]) <= 5e-2 * abs(want[s][1]), (s, got[s], want[s])
    fp32 = curve(runs[name, layout][1])
    assert any(got[s][0] != fp32[s][0] for s in got), "the bf16 run gave the fp32 run's losses exactly"


def test_lora_under_zero2_changes_only_the_adapted_modules(runs, zoo):
    """LoRA with peft's defaults (q_proj, v_proj for Qwen2) on 2 ranks under ZeRO-2: the merged
    export differs from the base model exactly in the adapted weights."""
    from safetensors.torch import load_file

    r, d = runs[LORA_ZERO2, "lora-zero2"]
    assert r.returncode == 0 and "LoRA r=4" in r.stderr and "ZeRO-2" in r.stderr, r.stderr[-3000:]
    base, merged = load_file(str(zoo / LORA_ZERO2 / "model.safetensors")), load_file(str(d / "model" / "model.safetensors"))
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    adapted = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed == adapted, sorted(changed ^ adapted)


@pytest.mark.parametrize("name", list(families.FAMILIES))
def test_one_process_features_match_their_reference_or_are_refused(checks, name):
    tolerance = {"attention": 1e-4, "chunked_loss": 1e-5, "lora": 0.0, "compile": 1e-5, "chat_template": 0.0}
    for feature, cell in checks[name].items():
        if cell["status"] == "ok":
            assert cell["diff"] <= tolerance[feature], (name, feature, cell)
            if feature == "compile":  # docs/models.md: one graph, no graph breaks
                assert (cell["graphs"], cell["graph_breaks"]) == (1, 0), (name, cell)
        else:
            assert cell["why"], (name, feature, cell)


@pytest.mark.parametrize("name, attn, needle", [
    ("gemma2", "bigtrain_triton", "gemma2 soft-caps its attention scores"),
    ("deberta-v2", "bigtrain_triton", "compute attention in their own code"),
    ("deberta-v2", "sdpa", "deberta-v2 models cannot run attn_implementation=sdpa"),
])
def test_an_attention_a_family_cannot_run_is_one_error_line(capsys, zoo, corpus, tmp_path, name, attn, needle):
    from bigtrain.cli import main

    out = tmp_path / "run"
    code = main(["train", f"task={task_of(name)}", f"model.from_pretrained={zoo / name}", f"data.train_files={corpus}",
                 f"model.attn_implementation={attn}", f"output_dir={out}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert "model.attn_implementation" in err[0] and not out.exists()


@pytest.fixture(scope="module")
def measured(runs, checks) -> dict:
    """{family: {feature: {"status", "why"}}}, as docs/models.md shows it; also written to
    $BIGTRAIN_MATRIX_OUT when set (`make models-page` regenerates the page from it)."""
    out = {}
    for name in families.FAMILIES:
        row = {"train": outcome(runs[name, "train"][0]), "resume": outcome(runs[name, "resume"][0])}
        row["export"] = row["train"]
        for layout in ("tp2", "sp2"):
            if (name, layout) in runs:
                row[layout] = outcome(runs[name, layout][0])
        row.update({k: {kk: vv for kk, vv in v.items() if kk in ("status", "why")} for k, v in checks[name].items()})
        out[name] = row
    if os.environ.get("BIGTRAIN_MATRIX_OUT"):
        Path(os.environ["BIGTRAIN_MATRIX_OUT"]).write_text(json.dumps(out, indent=1))
    return out


def test_docs_models_page_is_what_the_suite_measured(measured):
    """docs/models.md is generated from these measurements (scripts/models_table.py)."""
    import importlib.util

    if os.environ.get("BIGTRAIN_MATRIX_OUT"):
        pytest.skip(reason="make models-page writes docs/models.md from these measurements")

    spec = importlib.util.spec_from_file_location("models_table", REPO / "scripts" / "models_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert (REPO / "docs" / "models.md").read_text() == table.render(measured), \
        "docs/models.md disagrees with the measurements: run `make models-page` and review the diff"
