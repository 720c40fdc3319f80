"""The `bigtrain` command line. Each verb parses its arguments, then calls one function.

Bad input anywhere below ends as one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from bigtrain.config import split_config_args
from bigtrain.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line (and exit 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _config_help() -> str:
    from bigtrain.config import config_keys_doc

    lines = ["config keys (YAML or key=value; defaults shown):"]
    lines += [f"  {k} = {v!r}" for k, v in config_keys_doc()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bigtrain", description="Train transformer language models on DeepSpeed.")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    _add_train_verb(sub)
    _add_model_verbs(sub)
    _add_data_verbs(sub)
    _add_planning_verbs(sub)
    _add_bench_verbs(sub)
    return p


def _add_train_verb(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", help="train a model (no arguments: the default small GPT on the Python standard library)",
        description="Train a model. With no arguments, runs the default job: a ~3.5M-parameter GPT pretrained on the "
        "Python standard library's source files with a BPE tokenizer trained on them.",
        epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="a YAML config and/or dotted overrides")
    t.add_argument("--nproc", type=int, help="start N local ranks on this machine (SIGUSR1/SIGTERM reach every rank: save and stop)")
    t.add_argument("--stop-grace", type=float, default=None, metavar="SECONDS",
                   help="with --nproc: ranks still running this long after a forwarded SIGUSR1/SIGTERM are killed "
                   "(default 300: time to finish a step and save)")
    t.add_argument("--resume", metavar="auto|PATH", help="continue from the latest checkpoint (auto) or from PATH")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    t.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint even if its pickles need arbitrary classes (they can run code): only for checkpoints you trust")


def _add_downstream_args(p: argparse.ArgumentParser, what: str) -> None:
    """The lm-evaluation-harness options of `eval` and `average` (bigtrain/downstream.py)."""
    p.add_argument("--tasks", metavar="NAMES", help=f"{what}: comma-separated task names")
    p.add_argument("--include-path", metavar="DIR", help="a directory of task YAML files (their relative data_files are read from it)")
    p.add_argument("--limit", type=int, metavar="N", help="documents per task")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="requests per forward pass (default 8)")


def _downstream_request(ns: argparse.Namespace):
    from bigtrain.downstream import Request

    for flag, value, lo in (("--limit", ns.limit, 1), ("--num-fewshot", ns.num_fewshot, 0), ("--batch-size", ns.batch_size, 1)):
        if value is not None and value < lo:
            raise UserError(f"{flag} must be >= {lo}, got {value}")
    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks: expected comma-separated task names, got {ns.tasks!r}")
    return Request(tasks, ns.include_path, ns.limit, ns.num_fewshot, ns.batch_size)


def _add_model_verbs(sub: argparse._SubParsersAction) -> None:
    """The verbs that use a trained model: export, eval, predict, generate."""
    e = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    e.add_argument("src", metavar="RUN_DIR_OR_CHECKPOINT")
    e.add_argument("out", metavar="OUT_DIR")
    e.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    e.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest weights file, e.g. 500MB or 5GB (default 5GB)")
    e.add_argument("--trust-checkpoint", action="store_true", help="read a checkpoint whose pickles need arbitrary classes (they can run code)")
    e.add_argument("--adapter-only", action="store_true", help="a LoRA run: write peft's adapter directory instead of merged full weights")

    ev = sub.add_parser("eval", help="evaluate an exported model (any task) on a file: metrics printed and written as JSON",
                        description="Evaluate MODEL_DIR on data.valid_files (else data.train_files). The task and labels come from the model.")
    ev.add_argument("model_dir", metavar="MODEL_DIR")
    ev.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="a YAML config and/or dotted overrides (data.valid_files=FILE, ...)")
    ev.add_argument("--output", metavar="FILE", help="where to write the metrics JSON (default MODEL_DIR/eval_results.json)")
    _add_downstream_args(ev, "evaluate MODEL_DIR (an exported model, a checkpoint or a run) on lm-evaluation-harness tasks instead")
    ev.add_argument("--json", metavar="FILE", help="with --tasks: write the harness's results dictionary as JSON")

    av = sub.add_parser("average", help="the mean of a run's last N checkpoints' weights, written as a Hugging Face model directory")
    av.add_argument("run_dir", metavar="RUN_DIR")
    av.add_argument("--last", type=int, metavar="N", help="average the last N committed checkpoints")
    av.add_argument("--steps", metavar="S1,S2,...", help="average these checkpoints' steps instead")
    av.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="where to write the averaged model")
    av.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    av.add_argument("--trust-checkpoint", action="store_true", help="read checkpoints whose pickles need arbitrary classes (they can run code)")
    _add_downstream_args(av, "then evaluate the average on lm-evaluation-harness tasks")

    pr = sub.add_parser("predict", help="label a file with a classify or token_classify model")
    pr.add_argument("model_dir", metavar="MODEL_DIR")
    pr.add_argument("--input", required=True, metavar="FILE", help="tsv/csv/jsonl texts (classify) or CoNLL tokens (token_classify); labels, if present, are ignored")
    pr.add_argument("--output", metavar="FILE", help="default: standard output")
    pr.add_argument("--format", choices=("tsv", "csv", "jsonl", "conll"), help="input format (default: from the extension)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--on-bad-rows", choices=("error", "skip"), default="error")

    g = sub.add_parser("generate", help="sample text from an exported model")
    g.add_argument("model_dir", metavar="MODEL_DIR")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)


    r = sub.add_parser("report", help="one self-contained HTML page about a run (curves, throughput, memory, skipped steps, checkpoints) and a summary")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("-o", "--output", default=None, metavar="FILE.html", help="where to write the page (default: RUN_DIR/report.html)")

    c = sub.add_parser("chat", help="talk to a chat-tuned model (task=sft) on the terminal; reads stdin line by line when piped")
    c.add_argument("model_dir", metavar="MODEL_DIR")
    c.add_argument("--system", default=None, metavar="TEXT", help="a system prompt for the conversation")
    c.add_argument("--max-new-tokens", type=int, default=256, metavar="N")


def _add_data_verbs(sub: argparse._SubParsersAction) -> None:
    """`data prepare` and `tokenizer train`."""
    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_verb", metavar="VERB", parser_class=_Parser)
    dp = dsub.add_parser("prepare", help="tokenize every source into token shards with datatrove (locally or as a Slurm job array)",
                         description="Tokenize data.sources (or data.train_files) into memory-mapped token shards; prints the directory. "
                                     "A rerun after an interruption runs only the unfinished tasks. See docs/data.md.")
    dp.add_argument("args", nargs="*", metavar="CONFIG [key=value]")
    dp.add_argument("--out", metavar="DIR", help="where to write (default: the cache, where training finds it)")
    dp.add_argument("--workers", type=int, default=None, help="processes on this machine (default: data.num_proc, else all cores up to 8)")
    dp.add_argument("--tasks", type=int, default=None, help="tasks per source (default: --workers; at most one per input file)")
    dp.add_argument("--slurm", action="store_true", help="run the tasks as a Slurm job array instead of here")
    dp.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    dp.add_argument("--nodes", type=int, default=None, help="Slurm: at most this many array tasks at once")
    dp.add_argument("--cpus-per-task", type=int, default=1, help="Slurm: CPUs per task (tokenizer threads)")
    dp.add_argument("--time", default="04:00:00", help="Slurm: time limit per task")
    dp.add_argument("--wait", action="store_true", help="Slurm: wait for the jobs, then check them and write the manifest")
    pl = dsub.add_parser("plan", help="per source: blocks, tokens, weight, and its samples and share in the first N steps (no training)")
    pl.add_argument("args", nargs="*", metavar="CONFIG [key=value]")
    pl.add_argument("--steps", type=int, required=True, help="training steps to plan")
    pl.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (only for the global batch arithmetic)")
    pl.add_argument("--json", action="store_true", help='print {"sources": {NAME: {blocks, tokens, weight, samples, share}}}')

    k = sub.add_parser("tokenizer", help="tokenizer tools")
    ksub = k.add_subparsers(dest="tok_verb", metavar="VERB", parser_class=_Parser)
    kt = ksub.add_parser("train", help="train a byte-level BPE tokenizer")
    kt.add_argument("files", nargs="+", metavar="FILES")
    kt.add_argument("--vocab-size", type=int, required=True)
    kt.add_argument("--out", required=True, metavar="DIR")


def _add_planning_verbs(sub: argparse._SubParsersAction) -> None:
    """`estimate` (memory a job needs) and `slurm` (job scripts for a cluster)."""
    from bigtrain import estimate as estimate_mod

    est = sub.add_parser(
        "estimate", help="memory per GPU (params, grads, optimizer, activations) and per node for a preset, ZeRO stage and offload",
        description="Estimate the memory a preset needs per GPU and per node (see docs/zero.md).",
    )
    estimate_mod.add_arguments(est)
    est.set_defaults(estimate_run=estimate_mod.run)

    from bigtrain import slurm as slurm_mod

    sl = sub.add_parser("slurm", help="render or submit a Slurm job script (preemption-safe; resumes by itself)")
    slurm_mod.add_arguments(sl.add_subparsers(dest="slurm_verb", metavar="VERB", parser_class=_Parser))


def _add_bench_verbs(sub: argparse._SubParsersAction) -> None:
    """`bench attention|checkpoint|data|train`: each benchmark module brings its own options and run."""
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_verb", metavar="VERB", parser_class=_Parser)
    import importlib

    benches = (
        ("attention", "fused attention kernel vs torch SDPA: TFLOP/s table, JSON and PNG"),
        ("checkpoint", "seconds per checkpoint save: per-rank hashing vs rank 0 hashing all vs no hashing, 2 ranks, ZeRO-2"),
        ("data", "bigtrain data prepare vs transformers' run_clm recipe (tokens/s); --scale: peak RSS, bytes/token, workers, batch reads"),
        ("soak", "leak check: RSS, file descriptors, threads and /dev/shm over a long multi-rank run with frequent saves"),
        ("train", "training tokens/s, step-time split, memory and MFU; --compare hf runs transformers' Trainer alongside"),
    )
    for name, text in benches:
        try:
            module = importlib.import_module(f"bigtrain.bench.{name}")
        except ImportError:  # e.g. the attention benchmark without triton
            continue
        bp = bsub.add_parser(name, help=text, description=text)
        module.add_arguments(bp)
        bp.set_defaults(bench_run=module.run)


def cmd_train(ns: argparse.Namespace) -> int:
    from bigtrain.config import check_batch, load_config, where_of
    from bigtrain.launch import relaunch, under_launcher

    config, overrides = split_config_args(ns.args)
    cfg = load_config(config, overrides)
    if ns.resume is not None and ns.resume != "auto" and not Path(ns.resume).exists():
        raise UserError(f"--resume: {ns.resume} does not exist (use --resume auto or a checkpoint path)")
    if ns.nproc is not None and not under_launcher():
        if ns.nproc < 1:
            raise UserError(f"--nproc must be >= 1, got {ns.nproc}")
        if ns.stop_grace is not None and not ns.stop_grace > 0:
            raise UserError(f"--stop-grace must be > 0 seconds, got {ns.stop_grace}")
        # Check everything that can be checked before starting ranks, and tokenize once here.
        from bigtrain.engine import build_ds_config
        from bigtrain.process import setup_accelerator
        from bigtrain.parallel import check_model_before_launch
        from bigtrain.tasks import build_task
        from bigtrain.trainer import check_output_dir

        on_cpu = setup_accelerator()
        check_batch(cfg, ns.nproc, lambda key: where_of(cfg, key))
        check_model_before_launch(cfg, lambda key: where_of(cfg, key), ns.nproc)
        check_output_dir(cfg, ns.overwrite, ns.resume)
        build_ds_config(cfg, ns.nproc, on_cpu)
        build_task(cfg).prepare(0, False, lambda *a: print(*a, file=sys.stderr, flush=True))
        argv = ["train", *ns.args]
        if ns.resume:
            argv += ["--resume", ns.resume]
        if ns.overwrite:
            argv.append("--overwrite")
        if ns.trust_checkpoint:
            argv.append("--trust-checkpoint")
        return relaunch(ns.nproc, argv, stop_grace=ns.stop_grace)
    from bigtrain.process import leave
    from bigtrain.trainer import run_training

    leave(run_training(cfg, ns.resume, ns.overwrite, ns.trust_checkpoint))


def parse_size(text: str, what: str) -> int:
    """'500MB', '5GB', '1.5GiB' or a plain byte count -> bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{what} {text!r}: expected a size such as 500MB or 5GB")
    base = 1024 if (m.group(3) or "").lower() == "ib" else 1000
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * base**power)


def cmd_eval(ns: argparse.Namespace) -> int:
    from bigtrain.config import load_config
    from bigtrain.process import setup_accelerator

    if ns.tasks is not None:
        if ns.args:
            raise UserError(f"bigtrain eval --tasks takes no config or overrides, got {' '.join(ns.args)}")
        from bigtrain.downstream import evaluate_dir

        evaluate_dir(ns.model_dir, _downstream_request(ns), ns.json, log=lambda *a: print(*a, file=sys.stderr, flush=True))
        return 0
    if ns.json is not None:
        raise UserError("bigtrain eval: --json goes with --tasks (use --output for a task's own evaluation)")

    config, overrides = split_config_args(ns.args)
    cfg = load_config(config, overrides)
    setup_accelerator()
    from bigtrain.inference import evaluate_model

    evaluate_model(ns.model_dir, cfg, ns.output, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    return 0


def cmd_average(ns: argparse.Namespace) -> int:
    from bigtrain.average import average
    from bigtrain.process import setup_accelerator

    req = _downstream_request(ns) if ns.tasks is not None else None
    setup_accelerator()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    out = average(ns.run_dir, ns.output, ns.last, ns.steps, ns.overwrite, ns.trust_checkpoint, log=log)
    print(out)
    if req is not None:
        from bigtrain.downstream import evaluate_dir

        evaluate_dir(str(out), req, str(Path(out) / "downstream.json"), log=log)
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    if ns.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {ns.batch_size}")
    from bigtrain.process import setup_accelerator

    setup_accelerator()
    from bigtrain.inference import predict_file

    return predict_file(ns.model_dir, ns.input, ns.output, ns.format, ns.batch_size, ns.on_bad_rows, log=lambda *a: print(*a, file=sys.stderr, flush=True))


def cmd_export(ns: argparse.Namespace) -> int:
    from bigtrain.process import setup_accelerator

    setup_accelerator()
    from bigtrain.export import export

    out = export(ns.src, ns.out, overwrite=ns.overwrite, max_shard_bytes=parse_size(ns.max_shard_size, "--max-shard-size"), trust=ns.trust_checkpoint,
                 adapter_only=ns.adapter_only)
    print(out)
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from bigtrain.process import setup_accelerator
    from bigtrain.generate import generate

    setup_accelerator()
    print(generate(ns.model_dir, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_k, ns.seed))
    return 0


def cmd_data_prepare(ns: argparse.Namespace) -> int:
    from bigtrain.config import load_config

    config, overrides = split_config_args(ns.args)
    cfg = load_config(config, overrides)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if cfg.task in ("classify", "token_classify"):
        raise UserError(f"bigtrain data prepare: task={cfg.task} reads its labeled files at the start of training (they are small); nothing to prepare")
    for flag, value in (("--workers", ns.workers), ("--tasks", ns.tasks), ("--nodes", ns.nodes), ("--cpus-per-task", ns.cpus_per_task)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    from bigtrain.prepare import SlurmOptions, prepare_dataset

    slurm = SlurmOptions(ns.partition, ns.nodes, ns.cpus_per_task, ns.time, wait=ns.wait) if ns.slurm else None
    out = prepare_dataset(cfg, Path(ns.out) if ns.out else None, ns.workers or cfg.data.num_proc, ns.tasks, slurm, log)
    if out is not None:
        print(out)
    return 0


def cmd_data_plan(ns: argparse.Namespace) -> int:
    from bigtrain.config import check_batch, load_config
    from bigtrain.corpus import ShardData, ensure_prepared

    if ns.steps < 1 or ns.world_size < 1:
        raise UserError(f"--steps and --world-size must be >= 1, got {ns.steps} and {ns.world_size}")
    config, overrides = split_config_args(ns.args)
    cfg = load_config(config, overrides)
    if cfg.task not in ("clm", "mlm") or cfg.data.mode != "packed":
        raise UserError("bigtrain data plan: mixtures are for packed clm and mlm data (task=clm|mlm, data.mode=packed)")
    global_batch = check_batch(cfg, ns.world_size)
    data = ShardData(cfg, ensure_prepared(cfg, log=lambda *a: print(*a, file=sys.stderr, flush=True)))
    plan = data.schedule(global_batch, cfg.train.micro_batch_size, ns.world_size, 0, cfg.train.seed).plan(ns.steps)
    for name, stream in zip(data.names, data.train.streams):
        plan[name]["tokens"] = stream.n_tokens
    if ns.json:
        print(json.dumps({"sources": plan}, indent=1))
        return 0
    print(f"{'source':<20} {'blocks':>12} {'tokens':>15} {'weight':>8} {'samples':>12} {'share':>8}   ({ns.steps} steps x {global_batch} samples)")
    for name, p in plan.items():
        print(f"{name:<20} {p['blocks']:>12,} {p['tokens']:>15,} {p['weight']:>8.4f} {p['samples']:>12,} {p['share']:>8.4f}")
    return 0


def cmd_tokenizer_train(ns: argparse.Namespace) -> int:
    from bigtrain.data import check_sources, iter_document_texts, resolve_sources
    from bigtrain.process import setup_accelerator
    from bigtrain.tokenizer import train_bpe

    setup_accelerator()
    if not 300 <= ns.vocab_size <= (1 << 22):
        raise UserError(f"--vocab-size must be between 300 and {1 << 22}, got {ns.vocab_size}")
    out = Path(ns.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out: {out} exists and is not empty")
    sources = resolve_sources(ns.files, "FILES")
    check_sources(sources, "FILES", "error", "text")
    train_bpe(iter_document_texts(sources, "text", "error"), ns.vocab_size, out)
    print(out)
    return 0


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N unless told not to; LOCAL_RANK has it too."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            out.append(a)
    return out


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv; key=value overrides may follow the options."""
    # Overrides may come after options (`train CONFIG --nproc 2 key=value`): argparse leaves
    # those unparsed, so collect them here.
    ns, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(ns, "args")
    stray = [a for a in extra if a.startswith("-") or not takes_overrides]
    if stray:
        raise UserError(f"bigtrain: unrecognized arguments: {' '.join(stray)} (see 'bigtrain --help')")
    if takes_overrides:
        ns.args = list(ns.args) + extra
    return ns


def _dispatch(ns: argparse.Namespace) -> int:
    """Run the verb `ns` names; returns its exit code."""
    if ns.verb == "train":
        return cmd_train(ns)
    if ns.verb == "export":
        return cmd_export(ns)
    if ns.verb == "generate":
        return cmd_generate(ns)
    if ns.verb == "eval":
        return cmd_eval(ns)
    if ns.verb == "average":
        return cmd_average(ns)
    if ns.verb == "chat":
        from bigtrain.chat import chat_loop
        from bigtrain.process import setup_accelerator

        setup_accelerator()
        return chat_loop(ns.model_dir, ns.system, ns.max_new_tokens, sys.stdin, sys.stdout)
    if ns.verb == "predict":
        return cmd_predict(ns)
    if ns.verb == "report":
        from bigtrain.report import write_report

        write_report(ns.run_dir, ns.output)
        return 0
    if ns.verb == "data":
        if ns.data_verb not in ("prepare", "plan"):
            raise UserError("bigtrain data: expected a verb: prepare or plan (see 'bigtrain data --help')")
        return cmd_data_prepare(ns) if ns.data_verb == "prepare" else cmd_data_plan(ns)
    if ns.verb == "tokenizer":
        if ns.tok_verb != "train":
            raise UserError("bigtrain tokenizer: expected a verb: train (see 'bigtrain tokenizer --help')")
        return cmd_tokenizer_train(ns)
    if ns.verb == "slurm":
        from bigtrain import slurm as slurm_mod

        return slurm_mod.run(ns)
    if ns.verb == "estimate":
        return int(ns.estimate_run(ns) or 0)
    if ns.verb == "bench":
        run = getattr(ns, "bench_run", None)
        if run is None:
            raise UserError("bigtrain bench: expected a verb (see 'bigtrain bench --help')")
        return int(run(ns) or 0)
    raise UserError(f"unknown verb {ns.verb}")


def _print_user_error(e: UserError) -> None:
    """The one `error: ...` line on stderr, from rank 0 only."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        # Exactly one line, whatever the message quotes (a file name with "\r" in it, U+2028...),
        # and printable on any stream (file names that are not UTF-8 carry surrogates).
        message = " ".join(str(e).splitlines()).strip() or type(e).__name__
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    argv = _drop_local_rank(list(sys.argv[1:] if argv is None else argv))
    try:
        parser = build_parser()
        ns = _parse(parser, argv)
        if ns.verb is None:
            parser.print_help()
            return 2
        return _dispatch(ns)
    except UserError as e:
        _print_user_error(e)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
