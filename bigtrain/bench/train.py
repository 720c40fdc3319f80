"""`bigtrain bench train`: training throughput, step-time split, memory and MFU, optionally side by
side with transformers' Trainer on the same model, data, batch, precision and DeepSpeed config.

Each measurement runs in its own process (so peak memory is that side's alone), and with
`--compare hf` the two sides alternate A B A B for `--rounds` rounds, so drift in a noisy
machine hits both alike; the ratio is of median step times, with its spread over rounds.

FLOP convention (stated in the output): per token, 6 x parameters (forward 2, backward 4) plus
attention's 12 x layers x hidden x seq_len (QK^T and AV, forward and backward), not halved for
causal masking. MFU = achieved FLOP/s / the device's peak: a table of GPUs (H100/H200 SXM 989
TFLOP/s dense bf16, A100 312), `--peak-tflops` to override; on CPU the peak is this machine's
measured fp32 matmul throughput (say so when quoting it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bigtrain.errors import UserError
from bigtrain.flops import FLOP_FORMULA, device_peak_flops, flops_per_token, peak_memory
from bigtrain.api import Callback

NO_EVAL = 1 << 40


# --------------------------------------------------------------------------- timing


class StepTimer(Callback):
    """Splits each optimizer step into data wait, forward, backward and optimizer step.

    A trainer callback: `on_phase(name)` charges the time since the previous phase to `name`; on
    CUDA it synchronises first, which costs a little throughput: the benchmark pays it, training
    (no timer) does not. At `stop_at` it ends the run before the final evaluation and checkpoint.
    """

    def __init__(self, cuda: bool, stop_at: int = 0) -> None:
        self.cuda, self.stop_at = cuda, stop_at
        self.steps: list[dict] = []
        self._current: dict = {}
        self._last = time.perf_counter()

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self, name: str) -> None:
        now = self._now()
        self._current[name] = self._current.get(name, 0.0) + now - self._last
        self._last = now

    def end_step(self) -> None:
        self.mark("other")
        self._current["total"] = sum(self._current.values())
        self.steps.append(self._current)
        self._current = {}

    def on_train_start(self, state) -> None:  # noqa: ARG002
        self._last = self._now()

    def on_phase(self, name: str) -> None:
        self.mark(name)

    def on_step_end(self, state, result) -> None:  # noqa: ARG002
        self.end_step()
        if state.step >= self.stop_at:
            state.request_stop("the benchmark's steps are done")


def peak_memory_bytes(cuda: bool) -> int:
    gb = peak_memory(cuda)
    return int(1e9 * gb.get("mem_allocated_gb", gb.get("mem_rss_gb", 0.0)))


# --------------------------------------------------------------------------- the two sides


def _bench_config(config_path: str, steps: int, warmup: int):
    from bigtrain.config import load_config

    cfg = load_config(config_path, [])
    cfg.train.max_steps = warmup + steps
    cfg.train.eval_every = cfg.train.save_every = cfg.train.log_every = NO_EVAL
    cfg.train.progress = False
    cfg.train.sample_tokens = 0
    return cfg


def run_bigtrain(config_path: str, steps: int, warmup: int) -> dict:
    """bigtrain's own Trainer: the real loop, with the step timer switched on."""
    from bigtrain.trainer import Trainer

    import torch

    cfg = _bench_config(config_path, steps, warmup)
    cuda = torch.cuda.is_available()
    timer = StepTimer(cuda, stop_at=cfg.train.max_steps)
    trainer = Trainer(cfg, overwrite=True, callbacks=[timer])
    trainer.train()
    return {
        "side": "bigtrain", "steps": timer.steps[warmup:], "peak_memory_bytes": peak_memory_bytes(cuda),
        "params": trainer.n_params, "hf_config": trainer.hf_config.to_dict(), "tokens_per_step": trainer.global_batch * cfg.data.seq_len,
        "world_size": trainer.env.world_size, "precision": trainer.precision, "cuda": cuda,
    }


def run_hf(config_path: str, steps: int, warmup: int) -> dict:
    """transformers' Trainer on the same model, data, batch, precision and DeepSpeed config."""
    from transformers import Trainer

    from bigtrain.corpus import ShardData, ensure_prepared
    from bigtrain.process import dist_env, setup_accelerator
    from bigtrain.tokenizer import load_tokenizer

    cfg = _bench_config(config_path, steps, warmup)
    on_cpu = setup_accelerator()
    env = dist_env()
    data = ShardData(cfg, ensure_prepared(cfg, log=lambda *a: None))
    tok = load_tokenizer(data.tokenizer_dir)
    blocks = data.train
    held_out = set(data.valid_ids.tolist())
    train_idx = [i for i in range(len(blocks)) if i not in held_out]
    ds_config, precision = _hf_ds_config(cfg, env.world_size, on_cpu)
    model = _hf_model(cfg, tok, on_cpu, precision, env.local_rank)
    n_params = sum(p.numel() for p in model.parameters())
    cuda = not on_cpu
    step_times: list[float] = []
    args = _hf_training_args(cfg, ds_config, precision, on_cpu)
    Trainer(model=model, args=args, train_dataset=_hf_dataset(blocks, train_idx), callbacks=[_hf_step_timer(cuda, step_times)]).train()
    t = cfg.train
    # Step k's time is measured end to end (data included), as bigtrain's "total".
    return {
        "side": "hf", "steps": [{"total": s} for s in step_times[max(0, warmup - 1):]], "peak_memory_bytes": peak_memory_bytes(cuda),
        "params": n_params, "tokens_per_step": t.micro_batch_size * t.grad_accum * env.world_size * cfg.data.seq_len,
        "world_size": env.world_size, "precision": precision, "cuda": cuda,
    }


def _hf_ds_config(cfg, world_size: int, on_cpu: bool) -> tuple[dict, str]:
    """(bigtrain's ds_config for the HF Trainer, its precision)."""
    from bigtrain.engine import build_ds_config, precision_of

    ds_config = build_ds_config(cfg, world_size, on_cpu)
    precision = precision_of(ds_config)
    # Values the HF Trainer also sets from its arguments become "auto" so it fills them itself
    # (from the same numbers, given below); everything else is bigtrain's config, unchanged.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        ds_config[key] = "auto"
    ds_config["optimizer"]["params"].update(lr="auto", betas="auto", weight_decay="auto")
    ds_config["scheduler"]["params"].update(total_num_steps="auto", warmup_num_steps="auto")
    for k in ("bf16", "fp16"):
        ds_config.setdefault(k, {})["enabled"] = "auto"
    return ds_config, precision


def _hf_model(cfg, tok, on_cpu: bool, precision: str, local_rank: int):
    """The config's model (preset, vocabulary, special ids, attention), built by transformers. The
    attention is the one bigtrain's side trained with (the same decision, its cached self-check)."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigtrain.models import choose_attention, preset_config

    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    hf_config = preset_config(cfg.model.preset, cfg.model.config, vocab_size=((len(tok) + 63) // 64) * 64, special_ids=ids)
    hf_config.use_cache = False
    torch.manual_seed(cfg.train.seed)
    attn, _ = choose_attention(cfg, on_cpu, precision, local_rank, lambda line: None)  # bigtrain's side warned already
    if attn == "bigtrain_triton":
        import bigtrain.kernels  # noqa: F401
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn)


def _hf_dataset(blocks, train_idx):
    """bigtrain's training blocks as a torch Dataset of {input_ids, labels}."""
    import numpy as np
    import torch

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(train_idx)

        def __getitem__(self, i: int) -> dict:
            ids = torch.from_numpy(blocks.take(np.array([train_idx[i]]))["input_ids"][0])
            return {"input_ids": ids, "labels": ids}

    return Blocks()


def _hf_step_timer(cuda: bool, step_times: list[float]):
    """A TrainerCallback that appends the time from one step's end to the next to step_times."""
    import torch
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self) -> None:
            self.last = None

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.last is not None:
                step_times.append(now - self.last)
            self.last = now

    return Timing()


def _hf_training_args(cfg, ds_config: dict, precision: str, on_cpu: bool):
    """TrainingArguments with bigtrain's batch, optimizer, schedule, precision and ds_config; no logging, eval or saving."""
    from transformers import TrainingArguments

    out = tempfile.mkdtemp(prefix="bigtrain-bench-hf-")
    t = cfg.train
    return TrainingArguments(
        output_dir=out, deepspeed=ds_config, per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.beta1, adam_beta2=t.beta2, max_grad_norm=t.grad_clip,
        max_steps=t.max_steps, warmup_steps=max(1, min(t.warmup_steps, t.max_steps - 1)), bf16=precision == "bf16", fp16=precision == "fp16",
        logging_steps=NO_EVAL, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        seed=t.seed, use_cpu=on_cpu, gradient_checkpointing=cfg.deepspeed.activation_checkpointing,
    )


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bigtrain.bench.train worker")
    p.add_argument("side", choices=("bigtrain", "hf"))
    p.add_argument("config")
    p.add_argument("steps", type=int)
    p.add_argument("warmup", type=int)
    p.add_argument("out")
    a = p.parse_args(argv)
    result = (run_bigtrain if a.side == "bigtrain" else run_hf)(a.config, a.steps, a.warmup)
    Path(a.out).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- orchestration


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="the training config to measure (as for bigtrain train)")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per round (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="steps run before measuring, each round (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="with --compare hf: A B rounds (default 3)")
    p.add_argument("--compare", choices=("hf",), help="also run transformers' Trainer on the same config, alternating")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: table of GPUs; CPU: measured matmul)")
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object")


def _run_side(side: str, config_path: str, steps: int, warmup: int, workdir: Path) -> dict:
    out = workdir / f"{side}-{time.monotonic_ns()}.json"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "bigtrain.bench.train", side, config_path, str(steps), str(warmup), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise UserError(f"bench train: the {side} run failed (exit {r.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(results: list[dict]) -> dict:
    steps = [s["total"] for r in results for s in r["steps"]]
    med = _median(steps)
    r0 = results[0]
    tokens = r0["tokens_per_step"]
    out = {
        "median_step_s": med, "tokens_per_s": tokens / med, "tokens_per_s_per_device": tokens / med / r0["world_size"],
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in results), "params": r0["params"],
        "round_medians_s": [_median([s["total"] for s in r["steps"]]) for r in results],
    }
    split_keys = [k for k in ("data", "forward", "backward", "step", "other") if k in r0["steps"][0]] if r0["steps"] else []
    if split_keys:
        total = sum(s["total"] for r in results for s in r["steps"])
        out["split"] = {k: sum(s.get(k, 0.0) for r in results for s in r["steps"]) / total for k in split_keys}
    return out


def run(ns: argparse.Namespace) -> int:
    _check_arguments(ns)
    cfg, config_path, workdir, on_cpu = _setup(ns)
    peak, peak_source = device_peak_flops(not on_cpu, ns.peak_tflops)
    rounds = ns.rounds if ns.compare else 1
    ours, theirs = _measure_rounds(ns, str(config_path), workdir, rounds)
    a, fpt = _bigtrain_summary(ours, cfg.data.seq_len, peak)
    result = {
        "preset": cfg.model.preset, "precision": ours[0]["precision"], "zero_stage": cfg.deepspeed.zero_stage, "world_size": ours[0]["world_size"],
        "seq_len": cfg.data.seq_len, "global_batch": ours[0]["tokens_per_step"] // cfg.data.seq_len, "steps": ns.steps, "warmup": ns.warmup,
        "rounds": rounds, "flops_per_token": fpt, "flop_formula": FLOP_FORMULA, "peak_flops": peak, "peak_source": peak_source,
        "device": "cpu" if on_cpu else "cuda", **a,
    }
    lines = _report_lines(result)
    if ns.compare:
        lines += _compare_hf(result, summarize(theirs))
    print("\n".join(lines))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _check_arguments(ns: argparse.Namespace) -> None:
    for name, value, lo in (("--steps", ns.steps, 1), ("--warmup", ns.warmup, 1), ("--rounds", ns.rounds, 1)):
        if value < lo:
            raise UserError(f"{name} must be >= {lo}, got {value}")
    if ns.peak_tflops is not None and ns.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be > 0, got {ns.peak_tflops}")


def _setup(ns: argparse.Namespace) -> tuple[Any, Path, Path, bool]:
    """Load and check the config, write it into a fresh work directory and tokenize once.

    Returns (config, its path, the work directory, on_cpu).
    """
    from bigtrain.config import dump_yaml, load_config, split_config_args
    from bigtrain.process import setup_accelerator

    config, overrides = split_config_args(ns.args)
    cfg = load_config(config, overrides)
    if cfg.task != "clm":
        raise UserError(f"bench train measures task=clm (the transformers Trainer comparison is for causal LM); got task={cfg.task}")
    on_cpu = setup_accelerator()
    workdir = Path(tempfile.mkdtemp(prefix="bigtrain-bench-"))
    cfg.output_dir = str(workdir / "run")
    config_path = workdir / "config.yaml"
    config_path.write_text(dump_yaml(cfg))
    from bigtrain.tasks import build_task

    build_task(cfg).prepare(0, False, lambda *a: print(*a, file=sys.stderr))  # tokenize once, outside the timings
    return cfg, config_path, workdir, on_cpu


def _measure_rounds(ns: argparse.Namespace, config_path: str, workdir: Path, rounds: int) -> tuple[list[dict], list[dict]]:
    """(bigtrain's results, the HF Trainer's results), one of each per round, alternating."""
    ours: list[dict] = []
    theirs: list[dict] = []
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}: bigtrain ...", file=sys.stderr, flush=True)
        ours.append(_run_side("bigtrain", config_path, ns.steps, ns.warmup, workdir))
        if ns.compare:
            print(f"round {r + 1}/{rounds}: transformers Trainer ...", file=sys.stderr, flush=True)
            theirs.append(_run_side("hf", config_path, ns.steps, ns.warmup, workdir))
    return ours, theirs


def _bigtrain_summary(ours: list[dict], seq_len: int, peak: float) -> tuple[dict, float]:
    """(`summarize` of bigtrain's rounds with achieved TFLOP/s and MFU added, FLOPs per token)."""
    a = summarize(ours)
    from transformers import AutoConfig

    hf_config = dict(ours[0]["hf_config"])
    hf_cfg = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    fpt = flops_per_token(a["params"], hf_cfg, seq_len)
    a["tflops"] = fpt * a["tokens_per_s"] / 1e12
    a["mfu"] = fpt * a["tokens_per_s_per_device"] / peak
    return a, fpt


def _report_lines(result: dict) -> list[str]:
    """bigtrain's side of the printed report."""
    r = result
    lines = [
        f"bigtrain bench train: {r['preset']} ({r['params'] / 1e6:.2f}M params), {r['precision']}, ZeRO-{r['zero_stage']}, "
        f"world size {r['world_size']}, batch {r['global_batch']} x {r['seq_len']} tokens, {r['steps']} steps x {r['rounds']} round(s)",
        f"  bigtrain      {r['tokens_per_s']:>10,.0f} tokens/s ({r['tokens_per_s_per_device']:,.0f} per device), median step {r['median_step_s'] * 1e3:.1f} ms, "
        f"peak memory {r['peak_memory_bytes'] / 2**20:,.0f} MiB",
        f"  achieved      {r['tflops']:.3f} TFLOP/s, MFU {100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e12:.2f} TFLOP/s ({r['peak_source']})",
        f"  FLOPs         {FLOP_FORMULA} = {r['flops_per_token'] / 1e6:.1f} MFLOP/token",
    ]
    if "split" in r:
        lines.append("  step split    " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["split"].items()))
    return lines


def _compare_hf(result: dict, b: dict) -> list[str]:
    """Adds the HF Trainer's summary `b` and the step-time ratios to result; returns their report lines."""
    ratios = [x / y for x, y in zip(result["round_medians_s"], b["round_medians_s"])]
    result.update(
        hf_tokens_per_s=b["tokens_per_s"], hf_median_step_s=b["median_step_s"], hf_peak_memory_bytes=b["peak_memory_bytes"],
        hf_round_medians_s=b["round_medians_s"], step_time_ratio=result["median_step_s"] / b["median_step_s"],
        step_time_ratio_rounds=ratios,
    )
    return [
        f"  HF Trainer    {b['tokens_per_s']:>10,.0f} tokens/s, median step {b['median_step_s'] * 1e3:.1f} ms, peak memory {b['peak_memory_bytes'] / 2**20:,.0f} MiB",
        f"  step time ratio bigtrain/HF: {result['step_time_ratio']:.3f} (per round {min(ratios):.3f}-{max(ratios):.3f}; < 1 means bigtrain is faster)",
    ]


if __name__ == "__main__":
    from bigtrain.process import leave

    leave(worker_main(sys.argv[1:]))
