"""Mixture of experts with expert parallelism (DeepSpeed AutoEP, bigtrain/moe.py) against one process.

The reference for a layout is one process with the same micro-batch size and as many
gradient-accumulation steps as the layout has data-parallel ranks: the router's load-balancing
loss is computed per micro-batch, so only the same micro-batches give the same loss. Real ranks
on gloo, real DeepSpeed, transformers' own Mixtral and Qwen3-MoE.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow

BASE = ["data.vocab_size=512", "data.seq_len=64", "train.max_steps=4", "train.log_every=1", "train.save_every=2",
        "train.keep_last=5", "train.eval_every=4", "train.eval_batches=1", "train.warmup_steps=0", "train.lr=1e-2",
        "train.progress=false", "train.sample_tokens=0"]  # no sample: as common.SMALL (see there)
RUNS = {
    # name: (preset, layout arguments)
    "ref": ("mixtral-tiny", ["deepspeed.zero_stage=1", "train.micro_batch_size=2", "train.grad_accum=2"]),
    "ep2": ("mixtral-tiny", ["deepspeed.zero_stage=1", "train.micro_batch_size=2", "deepspeed.expert_parallel=2", "--nproc", "2"]),
    "ref_micro1": ("mixtral-tiny", ["deepspeed.zero_stage=1", "train.micro_batch_size=1", "train.grad_accum=4"]),
    "ep2_dp2": ("mixtral-tiny", ["deepspeed.zero_stage=1", "train.micro_batch_size=1", "deepspeed.expert_parallel=2", "--nproc", "4"]),
    "qwen_ref": ("qwen3-moe-tiny", ["deepspeed.zero_stage=1", "train.micro_batch_size=2", "train.grad_accum=2"]),
    "qwen_ep2_z3": ("qwen3-moe-tiny", ["deepspeed.zero_stage=3", "train.micro_batch_size=2", "deepspeed.expert_parallel=2", "--nproc", "2"]),
    # train.chunked_loss: the language-model loss from chunks of logits plus the router's term
    "ep2_chunked": ("mixtral-tiny", ["deepspeed.zero_stage=1", "train.micro_batch_size=2", "deepspeed.expert_parallel=2",
                                     "train.chunked_loss=true", "--nproc", "2"]),
}
REFERENCE = {"ep2": "ref", "ep2_dp2": "ref_micro1", "qwen_ep2_z3": "qwen_ref", "ep2_chunked": "ref"}
# Resumes from step 2 in another expert-parallel layout: name -> (source run, layout, the run whose
# steps 3-4 it must give, tolerance). AutoEP's parameters are not transformers': to and from one
# process bigtrain renames them in the universal checkpoint; between two expert-parallel sizes
# DeepSpeed's AutoEP reshards them. ZeRO-3's universal load is not bitwise (1e-4, as for dense
# models in test_parallel.py).
MOVES = {
    "ep2_to_1": ("ep2", RUNS["ref"][1], "ref", 1e-5),
    "1_to_ep2": ("ref", RUNS["ep2"][1], "ref", 1e-5),
    "ep2dp2_to_ep4": ("ep2_dp2", ["deepspeed.zero_stage=1", "train.micro_batch_size=1", "deepspeed.expert_parallel=4", "--nproc", "4"],
                      "ref_micro1", 1e-5),
    "qwen_ep2z3_to_1": ("qwen_ep2_z3", ["deepspeed.zero_stage=3", "train.micro_batch_size=2", "train.grad_accum=2"], "qwen_ref", 1e-4),
}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records(run) if "loss" in r}


@pytest.fixture(scope="module")
def runs(cli, corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, (preset, layout) in RUNS.items():
        r = cli(["train", f"model.preset={preset}", f"data.train_files={corpus}", *BASE, f"output_dir={root / name}", *layout])
        assert r.returncode == 0, (name, r.stderr[-3000:])
        out[name] = (root / name, r.stderr)
    step2 = root / "ep2" / "checkpoints" / "step_00000002"
    r = cli(["train", "model.preset=mixtral-tiny", f"data.train_files={corpus}", *BASE, f"output_dir={root / 'resumed'}",
             *RUNS["ep2"][1], "--resume", str(step2)])
    assert r.returncode == 0, r.stderr[-3000:]
    out["resumed"] = (root / "resumed", r.stderr)
    for name, (source, layout, _, _) in MOVES.items():
        preset = RUNS[source][0]
        r = cli(["train", f"model.preset={preset}", f"data.train_files={corpus}", *BASE, f"output_dir={root / name}", *layout,
                 "--resume", str(root / source / "checkpoints" / "step_00000002")])
        assert r.returncode == 0, (name, r.stderr[-3000:])
        out[name] = (root / name, r.stderr)
    return out


@pytest.mark.parametrize("name", list(REFERENCE))
def test_expert_parallel_training_equals_one_process(runs, name):
    (run, log), (ref, _) = runs[name], runs[REFERENCE[name]]
    got, want = curve(run), curve(ref)
    assert sorted(got) == [1, 2, 3, 4], got
    for s in got:
        for x, y, what in zip(got[s], want[s], ("loss", "grad_norm")):
            assert abs(x - y) <= 1e-5 * abs(y), (name, s, what, x, y)
    # Expert parallelism really ran: the startup line, and DeepSpeed's own record of the model it
    # checkpointed: AutoEP's expert layers, each rank's expert tensors holding half the experts.
    experts = 8 if name.startswith("qwen") else 4
    assert f"expert parallel 2 ({experts // 2} of {experts} experts per rank)" in log, log[-2000:]
    ckpt = run / "checkpoints" / "step_00000004"
    states = next(iter(sorted(ckpt.glob("*model_states.pt"), key=lambda p: "expert" in p.name)))
    saved = torch.load(states, map_location="cpu", weights_only=False)
    shapes = {k: tuple(v) for group in saved["param_shapes"] for k, v in group.items()}
    assert shapes["model.layers.0.mlp.experts.w1"][0] == experts // 2 and shapes["model.layers.0.mlp.router.gate.weight"][0] == experts, shapes
    if "zero_stage=1" in " ".join(RUNS[name][1]):  # ZeRO-1/2: one file per expert and layer, as DeepSpeed's MoE writes
        files = {p.name for p in ckpt.glob("layer_*_expert_*_model_states.pt")}
        assert {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(experts)} <= files, files
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["expert_parallel"] == 2


def test_the_loss_includes_the_router_loss_and_its_health_is_logged(runs):
    run, log = runs["ep2"]
    rows = [r for r in records(run) if "loss" in r]
    for r in rows:  # every log step: the auxiliary loss and each layer's max/mean expert load
        assert r["aux_loss"] > 0 and len(r["expert_load"]) == 2 and r["expert_load_max"] == max(r["expert_load"]), r
        assert all(1.0 <= x <= 4 / 2 for x in r["expert_load"]), r  # top-2 of 4: at most 2 x the mean
    # MFU and the startup line count the parameters a token passes through: top-2 of 4 experts.
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(run / "model")))
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if "experts" in n)
    assert f"{total / 1e6:.2f}M parameters, {(total - routed // 2) / 1e6:.2f}M active per token" in log, log[-2000:]
    from bigtrain.report import write_report

    page = write_report(str(run), str(run / "report.html")).read_text()
    assert "Router (mixture of experts)" in page and "busiest expert / mean" in page
    # Without the router term the same model's loss would be lower by coef x aux: transformers adds
    # it only with output_router_logits, which bigtrain sets (the config saved with the run says so).
    cfg = json.loads((run / "checkpoints" / "step_00000004" / "hf" / "config.json").read_text())
    assert cfg["output_router_logits"] is True and cfg["router_aux_loss_coef"] == 0.02


@pytest.mark.parametrize("name", ["ep2", "qwen_ep2_z3"])
def test_the_export_of_an_expert_parallel_run_is_the_one_process_model(runs, name):
    """AutoEP's experts (each rank's, in its own files or ZeRO-3 partitions) go back into the
    Hugging Face layout: the export loads with from_pretrained and gives the logits of the
    one-process run's export (the two trainings agree to ~1e-7)."""
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(str(runs[name][0] / "model")).eval()
    want = AutoModelForCausalLM.from_pretrained(str(runs[REFERENCE[name]][0] / "model")).eval()
    assert type(got).__name__ in ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = got(input_ids=ids).logits, want(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), float((a - b).abs().max())


def test_an_expert_parallel_run_resumes_exactly(runs):
    straight, resumed = curve(runs["ep2"][0]), curve(runs["resumed"][0])
    assert "resumed from" in runs["resumed"][1]
    assert sorted(resumed) == [3, 4] and all(resumed[s] == straight[s] for s in (3, 4)), (resumed, straight)


@pytest.mark.parametrize("name", list(MOVES))
def test_a_run_resumes_at_another_expert_parallel_size(runs, name):
    """The curve goes on as the reference's (a resume without the Adam moments or at the wrong
    data position would miss by far more), and the new layout is the one that trained: the
    startup line and the experts' shapes in the step-4 checkpoint DeepSpeed wrote."""
    source, layout, reference, tol = MOVES[name]
    (run, log), want = runs[name], curve(runs[reference][0])
    got = curve(run)
    assert sorted(got) == [3, 4], got
    for s in (3, 4):
        for x, y, what in zip(got[s], want[s], ("loss", "grad_norm")):
            assert abs(x - y) <= tol * abs(y), (name, s, what, x, y)
    ep = int(next((a.split("=")[1] for a in layout if a.startswith("deepspeed.expert_parallel=")), 1))
    assert "layout changed" in log and "as a universal checkpoint" in log, log[-2000:]
    files = sorted((run / "checkpoints" / "step_00000004").glob("*model_states.pt"), key=lambda p: "expert" in p.name)
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    shapes = {k: tuple(v) for group in states["param_shapes"] for k, v in group.items()}
    experts = 8 if name.startswith("qwen") else 4
    if ep == 1:  # transformers' own blocks, every expert in one tensor
        assert shapes["model.layers.0.mlp.experts.gate_up_proj"][0] == experts and not any(".w1" in k for k in shapes), shapes
    else:
        assert f"expert parallel {ep} ({experts // ep} of {experts} experts per rank)" in log
        assert shapes["model.layers.0.mlp.experts.w1"][0] == experts // ep, shapes


def test_router_load_is_near_one_for_a_random_router_and_k_over_e_for_a_collapsed_one():
    """RouterMonitor on a real Mixtral forward (random router: near balanced), then on router
    logits that send every token to experts 0 and 1 (top-2 of 4): max/mean = 4 / 2 exactly."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from bigtrain.moe import RouterMonitor

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2, output_router_logits=True)).eval()
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    monitor = RouterMonitor(4, 2)
    with torch.no_grad():
        monitor.observe(model(input_ids=ids, labels=ids))
    monitor.end_step()
    fair = monitor.numbers()
    assert fair["aux_loss"] > 0 and len(fair["expert_load"]) == 2 and all(1.0 <= x < 2.0 for x in fair["expert_load"]), fair
    collapsed = torch.cat([torch.zeros(64, 2), torch.full((64, 2), -1e3)], dim=1)
    monitor.observe(SimpleNamespace(aux_loss=None, router_logits=(collapsed, collapsed)))
    assert monitor.numbers()["expert_load"] == [2.0, 2.0]


@pytest.mark.parametrize("args, needle, key", [
    (["model.preset=llama-tiny", "deepspeed.expert_parallel=2", "--nproc", "2"], "llama is a dense model", "expert_parallel"),
    (["model.preset=mixtral-tiny", "deepspeed.expert_parallel=3", "--nproc", "3"], "does not divide the model's 4 experts", "expert_parallel"),
    (["model.preset=mixtral-tiny", "deepspeed.expert_parallel=2", "--nproc", "3"], "world size 3 does not divide", "expert_parallel"),
    (["model.preset=mixtral-tiny", "deepspeed.expert_parallel=2", "deepspeed.tensor_parallel=2", "--nproc", "4"],
     "tensor parallelism of mixtral (a mixture of experts) is not verified", "tensor_parallel"),
])
def test_a_bad_expert_layout_is_one_error_line_before_any_rank(capsys, tmp_path, args, needle, key):
    from bigtrain.cli import main

    out = tmp_path / "run"
    code = main(["train", "deepspeed.zero_stage=1", f"output_dir={out}", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert f"deepspeed.{key}" in err[0] and not out.exists()


def test_the_chunked_loss_trains_an_moe_model_with_its_router_term(runs):
    """train.chunked_loss=true under expert parallelism: really on (the startup line), the curve
    is one process's (without the router's term every loss would be lower by coef x aux_loss, far
    beyond 1e-5: test_expert_parallel_training_equals_one_process[ep2_chunked]), and the router's
    health is still recorded from the chunked forward."""
    run, log = runs["ep2_chunked"]
    assert "causal-LM loss: chunked (train.chunked_loss=true)" in log, log[-2000:]
    rows = [r for r in records(run) if "loss" in r]
    assert rows and all(r["aux_loss"] > 0 and len(r["expert_load"]) == 2 for r in rows), rows


@pytest.mark.parametrize("preset, total, active", [("mixtral-8x7b", 46.7e9, 12.9e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9)])
def test_the_real_shapes_have_their_published_sizes(preset, total, active):
    """Mixtral 8x7B: 46.7B parameters, 12.9B active per token; Qwen3-30B-A3B: 30.5B and 3.3B
    (their model cards), counted on the meta device as the trainer counts them."""
    from transformers import AutoModelForCausalLM

    from bigtrain.models import preset_config
    from bigtrain.moe import active_parameters, experts_per_token, num_experts

    cfg = preset_config(preset, {}, vocab_size=None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    a = active_parameters(model, num_experts(cfg), experts_per_token(cfg))
    assert abs(n - total) <= 0.01 * total and abs(a - active) <= 0.02 * active, (n / 1e9, a / 1e9)
    from bigtrain.estimate import model_shape

    shape = model_shape(cfg)  # the estimator counts the same way, from its own walk of the model
    assert (shape.params, shape.active_params) == (n, a)


def test_estimate_counts_what_each_expert_parallel_rank_holds(runs):
    """`bigtrain estimate --ep 2`'s parameters per GPU (before ZeRO) are what each rank of the ep 2
    run held by DeepSpeed's record (param_shapes of its model states): the experts halved, the
    rest whole. The ZeRO-1 optimizer share is 12 bytes per parameter over the ranks holding the
    same parameters: the dense part over 2, each rank's experts over 1."""
    from bigtrain import estimate as est
    from bigtrain.models import preset_config

    shape = est.model_shape(preset_config("mixtral-tiny", {}, vocab_size=512))
    ckpt = runs["ep2"][0] / "checkpoints" / "step_00000004"
    saved = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)  # rank 0's record
    held = sum(math.prod(v) for group in saved["param_shapes"] for v in group.values())
    r = est.estimate(shape, zero=1, gpus_per_node=2, seq_len=64, ep=2, precision="fp32")
    assert r["params_per_gpu_before_zero"] == held < shape.params, (held, shape.params)
    dense = shape.params - shape.expert_params
    assert r["per_gpu_bytes"]["optimizer"] == 12 * dense // 2 + 12 * (shape.expert_params // 2)
