"""`bigtrain estimate`: model states against DeepSpeed's own estimators, activations against what
autograd really saves, totals against peaks measured on CPU, and the command's JSON."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest

from bigtrain import estimate as est
from bigtrain.errors import UserError
from bigtrain.models import PRESETS



def run_cli(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="bigtrain estimate")
    est.add_arguments(parser)
    assert est.run(parser.parse_args(argv)) == 0
    return capsys.readouterr().out


def run_json(argv: list[str], capsys) -> dict:
    return json.loads(run_cli([*argv, "--json"], capsys))


@pytest.fixture(scope="module")
def shapes() -> dict:
    return {name: est.preset_shape(name) for name in ("tiny", "gpt2-small", "gpt2-xl", "llama-1b")}


# --------------------------------------------------------------------------- DeepSpeed's estimators


def test_parameter_counts_match_deepspeed_on_a_real_model(shapes):
    """The meta-device count (and DeepSpeed's 'largest layer') equals DeepSpeed's count of a real model."""
    from transformers import AutoModelForCausalLM

    from bigtrain.models import preset_config
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = AutoModelForCausalLM.from_config(preset_config("tiny", {}, None))
    assert model_to_params(model) == (shapes["tiny"].params, shapes["tiny"].largest_layer_params)
    # Known sizes: GPT-2 small 124.4M, XL 1.56B; Llama 3.2 1B 1.24B (tied embeddings counted once).
    assert shapes["gpt2-small"].params == 124_439_808
    assert shapes["gpt2-xl"].params == 1_557_611_200
    assert shapes["llama-1b"].params == 1_235_814_400


SETUPS = [(1, 1), (1, 8), (2, 8), (4, 4)]  # (nodes, gpus per node)


@pytest.mark.parametrize("preset", ["gpt2-small", "gpt2-xl", "llama-1b"])
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_zero2_model_states_equal_deepspeed(shapes, preset, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    s = shapes[preset]
    for nodes, gpus in SETUPS:
        for precision in ("bf16", "fp16"):
            r = est.estimate(s, zero=2, offload=offload, nodes=nodes, gpus_per_node=gpus, precision=precision)
            cpu, gpu = estimate_zero2_model_states_mem_needs(
                s.params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload == "cpu", additional_buffer_factor=1.5)
            g = r["per_gpu_bytes"]
            assert g["params"] + g["grads"] + g["optimizer"] == gpu, (nodes, gpus, precision)
            assert r["per_node_cpu_bytes"] == cpu, (nodes, gpus, precision)


@pytest.mark.parametrize("preset", ["gpt2-small", "gpt2-xl", "llama-1b"])
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_zero3_model_states_equal_deepspeed(shapes, preset, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    s = shapes[preset]
    for nodes, gpus in SETUPS:
        r = est.estimate(s, zero=3, offload=offload, nodes=nodes, gpus_per_node=gpus)
        # bigtrain builds ZeRO-3 models under deepspeed.zero.Init (zero_init) and offloads
        # parameters together with the optimizer.
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            s.params, s.largest_layer_params, num_gpus_per_node=gpus, num_nodes=nodes,
            cpu_offload=offload == "cpu", cpu_offload_params=offload == "cpu", zero_init=True, additional_buffer_factor=1.5)
        g = r["per_gpu_bytes"]
        assert g["params"] + g["grads"] + g["optimizer"] == gpu, (nodes, gpus)
        assert r["per_node_cpu_bytes"] == cpu, (nodes, gpus)


def test_stages_without_a_deepspeed_estimator_are_consistent(shapes):
    """ZeRO-0 and ZeRO-1 at one GPU hold everything, as ZeRO-2 does there: 20 bytes/param mixed, 16 in fp32."""
    s = shapes["gpt2-small"]
    n = s.params
    states = lambda r: sum(r["per_gpu_bytes"][k] for k in ("params", "grads", "optimizer"))  # noqa: E731
    for zero in (0, 1, 2):
        assert states(est.estimate(s, zero=zero)) == 20 * n
    assert states(est.estimate(s, zero=0, precision="fp32")) == 16 * n
    # More GPUs: ZeRO-0 replicates, ZeRO-1 shards the optimizer only, ZeRO-2 also gradients.
    z = {zero: est.estimate(s, zero=zero, gpus_per_node=8)["per_gpu_bytes"] for zero in (0, 1, 2)}
    assert z[0]["optimizer"] == 12 * n and z[1]["optimizer"] == z[2]["optimizer"] == 12 * n // 8
    assert z[0]["grads"] > z[1]["grads"] > z[2]["grads"]
    assert z[0]["params"] == z[1]["params"] == z[2]["params"] == 2 * n


# --------------------------------------------------------------------------- activations


def _saved_bytes(cfg, batch: int, seq: int, dtype, checkpointing: bool) -> int:
    """Bytes autograd saves for the backward (unique storages, parameters excluded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x)
    return sum(seen.values())


SMALL_GPT2 = dict(n_layer=3, n_embd=128, n_head=4, vocab_size=512, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
SMALL_LLAMA = dict(num_hidden_layers=3, hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512, max_position_embeddings=128, tie_word_embeddings=True)
# Mixtures of experts as bigtrain trains them (output_router_logits: the load-balancing loss);
# Qwen3-MoE with per-head q/k norms and queries wider than the hidden size (heads x head_dim).
SMALL_MIXTRAL = dict(num_hidden_layers=3, hidden_size=128, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=512, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
SMALL_QWEN3_MOE = dict(num_hidden_layers=3, hidden_size=128, intermediate_size=352, moe_intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=48, vocab_size=512, max_position_embeddings=128, num_experts=8,
                       num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=True)


@pytest.mark.parametrize("model_type,spec", [("gpt2", SMALL_GPT2), ("llama", SMALL_LLAMA), ("mixtral", SMALL_MIXTRAL),
                                             ("qwen3_moe", SMALL_QWEN3_MOE)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_saved_tensors(model_type, spec, precision, checkpointing):
    """The per-layer formula counts what transformers' GPT-2 / Llama / Mixtral / Qwen3-MoE really
    save, within 3%."""
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **spec)
    shape = est.model_shape(cfg)
    batch, seq = 2, 64
    tokens = batch * seq
    saved = _saved_bytes(cfg, batch, seq, torch.float32 if precision == "fp32" else torch.bfloat16, checkpointing)
    act = est.activation_bytes(shape, seq, batch, precision, checkpointing, device="cpu")
    full = est.activation_bytes(shape, seq, batch, precision, False, device="cpu")
    one_layer = full["layers"] // shape.layers
    # Saved at the end of the forward: every layer (or, checkpointed, every layer's input),
    # the rest, and cross-entropy's fp32 log-softmax (4V of the 12V logits peak).
    layers = act["layers"] - one_layer if checkpointing else act["layers"]
    expected = layers + act["outside_layers"] + tokens * 4 * shape.vocab
    assert saved == pytest.approx(expected, rel=0.03), (saved, expected)


def test_activations_scale_and_checkpointing_saves(shapes):
    s = shapes["gpt2-small"]
    a1 = est.activation_bytes(s, 1024, 1)["total"]
    assert est.activation_bytes(s, 1024, 4)["total"] == 4 * a1
    ck = est.activation_bytes(s, 1024, 4, checkpointing=True)
    full = est.activation_bytes(s, 1024, 4)
    assert ck["layers"] < full["layers"] / 4
    assert ck["logits"] == full["logits"]  # the logits are not inside a checkpointed layer
    assert est.activation_bytes(s, 1024, 1, precision="fp32")["layers"] > est.activation_bytes(s, 1024, 1)["layers"]


# --------------------------------------------------------------------------- measured peaks

# Two training steps (forward, backward, AdamW), fp32, gradients kept between steps as
# DeepSpeed's persistent gradient buffers are, under torch's profiler with memory events: the
# peak of the running sum of CPU allocations is the CPU twin of torch.cuda.max_memory_allocated.
# The peak RSS delta (VmHWM, reset after imports and a warm-up) is reported alongside, unchecked.
MEASURE = textwrap.dedent("""
    import gc, json, sys
    import psutil, torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.set_num_threads(1)

    def steps(cfg, batch, seq, ckpt, n=2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, cfg.vocab_size, (batch, seq))
        for _ in range(n):
            opt.zero_grad(set_to_none=False)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            del loss
            opt.step()

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    c = json.loads(sys.argv[1])
    steps(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64), 1, 8, False, 1)
    gc.collect()
    cfg = AutoConfig.for_model(c["model_type"], **c["config"])
    base = psutil.Process().memory_info().rss
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS
        rss = True
    except OSError:
        rss = False
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        steps(cfg, c["batch"], c["seq"], c["ckpt"])
    peak_rss = hwm() - base if rss else None
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    out = {"peak_allocated": peak, "peak_rss_delta": peak_rss}
    print(json.dumps(out))
""")

MEASURED_CASES = [
    # ~23M parameters: model states (16 bytes/param, 372 MB) dominate allocator noise.
    dict(model_type="gpt2", config=dict(SMALL_GPT2, n_layer=6, n_embd=512, n_head=8, vocab_size=8192, n_positions=256), batch=2, seq=128, ckpt=False),
    # Same model, 4x the activations (as large as the model states).
    dict(model_type="gpt2", config=dict(SMALL_GPT2, n_layer=6, n_embd=512, n_head=8, vocab_size=8192, n_positions=256), batch=8, seq=128, ckpt=False),
    dict(model_type="gpt2", config=dict(SMALL_GPT2, n_layer=6, n_embd=512, n_head=8, vocab_size=8192, n_positions=256), batch=8, seq=128, ckpt=True),
    dict(model_type="llama", config=dict(SMALL_LLAMA, num_hidden_layers=6, hidden_size=512, intermediate_size=1408,
                                         num_attention_heads=8, num_key_value_heads=4, vocab_size=8192, max_position_embeddings=256),
         batch=4, seq=128, ckpt=False),
]


def _measure_each(cases: list[dict], tmp_path) -> list[dict]:
    """MEASURE in one new process per case (freed heap memory would hide the next case's RSS peak),
    two at a time (each runs single-threaded); forked from the suite's pre-imported server when
    there is one (tests/forkserver.py: the allocator's peak is the process's own either way)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import forkserver

    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = dict(os.environ)

    def one(case: dict) -> subprocess.CompletedProcess:
        argv = [str(script), json.dumps(case)]
        if forkserver.available():
            return forkserver.run(argv, env, str(tmp_path), None, 300)
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(one, cases))
    for r in done:
        assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in done]


def test_total_matches_peak_measured_on_cpu(tmp_path):
    from transformers import AutoConfig

    measured = _measure_each(MEASURED_CASES, tmp_path)
    report = []
    for case, m in zip(MEASURED_CASES, measured):
        shape = est.model_shape(AutoConfig.for_model(case["model_type"], **case["config"]))
        r = est.estimate(shape, zero=0, precision="fp32", seq_len=case["seq"], micro_batch=case["batch"],
                         checkpointing=case["ckpt"], device="cpu")
        total = r["per_gpu_bytes"]["total"]
        report.append((case["model_type"], case["batch"], case["ckpt"], total, m["peak_allocated"], m["peak_rss_delta"]))
        # The issue asks for 25%; the allocator-level peak is exact enough to hold the formula to
        # 10% (it lands within 0.1%). Peak RSS is printed only: glibc keeps freed heap pages and
        # the profiler adds its own, so RSS overstates the tensors' peak by 30-90% here.
        assert total == pytest.approx(m["peak_allocated"], rel=0.10), report[-1]
    print("\n".join(f"{t} b={b} ckpt={c}: estimate {e / 2**20:.1f} MiB, peak allocated {p / 2**20:.1f} MiB, "
                    f"peak RSS delta {(r or 0) / 2**20:.1f} MiB" for t, b, c, e, p, r in report))


# --------------------------------------------------------------------------- the command


# Mixtures of experts are refused by the estimator (tests/test_moe.py), every other preset estimated.
@pytest.mark.parametrize("preset", list(PRESETS))
def test_json_for_every_preset(preset, capsys):
    r = run_json(["--preset", preset], capsys)
    assert r["params"] > 0
    g = r["per_gpu_bytes"]
    assert set(g) >= {"params", "grads", "optimizer", "activations", "total"}
    assert all(isinstance(v, int) and v > 0 for v in g.values())
    assert g["total"] == g["params"] + g["grads"] + g["optimizer"] + g["activations"]


def test_text_report(capsys):
    out = run_cli(["--preset", "gpt2-xl", "--zero", "2", "--nodes", "1", "--gpus-per-node", "8"], capsys)
    assert "1,557,611,200 parameters" in out and "ZeRO-2" in out
    for label in ("parameters", "gradients", "optimizer", "activations", "total", "per node CPU"):
        assert label in out


def test_zero3_params_shrink_with_more_gpus(capsys):
    per_gpu = [run_json(["--preset", "gpt2-large", "--zero", "3", "--nodes", str(n), "--gpus-per-node", str(g)], capsys)["per_gpu_bytes"]
               for n, g in ((1, 1), (1, 2), (1, 8), (4, 8))]
    for a, b in zip(per_gpu, per_gpu[1:]):
        assert b["params"] < a["params"] and b["grads"] < a["grads"] and b["optimizer"] < a["optimizer"]
        assert b["activations"] == a["activations"]
    # ZeRO-2 keeps whole parameters on every GPU.
    z2 = [run_json(["--preset", "gpt2-large", "--zero", "2", "--gpus-per-node", str(g)], capsys)["per_gpu_bytes"]["params"] for g in (1, 8)]
    assert z2[0] == z2[1]


@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("gpus", [1, 4])
def test_offload_moves_optimizer_from_gpu_to_cpu(zero, gpus, capsys):
    base = ["--preset", "gpt2-medium", "--zero", str(zero), "--gpus-per-node", str(gpus)]
    on_gpu = run_json([*base, "--offload", "none"], capsys)
    off = run_json([*base, "--offload", "cpu"], capsys)
    assert on_gpu["per_gpu_bytes"]["optimizer"] > 0
    assert off["per_gpu_bytes"]["optimizer"] == 0
    assert off["per_gpu_bytes"]["total"] < on_gpu["per_gpu_bytes"]["total"]
    assert off["per_gpu_bytes"]["activations"] == on_gpu["per_gpu_bytes"]["activations"]
    # The node's CPU holds what its GPUs no longer do. (Without offload DeepSpeed already counts
    # 4 bytes/param per local rank for loading the model, so with several GPUs the node total
    # may not grow.)
    moved = gpus * on_gpu["per_gpu_bytes"]["optimizer"]
    assert off["per_node_cpu_bytes"] >= max(moved, on_gpu["per_node_cpu_bytes"])
    if gpus == 1:
        assert off["per_node_cpu_bytes"] >= on_gpu["per_node_cpu_bytes"] + moved
    if zero == 3:
        assert off["per_gpu_bytes"]["params"] < on_gpu["per_gpu_bytes"]["params"]
        nvme = run_json([*base, "--offload", "nvme"], capsys)
        # 16-bit parameters, fp32 master and Adam states (14 bytes/param) go to NVMe.
        assert nvme["per_node_nvme_bytes"] == 14 * nvme["params"]
        assert nvme["per_gpu_bytes"] == off["per_gpu_bytes"]


@pytest.mark.parametrize("argv,flag", [
    (["--preset", "gpt3"], "--preset"),
    (["--preset", "tiny", "--zero", "4"], "--zero"),
    (["--preset", "tiny", "--offload", "disk", "--zero", "2"], "--offload"),
    (["--preset", "tiny", "--offload", "cpu"], "--offload"),  # ZeRO-0 cannot offload
    (["--preset", "tiny", "--precision", "int8"], "--precision"),
    (["--preset", "tiny", "--nodes", "0"], "--nodes"),
    (["--preset", "tiny", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["--preset", "tiny", "--seq-len", "0"], "--seq-len"),
    (["--preset", "tiny", "--seq-len", "4096"], "--seq-len"),  # past GPT-2's 1024 positions
    (["--preset", "tiny", "--micro-batch", "0"], "--micro-batch"),
    (["--preset", "tiny", "--tp", "2", "--gpus-per-node", "2"], "--tp"),  # AutoTP refuses GPT-2
    (["--preset", "llama-tiny", "--tp", "3", "--gpus-per-node", "8"], "--tp"),
    (["--preset", "llama-tiny", "--tp", "16", "--nodes", "2", "--gpus-per-node", "8"], "--tp"),  # across nodes
    (["--preset", "llama-tiny", "--sp", "3", "--gpus-per-node", "8"], "--sp"),
    (["--preset", "llama-tiny", "--sp", "2", "--gpus-per-node", "2", "--seq-len", "1001"], "--seq-len"),
    (["--preset", "llama-tiny", "--sp", "2", "--tp", "2", "--gpus-per-node", "4"], "--tp and --sp"),
    (["--preset", "llama-tiny", "--tp", "0"], "--tp"),
    (["--preset", "llama-tiny", "--ep", "2", "--gpus-per-node", "2"], "--ep 2: the model is dense"),
    (["--preset", "mixtral-tiny", "--ep", "3", "--gpus-per-node", "3"], "--ep 3 does not divide the model's 4 experts"),
    (["--preset", "mixtral-tiny", "--ep", "4", "--gpus-per-node", "2"], "--ep 4 does not divide the 2 GPUs"),
    (["--preset", "mixtral-tiny", "--ep", "2", "--gpus-per-node", "2", "--zero", "2", "--offload", "cpu"], "--ep with --offload"),
])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(UserError) as err:
        run_cli(argv, capsys)
    msg = str(err.value)
    assert flag in msg and "\n" not in msg


def test_sequence_parallel_divides_activations_and_keeps_model_states(capsys):
    """--sp 8: each GPU holds seq/8 tokens (activations of a seq/8 run), ZeRO still partitions
    over all 64 GPUs (parameters, gradients and optimizer as without --sp)."""
    base = ["--preset", "llama-70b", "--zero", "3", "--nodes", "8", "--gpus-per-node", "8", "--activation-checkpointing"]
    long = run_json([*base, "--seq-len", "65536"], capsys)
    split = run_json([*base, "--seq-len", "65536", "--sp", "8"], capsys)
    short = run_json([*base, "--seq-len", "8192"], capsys)
    assert split["per_gpu_bytes"]["activations"] == short["per_gpu_bytes"]["activations"] < long["per_gpu_bytes"]["activations"] / 7
    for key in ("params", "grads", "optimizer"):
        assert split["per_gpu_bytes"][key] == long["per_gpu_bytes"][key]


def test_tensor_parallel_splits_the_linear_layers_and_their_activations(capsys):
    """--tp 8 on 8 GPUs (data parallel 1): parameters per GPU drop to the embeddings plus 1/8 of
    the linear layers; a layer's activations shrink but the norms' and the logits' do not."""
    base = ["--preset", "llama-7b", "--zero", "1", "--gpus-per-node", "8", "--seq-len", "4096"]
    one, tp = run_json(base, capsys), run_json([*base, "--tp", "8"], capsys)
    shape = est.preset_shape("llama-7b")
    embed = shape.vocab * shape.hidden
    assert tp["params_per_gpu_before_zero"] == shape.params - shape.linear_params + shape.linear_params // 8
    assert embed < tp["params_per_gpu_before_zero"] < one["params"] / 4
    assert tp["per_gpu_bytes"]["params"] == 2 * tp["params_per_gpu_before_zero"]
    a1, a8 = one["activation_bytes"], tp["activation_bytes"]
    assert a8["logits"] == a1["logits"] and a8["outside_layers"] == a1["outside_layers"]
    assert a1["one_layer"] / 4 < a8["one_layer"] < a1["one_layer"] / 2
