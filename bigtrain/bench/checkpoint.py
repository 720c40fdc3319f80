"""`bigtrain bench checkpoint`: seconds per checkpoint save, per-rank sealing vs the former scheme.

A save writes every rank's files (DeepSpeed's model states and ZeRO optimizer shards, bigtrain's
RNG states, hf/) and then seals them: fsync, SHA-256, manifest, atomic rename
(bigtrain.checkpoint). Sealing used to be rank 0's job alone, file after file, while every other
rank waited; now each rank seals an equal share. This benchmark measures both on one model in one
run, plus a save without hashing (verify=False: fsync and sizes only), so the cost of the
checksums themselves is visible too:

- split:    save(verify=True), every rank fsyncs and hashes its share (what bigtrain does);
- noverify: save(verify=False), every rank fsyncs its share, no hashing;
- rank0:    save(verify=True, hash_mode="rank0"), rank 0 fsyncs and hashes everything (the old way).

With --async the modes are `split` and `async` (train.async_save, bigtrain/async_save.py): a
background save is timed twice, from the barrier before it to the barrier after its snapshot
("blocking": what the step loop waits for) and to the barrier after its commit ("total"). The host
memory its snapshot buffers hold and the ranks' peak RSS are reported with it.

The ranks are real processes started here (RANK, WORLD_SIZE, MASTER_ADDR/PORT), each building the
same GPT-2-like model (transformers' GPT2LMHeadModel from a config, random weights) under ZeRO-2
in fp32 and taking one optimizer step, so the Adam moments exist and the checkpoint has its full
size (~16 bytes per parameter). Then, after --warmup untimed saves, the modes alternate
(split, noverify, rank0, split, ...) for --rounds rounds, so drift on a shared machine hits all
alike. A save is timed from a barrier before it to a barrier after it (all ranks done); its
"seal" part is what follows the barrier after the writes, the part the modes differ in. Each
checkpoint is deleted and the file systems synced (os.sync), untimed, before the next save: a
deletion or writeback still running would slow the next save's writes, whichever mode it is. What is measured is this machine's disk and
CPUs (put --dir on the file system training writes to); the figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bigtrain.errors import UserError

# name, verify, hash_mode, label
MODES = (
    ("split", True, "split", "per-rank hashing (bigtrain)"),
    ("noverify", False, "split", "no hashing (verify=False)"),
    ("rank0", True, "rank0", "rank 0 hashes all (old)"),
)
ASYNC_MODES = (
    ("split", True, "split", "synchronous save (bigtrain)"),
    ("async", True, "async", "background write (async_save)"),
)
PROGRESS = "bench: "


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bigtrain bench checkpoint`."""
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) to start (default 2)")
    p.add_argument("--layers", type=int, default=12, help="GPT-2 layers (default 12: ~110M parameters with the defaults)")
    p.add_argument("--hidden", type=int, default=768, help="hidden size (default 768; heads = hidden / 64)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of split, noverify, rank0 saves (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed saves before the rounds (default 1)")
    p.add_argument("--dir", metavar="DIR", help="where the checkpoints are written (default: a new temporary directory)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="write the results as JSON (default bench/results/checkpoint_save.json, with --async checkpoint_async.json)")
    p.add_argument("--async", dest="background", action="store_true",
                   help="compare synchronous saves with background ones (train.async_save): blocking and total seconds")


# --------------------------------------------------------------------------- one rank


def build_engine(layers: int, hidden: int, vocab: int, seq_len: int = 16):
    """A GPT-2-like model under ZeRO-2, fp32, after one optimizer step; returns (engine, its config)."""
    import deepspeed
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    heads = hidden // 64 if hidden % 64 == 0 else 1
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=max(64, seq_len))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "fp16": {"enabled": False}, "bf16": {"enabled": False},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    ids = torch.randint(vocab, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(engine.device)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    return engine, config


def tiny_tokenizer():
    """A real transformers tokenizer (a two-word WordLevel model): what `save` writes into hf/."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")), unk_token="<unk>")


def _timed_save(engine, root: Path, step: int, config, tokenizer, verify: bool, hash_mode: str, saver=None) -> dict:
    """One save, timed barrier to barrier; every rank's `timings` gathered (on every rank)."""
    import torch.distributed as dist

    from bigtrain import checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    state = {"step": step, "world_size": world, "zero_stage": 2, "precision": "fp32"}
    if hash_mode == "async":
        return _timed_background_save(saver, state, config, tokenizer)
    timings: dict = {}
    dist.barrier()
    t0 = time.perf_counter()
    checkpoint.save(engine, root, state, rank, config, tokenizer, 1 << 30, verify, hash_mode=hash_mode, timings=timings)
    dist.barrier()
    seconds = time.perf_counter() - t0
    ranks: list = [None] * world
    dist.all_gather_object(ranks, timings)
    return {"save_s": seconds, "blocking_s": seconds, "seal_s": max(t["seal_s"] for t in ranks), "write_s": max(t["write_s"] for t in ranks), "ranks": ranks}


def _timed_background_save(saver, state: dict, config, tokenizer) -> dict:
    """A background save: blocking = barrier to the barrier after the snapshot; total = to the commit."""
    import resource

    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    saver.start(state, config, tokenizer)
    dist.barrier()
    blocking = time.perf_counter() - t0
    saver.wait()
    dist.barrier()
    total = time.perf_counter() - t0
    mine = {"buffer_bytes": saver.snap.buffers.bytes, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return {"save_s": total, "blocking_s": blocking, "seal_s": float("nan"), "write_s": float("nan"), "ranks": ranks}


def _saves(engine, root: Path, config, rounds: int, warmup: int, background: bool) -> tuple[list[dict], dict]:
    """--warmup untimed saves, then the modes alternating for `rounds` rounds; rank 0 keeps the records."""
    import torch.distributed as dist

    from bigtrain import checkpoint
    from bigtrain.async_save import AsyncSaver

    rank, tokenizer = dist.get_rank(), tiny_tokenizer()
    modes = ASYNC_MODES if background else MODES
    saver = AsyncSaver(engine, root, rank, 1 << 30) if background else None
    plan = [("warmup", True, "split", None)] * warmup + [m for _ in range(rounds) for m in modes]
    records, sizes = [], {}
    for i, (name, verify, hash_mode, _) in enumerate(plan, start=1):
        rec = _timed_save(engine, root, i, config, tokenizer, verify, hash_mode, saver)
        final = root / checkpoint.tag_for(i)
        if rank == 0:
            problem = checkpoint.check_checkpoint(final) if i <= warmup + len(modes) else None  # the first of each mode, untimed
            if problem is not None:
                raise RuntimeError(f"bench checkpoint: the {name} save is not valid: {problem}")
            sizes = {rel: meta["size"] for rel, meta in json.loads((final / checkpoint.MANIFEST).read_text())["files"].items()}
            if name != "warmup":
                records.append({"mode": name, **rec})
                print(f"{PROGRESS}save {i - warmup}/{len(plan) - warmup} {name}: {rec['save_s']:.2f} s (training stood still "
                      f"{rec['blocking_s']:.2f} s)", file=sys.stderr, flush=True)
            shutil.rmtree(final)
            os.sync()  # the deletion and any writeback done before the next save starts (untimed)
        dist.barrier()
    return records, sizes


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bigtrain.bench.checkpoint worker")
    for name in ("layers", "hidden", "vocab", "rounds", "warmup", "background"):
        p.add_argument(name, type=int)
    p.add_argument("root")
    p.add_argument("out")
    a = p.parse_args(argv)
    from bigtrain.process import init_distributed, release_shm_buffers, setup_accelerator

    on_cpu = setup_accelerator()
    init_distributed(on_cpu, timeout_minutes=30)
    import torch.distributed as dist

    engine, config = build_engine(a.layers, a.hidden, a.vocab)
    records, sizes = _saves(engine, Path(a.root), config, a.rounds, a.warmup, bool(a.background))
    if dist.get_rank() == 0:
        params = sum(p.numel() for p in engine.module.parameters())
        Path(a.out).write_text(json.dumps({"records": records, "files": sizes, "params": params, "device": "cpu" if on_cpu else "cuda"}))
    dist.barrier()
    release_shm_buffers()
    dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- orchestration


def _check_args(ns: argparse.Namespace) -> None:
    for flag, value, lo in (("--nproc", ns.nproc, 1), ("--layers", ns.layers, 1), ("--hidden", ns.hidden, 1),
                            ("--vocab", ns.vocab, 2), ("--rounds", ns.rounds, 1), ("--warmup", ns.warmup, 0)):
        if value < lo:
            raise UserError(f"{flag} must be >= {lo}, got {value}")
    if ns.dir is not None and Path(ns.dir).exists() and not Path(ns.dir).is_dir():
        raise UserError(f"--dir: {ns.dir} is not a directory")


def _start_ranks(ns: argparse.Namespace, root: Path, out: Path, logs: Path) -> list[subprocess.Popen]:
    from bigtrain.process import free_port

    port = free_port()
    args = (ns.layers, ns.hidden, ns.vocab, ns.rounds, ns.warmup, int(ns.background))
    cmd = [sys.executable, "-m", "bigtrain.bench.checkpoint", *map(str, args), str(root), str(out)]
    procs = []
    for rank in range(ns.nproc):
        # What DeepSpeed's launcher would set on one machine (its CPU accelerator reads LOCAL_SIZE).
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ns.nproc), LOCAL_RANK=str(rank), LOCAL_SIZE=str(ns.nproc),
                   CROSS_RANK="0", CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], logs: Path) -> None:
    """Wait for every rank, echoing rank 0's progress lines; the first rank to fail ends the others."""
    seen = 0
    while True:
        lines = (logs / "rank0.log").read_text(errors="replace").splitlines()
        for line in lines[seen:]:
            if line.startswith(PROGRESS):
                print(line[len(PROGRESS):], file=sys.stderr, flush=True)
        seen = len(lines)
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            r = failed[0]
            tail = "\n".join((logs / f"rank{r}.log").read_text(errors="replace").strip().splitlines()[-15:])
            raise UserError(f"bench checkpoint: rank {r} failed (exit {codes[r]}):\n{tail}")
        if all(c == 0 for c in codes):
            return
        time.sleep(0.5)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(records: list[dict]) -> dict:
    """Per mode: every round's save and seal seconds, their medians; and the ratios of the medians."""
    modes = {}
    for name, _, _, label in MODES:
        recs = [r for r in records if r["mode"] == name]
        modes[name] = {
            "label": label, "save_s": [r["save_s"] for r in recs], "seal_s": [r["seal_s"] for r in recs],
            "write_s": [r["write_s"] for r in recs], "median_save_s": _median([r["save_s"] for r in recs]),
            "median_seal_s": _median([r["seal_s"] for r in recs]), "median_write_s": _median([r["write_s"] for r in recs]),
        }
    split = [r for r in records if r["mode"] == "split"]
    shares = [{k: t.get(k) for k in ("share_files", "share_bytes", "share_s")} for t in split[-1]["ranks"]] if split else []
    s, n, o = modes["split"], modes["noverify"], modes["rank0"]
    ratios = {
        "save_old_over_split": o["median_save_s"] / s["median_save_s"], "seal_old_over_split": o["median_seal_s"] / s["median_seal_s"],
        "save_split_over_noverify": s["median_save_s"] / n["median_save_s"], "seal_split_over_noverify": s["median_seal_s"] / n["median_seal_s"],
    }
    return {"modes": modes, "ratios": ratios, "split_shares": shares}


def summarize_async(records: list[dict]) -> dict:
    """Per mode: every round's total and blocking seconds and their medians; the blocking ratio;
    the snapshot's host memory (buffers, peak RSS) per rank."""
    modes = {}
    for name, _, _, label in ASYNC_MODES:
        recs = [r for r in records if r["mode"] == name]
        modes[name] = {"label": label, "save_s": [r["save_s"] for r in recs], "blocking_s": [r["blocking_s"] for r in recs],
                       "median_save_s": _median([r["save_s"] for r in recs]), "median_blocking_s": _median([r["blocking_s"] for r in recs])}
    last = [r for r in records if r["mode"] == "async"][-1]["ranks"]
    ratios = {"blocking_async_over_sync": modes["async"]["median_blocking_s"] / modes["split"]["median_blocking_s"],
              "total_async_over_sync": modes["async"]["median_save_s"] / modes["split"]["median_save_s"]}
    return {"modes": modes, "ratios": ratios, "snapshot": last}


def _report_async(result: dict) -> str:
    m, r = result["modes"], result["ratios"]
    lines = [
        f"bigtrain bench checkpoint --async: GPT-2-like, {result['params'] / 1e6:.1f}M parameters ({result['layers']} layers, hidden "
        f"{result['hidden']}, vocab {result['vocab']}), ZeRO-2 fp32, {result['nproc']} ranks on {result['device']}; "
        f"{result['checkpoint_bytes'] / 1e9:.2f} GB per checkpoint, written to {result['dir']}",
        f"{result['rounds']} round(s) of synchronous and background saves (after {result['warmup']} untimed save(s)); medians:",
        f"  {'mode':<30} {'stood still s':>14} {'total s':>8}   per-round stood still s",
    ]
    for name, _, _, label in ASYNC_MODES:
        x = m[name]
        lines.append(f"  {label:<30} {x['median_blocking_s']:>14.2f} {x['median_save_s']:>8.2f}   " + ", ".join(f"{v:.2f}" for v in x["blocking_s"]))
    lines += [
        f"  background / synchronous: training stands still {r['blocking_async_over_sync']:.3f}x as long; "
        f"the whole save takes {r['total_async_over_sync']:.2f}x",
        "  snapshot host memory: " + "; ".join(f"rank {i} {s['buffer_bytes'] / 1e9:.2f} GB of buffers, peak RSS {s['peak_rss_bytes'] / 1e9:.2f} GB"
                                               for i, s in enumerate(result["snapshot"])),
    ]
    return "\n".join(lines)


def _report(result: dict) -> str:
    m, r = result["modes"], result["ratios"]
    lines = [
        f"bigtrain bench checkpoint: GPT-2-like, {result['params'] / 1e6:.1f}M parameters ({result['layers']} layers, hidden {result['hidden']}, "
        f"vocab {result['vocab']}), ZeRO-2 fp32, {result['nproc']} ranks on {result['device']}; {result['checkpoint_bytes'] / 1e9:.2f} GB "
        f"in {result['checkpoint_files']} files per checkpoint, written to {result['dir']}",
        f"{result['rounds']} round(s) of split, noverify, rank0 (after {result['warmup']} untimed save(s)); medians:",
        f"  {'mode':<30} {'save s':>8} {'seal s':>8} {'write s':>8}   per-round save s",
    ]
    for name, _, _, label in MODES:
        x = m[name]
        rounds = ", ".join(f"{v:.2f}" for v in x["save_s"])
        lines.append(f"  {label:<30} {x['median_save_s']:>8.2f} {x['median_seal_s']:>8.2f} {x['median_write_s']:>8.2f}   {rounds}")
    lines += [
        f"  old / per-rank hashing: {r['save_old_over_split']:.2f}x per save, {r['seal_old_over_split']:.2f}x for sealing "
        "(fsync + SHA-256 + manifest + rename)",
        f"  per-rank hashing / no hashing: {r['save_split_over_noverify']:.2f}x per save, {r['seal_split_over_noverify']:.2f}x for sealing",
        "  shares of the last split save: " + "; ".join(
            f"rank {i} {s['share_files']} files {s['share_bytes'] / 1e9:.2f} GB in {s['share_s']:.2f} s" for i, s in enumerate(result["split_shares"])),
    ]
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    """Start the ranks, collect rank 0's records, print the medians and ratios, write --out."""
    _check_args(ns)
    work = Path(tempfile.mkdtemp(prefix="bigtrain-bench-ckpt-", dir=ns.dir))
    try:
        # Parameters of the model (GPT-2: embeddings + 12 h^2 per layer), 16 bytes each, one checkpoint at a time.
        params = ns.vocab * ns.hidden + 1024 * ns.hidden + ns.layers * 12 * ns.hidden * ns.hidden
        need, free = 16 * params * 1.2, shutil.disk_usage(work).free
        if free < need:
            raise UserError(f"--dir: {work.parent} has {free / 1e9:.1f} GB free, a checkpoint of this model needs about {need / 1e9:.1f} GB")
        print(f"# {ns.nproc} ranks, {ns.layers} layers, hidden {ns.hidden}, vocab {ns.vocab}: building the model and saving "
              f"{ns.warmup} + {2 if ns.background else 3} x {ns.rounds} checkpoints into {work} ...", file=sys.stderr, flush=True)
        out = work / "result.json"
        _wait(_start_ranks(ns, work / "checkpoints", out, work), work)
        raw = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "layers": ns.layers, "hidden": ns.hidden, "vocab": ns.vocab, "nproc": ns.nproc, "rounds": ns.rounds, "warmup": ns.warmup,
        "params": raw["params"], "device": raw["device"], "dir": str(work.parent), "checkpoint_bytes": sum(raw["files"].values()),
        "checkpoint_files": len(raw["files"]), "files": raw["files"],
        **(summarize_async if ns.background else summarize)(raw["records"]), "records": raw["records"],
    }
    print((_report_async if ns.background else _report)(result))
    out = ns.out or f"bench/results/checkpoint_{'async' if ns.background else 'save'}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from bigtrain.process import leave

    leave(worker_main(sys.argv[1:]))
