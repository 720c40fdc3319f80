"""Tensor parallelism (DeepSpeed AutoTP) and sequence parallelism (DeepSpeed Ulysses) against one
process: the same model (llama-tiny), data, seed and global batch give the same per-step losses
and gradient norms (fp32). Equal gradient norms matter: Adam hardly notices a gradient scaled by
a constant, so a sequence-parallel loss reduced wrongly (each rank's gradient counted sp times)
would still give nearly equal losses. Real ranks on gloo, real DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

# The progress bar and end-of-run sample are off as in common.SMALL (see there); the README's tp=2 and
# sp=2 commands run with every default on in tests/test_readme.py.
LLAMA = ["model.preset=llama-tiny", "data.vocab_size=512", "data.seq_len=64", "train.progress=false", "train.sample_tokens=0",
         "train.warmup_steps=2", "train.lr=1e-3", "train.max_steps=4", "train.log_every=1", "train.save_every=2", "train.keep_last=5",
         "train.eval_every=4", "train.eval_batches=2", "deepspeed.zero_stage=1"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> dict[int, tuple[float, float]]:
    """{step: (loss, grad_norm)}"""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records(run) if "loss" in r}


def assert_same_curve(got: Path, want: Path, steps=(1, 2, 3, 4), rel: float = 1e-5) -> None:
    a, b = curve(got), curve(want)
    assert sorted(a) == list(steps), a
    for s in steps:
        for x, y, what in ((a[s][0], b[s][0], "loss"), (a[s][1], b[s][1], "grad_norm")):
            assert abs(x - y) <= rel * abs(y), (got.name, s, what, x, y)


@pytest.fixture(scope="module")
def runs(cli, corpus, tmp_path_factory):
    """One process (the reference), tp=2, sp=2 (ZeRO-3), and tp2 x dp2, sp2 x dp2 on 4 ranks (ZeRO-2 and -1):
    the global batch is 4 sequences of 64 tokens in every layout."""
    root = tmp_path_factory.mktemp("parallel")
    data = [f"data.train_files={corpus}"]
    layouts = {
        "ref": ["train.micro_batch_size=4"],
        "tp2": ["train.micro_batch_size=4", "deepspeed.tensor_parallel=2", "--nproc", "2"],
        "sp2_z3": ["train.micro_batch_size=4", "deepspeed.sequence_parallel=2", "deepspeed.zero_stage=3", "--nproc", "2"],
        "tp2_dp2": ["train.micro_batch_size=2", "deepspeed.tensor_parallel=2", "deepspeed.zero_stage=2", "--nproc", "4"],
        "sp2_dp2": ["train.micro_batch_size=2", "deepspeed.sequence_parallel=2", "--nproc", "4"],
    }
    out = {}
    for name, extra in layouts.items():
        r = cli(["train", *data, *LLAMA, f"output_dir={root / name}", *extra], timeout=900)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        out[name] = (root / name, r.stderr)
    out["args"] = [*data, *LLAMA]
    return out


@pytest.mark.parametrize("name", ["tp2", "sp2_z3", "tp2_dp2", "sp2_dp2"])
def test_a_split_model_trains_as_one_process(runs, name):
    run, log = runs[name]
    assert_same_curve(run, runs["ref"][0])
    # The layout really ran: the startup line, DeepSpeed's own split and the checkpoint's record.
    tp, sp = (2, 1) if name.startswith("tp") else (1, 2)
    dp = 2 if name.endswith("dp2") else 1
    kind = f"tensor parallel {tp}" if tp > 1 else f"sequence parallel {sp}"
    assert f"world size {dp * 2} = data parallel {dp} x {kind}" in log
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert (state["tensor_parallel"], state["sequence_parallel"], state["world_size"], state["global_batch"]) == (tp, sp, dp * 2, 4)
    files = sorted(p.name for p in (run / "checkpoints" / "step_00000004").glob("*model_states.pt"))
    if tp > 1:  # each tensor-parallel rank saved its own slices of the split layers
        assert "mp_rank_01_model_states.pt" in files, files
    else:
        assert not any("mp_rank_01" in f for f in files), files
    ref_eval = [r["eval_loss"] for r in records(runs["ref"][0]) if "eval_loss" in r]
    got_eval = [r["eval_loss"] for r in records(run) if "eval_loss" in r]
    assert len(got_eval) == 1 and abs(got_eval[0] - ref_eval[0]) <= 1e-5 * ref_eval[0]


@pytest.mark.parametrize("name", ["tp2", "sp2_z3"])
def test_the_exported_model_is_the_trained_one(runs, name):
    """`bigtrain export` (run at the end of training) joins the tensor-parallel slices (through
    DeepSpeed's universal format) or reads the sequence-parallel ZeRO-3 partitions: a plain
    transformers model whose logits match the one-process run's exported model."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(runs["ref"][0] / "model")
    got = AutoModelForCausalLM.from_pretrained(runs[name][0] / "model")
    assert sorted(got.state_dict()) == sorted(ref.state_dict())
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = got(ids).logits, ref(ids).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()


def test_estimate_counts_what_each_tensor_parallel_rank_holds(runs):
    """`bigtrain estimate --tp 2`'s parameters per GPU (before ZeRO) are exactly what each rank
    of the tp=2 run saved: the linear layers halved, embeddings and norms whole."""
    from bigtrain import estimate as est
    from bigtrain.models import preset_config

    shape = est.model_shape(preset_config("llama-tiny", {}, vocab_size=512))
    per_rank, _ = est.tensor_parallel_share(shape, 2)
    ckpt = runs["tp2"][0] / "checkpoints" / "step_00000004"
    for rank in (0, 1):
        module = torch.load(ckpt / f"mp_rank_0{rank}_model_states.pt", weights_only=False)["module"]
        assert sum(t.numel() for t in module.values()) == per_rank
    assert per_rank < shape.params
    r = est.estimate(shape, zero=1, gpus_per_node=2, seq_len=64, tp=2, precision="fp32")
    assert r["params_per_gpu_before_zero"] == per_rank


@pytest.mark.parametrize("name,extra", [("tp2", ["deepspeed.tensor_parallel=2"])])
def test_resume_in_the_same_layout_is_exact(cli, runs, tmp_path, name, extra):
    run, _ = runs[name]
    out = tmp_path / "again"
    r = cli(["train", *runs["args"], "train.micro_batch_size=4", *extra, f"output_dir={out}",
             "--resume", str(run / "checkpoints" / "step_00000002"), "--nproc", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = curve(out), curve(run)
    assert sorted(a) == [3, 4] and all(a[s] == b[s] for s in (3, 4)), (a, b)


@pytest.mark.parametrize("src,extra", [
    ("tp2", []),  # tensor parallel 2 -> one process
    ("sp2_dp2", []),  # sequence parallel 2 x data parallel 2 (ZeRO-1) -> one process
    ("sp2_z3", ["deepspeed.zero_stage=3"]),  # sequence parallel 2 (ZeRO-3) -> one process
], ids=["tp2-to-1", "sp2dp2-to-1", "sp2z3-to-1"])
def test_resume_in_another_layout_continues_the_curve(cli, runs, tmp_path, src, extra):
    run, _ = runs[src]
    out = tmp_path / "moved"
    r = cli(["train", *runs["args"], "train.micro_batch_size=4", *extra, f"output_dir={out}",
             "--resume", str(run / "checkpoints" / "step_00000002")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loading step_00000002 as a universal checkpoint" in r.stderr and "layout changed" in r.stderr
    # Not bitwise: the universal format re-joins fp32 master weights and Adam states (measured
    # after ZeRO-3: 5e-5 relative on step 4's gradient norm). A resume that lost the optimizer
    # states or the data position misses by far more.
    assert_same_curve(out, runs["ref"][0], steps=(3, 4), rel=1e-4)


def test_sequence_parallel_with_the_fused_kernel_on_packed_documents(cli, corpus, tmp_path):
    """bigtrain_triton as Ulysses' core attention (Triton's interpreter on CPU), documents packed
    several to a sequence (one per line of code): every rank's core gets the whole sequence's segment
    ids. sp=2 equals one process with the kernel; the kernel's document masking is really on
    (SDPA, which lets documents see each other, gives other losses on this data)."""
    args = ["train", f"data.train_files={corpus}", *LLAMA, "data.sample_by=line", "model.config.num_hidden_layers=1",
            "train.max_steps=2", "train.save_every=2", "train.eval_every=2", "train.eval_batches=1", "train.micro_batch_size=2"]
    kernel = {"TRITON_INTERPRET": "1"}
    runs = {}
    for name, extra, env in (("kernel", ["model.attn_implementation=bigtrain_triton"], kernel),
                             ("kernel_sp2", ["model.attn_implementation=bigtrain_triton", "deepspeed.sequence_parallel=2", "--nproc", "2"], kernel),
                             ("sdpa", ["model.attn_implementation=sdpa"], {})):
        r = cli([*args, *extra, f"output_dir={tmp_path / name}"], env_extra=env, timeout=900)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        runs[name] = tmp_path / name
    assert_same_curve(runs["kernel_sp2"], runs["kernel"], steps=(1, 2))
    a, b = curve(runs["kernel"]), curve(runs["sdpa"])
    assert all(abs(a[s][0] - b[s][0]) > 1e-3 for s in (1, 2)), (a, b)


def test_sequence_parallel_halves_each_ranks_activations(corpus, cache_dir, tmp_path):
    """At 2,048 tokens, what one training forward saves for the backward on a rank (counted
    tensor by tensor, tests/helpers/saved_activations.py): sp=2 holds at most 0.6x of sp=1, and
    each is what `bigtrain estimate` predicts for its tokens per rank (within 6%: Ulysses keeps
    its all-to-all outputs besides)."""
    from common import REPO
    from ranks import launch_ranks

    from bigtrain import estimate as est
    from bigtrain.models import preset_config

    args = ["model.preset=llama-tiny", "data.vocab_size=512", "data.seq_len=2048", "train.micro_batch_size=1", "deepspeed.zero_stage=1",
            f"data.train_files={corpus}", "train.progress=false"]
    got = {}
    for sp in (1, 2):
        out = tmp_path / f"sp{sp}.json"
        r = launch_ranks([REPO / "tests/helpers/saved_activations.py", out, *args, f"deepspeed.sequence_parallel={sp}",
                          f"output_dir={tmp_path / str(sp)}"], nproc=sp, env_extra={"BIGTRAIN_CACHE": str(cache_dir)}, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        got[sp] = json.loads(out.read_text())
    assert got[1]["tokens_per_rank"] == 2048 and got[2]["tokens_per_rank"] == 1024
    ratio = got[2]["saved_bytes"] / got[1]["saved_bytes"]
    print(f"\nsaved activations per rank at 2,048 tokens: sp=1 {got[1]['saved_bytes'] / 2**20:.1f} MiB, "
          f"sp=2 {got[2]['saved_bytes'] / 2**20:.1f} MiB ({ratio:.3f}x)")
    assert ratio <= 0.6, got
    shape = est.model_shape(preset_config("llama-tiny", {}, vocab_size=512))
    for sp, measured in got.items():
        a = est.activation_bytes(shape, 2048 // sp, 1, "fp32", False, "cpu")
        predicted = a["layers"] + a["outside_layers"] + (2048 // sp) * 4 * shape.vocab  # saved at the forward's end
        assert abs(measured["saved_bytes"] - predicted) <= 0.06 * predicted, (sp, measured, predicted)


# --------------------------------------------------------------------------- bad input (no ranks started)


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    from bigtrain.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("overrides,nproc,needles", [
    (["deepspeed.tensor_parallel=2"], 3, ["deepspeed.tensor_parallel", "world size 3", "groups of 2"]),
    (["deepspeed.tensor_parallel=8"], 8, ["deepspeed.tensor_parallel", "tensor_parallel=8", "4 key/value heads"]),
    (["deepspeed.sequence_parallel=3", "data.seq_len=66"], 3, ["deepspeed.sequence_parallel", "sequence_parallel=3", "8 attention heads"]),
    (["deepspeed.sequence_parallel=2", "data.seq_len=65"], 2, ["data.seq_len=65", "sequence_parallel=2"]),
    (["deepspeed.tensor_parallel=2", "deepspeed.sequence_parallel=2"], 4, ["does not combine AutoTP with Ulysses"]),
    (["deepspeed.tensor_parallel=2", "deepspeed.zero_stage=0"], 2, ["deepspeed.zero_stage", "needs deepspeed.zero_stage 1, 2 or 3"]),
    (["deepspeed.tensor_parallel=2", "model.preset=tiny"], 2, ["deepspeed.tensor_parallel", "'gpt2'", "llama-tiny"]),
    (["deepspeed.sequence_parallel=2", "task=mlm", "model.preset=bert-tiny"], 2, ["deepspeed.sequence_parallel", "task=mlm"]),
    (["deepspeed.tensor_parallel=0"], 2, ["deepspeed.tensor_parallel"]),
], ids=["world", "kv-heads", "heads", "seq-len", "both", "zero0", "gpt2", "mlm", "zero"])
def test_layouts_that_cannot_work_are_refused_before_any_rank_starts(capsys, tmp_path, overrides, nproc, needles):
    base = ["model.preset=llama-tiny", "deepspeed.zero_stage=1", f"output_dir={tmp_path / 'o'}"]
    code, err = run_main(capsys, ["train", *base, *overrides, "--nproc", str(nproc)])
    assert_one_error(code, err, *needles)
    assert not (tmp_path / "o").exists()
