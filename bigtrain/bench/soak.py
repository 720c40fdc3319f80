"""`bigtrain bench soak`: a long run with frequent checkpoints, watched for leaks.

Method. The parent resolves one config (a tiny GPT on ~400 KB of standard-library source unless a
CONFIG.yaml is given; key=value overrides win over everything but --steps), prepares its data once,
and writes it with the run's soak settings to WORK/config.yaml: train.max_steps=--steps, a save
every steps/50 (train.keep_last=2, so every save after the second also prunes one), an evaluation
every steps/20, a log record every steps/100. It then starts --nproc real rank processes directly,
as `bigtrain train --nproc` does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; gloo on CPU),
each `python -m bigtrain.bench.soak --worker WORK`. Each rank builds bigtrain's Trainer with a
`Sampler` callback and runs it as `bigtrain train` would (train, export, close). The sampler
records, at the start and every --every steps (and at the last step), into
WORK/soak_rank{R}.jsonl: the step, the time, its own RSS, open file descriptors and threads
(psutil), and the run's /dev/shm files: DeepSpeed's CPU all-reduce buffers of this job (named
deepspeed_allreduce_buffer_*_{MASTER_ADDR}_{MASTER_PORT}_{LOCAL_RANK}) plus any other /dev/shm
entry that was not there when the parent started (other jobs' DeepSpeed buffers, which name
another port, are not counted; on a busy machine other jobs' files can be). A sample is taken in
the step's callback, before that step's evaluation or checkpoint.

The first 10% of the steps are warm-up (allocator pools, the first checkpoint, evaluation and
log record, DeepSpeed's buffers). Growth is measured from the first sample at or after the
warm-up's end to the end: the last sample for RSS; for descriptors, threads and /dev/shm files the
least count over the last 10% of the steps, since a background thread (the data prefetcher, the
run lock's refresher) can hold a descriptor at the moment of one sample while a leaked one shows
in every sample (the peaks are reported too). Targets (reported, not asserted): RSS growth under 2% after
warm-up, no growth in descriptors, threads or /dev/shm files, and nothing of the run left in
/dev/shm once every rank has exited (checked by the parent). Wall time covers start-up, training,
the export and teardown; steps/s is the training loop's own rate, from the samples' times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional

from bigtrain.errors import UserError
from bigtrain.api import Callback

SHM = Path("/dev/shm")
DS_BUFFER = "deepspeed_allreduce_buffer_"
RSS_TARGET_PCT = 2.0
WARMUP_FRACTION = 0.1
TINY = [
    "data.vocab_size=512", "data.seq_len=64", "model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2",
    "train.micro_batch_size=4", "train.progress=false", "train.sample_tokens=0",
]
CORPUS_PACKAGES = ("json", "email", "http", "logging")  # ~400 KB of Python source every Python has
METRICS = ("rss", "fds", "threads", "shm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bigtrain bench soak`."""
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]",
                   help="a training config and/or overrides (default: a tiny GPT on a few standard-library packages)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to train")
    p.add_argument("--every", type=int, help="sample every K steps (default max(1, steps/100))")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) to start (default 2)")
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="plot RSS and file descriptors over the steps, per rank")
    p.add_argument("--work-dir", metavar="DIR", help="keep the run and its samples here (default: a temporary directory, removed)")


# --------------------------------------------------------------------------- in each rank


def run_shm_files(before: set, addr: str, port: str) -> list[str]:
    """The /dev/shm entries of the job on addr:port: its DeepSpeed buffers and anything new since `before`."""
    ours = f"_{addr}_{port}_"
    try:
        names = os.listdir(SHM)
    except OSError:
        return []
    return sorted(n for n in names if (ours in n if n.startswith(DS_BUFFER) else n not in before))


class Sampler(Callback):
    """Appends {step, t, rss, fds, threads, shm, shm_files} to a JSON-lines file at the start,
    every `every` steps and at `last`. Its file is opened here, before training: the same
    descriptor is in every sample."""

    def __init__(self, path: Path, every: int, last: int, shm_before: set) -> None:
        import psutil

        self.proc, self.every, self.last, self.shm_before = psutil.Process(), every, last, shm_before
        self.addr, self.port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        self.file = open(path, "w")

    def sample(self, step: int) -> None:
        files = run_shm_files(self.shm_before, self.addr, self.port)
        record = {"step": step, "t": time.time(), "rss": self.proc.memory_info().rss, "fds": self.proc.num_fds(),
                  "threads": self.proc.num_threads(), "shm": len(files), "shm_files": files}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def on_train_start(self, state) -> None:  # noqa: ARG002
        self.sample(0)

    def on_step_end(self, state, result) -> None:  # noqa: ARG002
        if state.step % self.every == 0 or state.step == self.last:
            self.sample(state.step)

    def close(self) -> None:
        self.file.close()


def worker_main(work: Path) -> int:
    """One rank: train WORK/config.yaml as `bigtrain train` does, with the sampler."""
    from bigtrain.config import load_config

    try:
        spec = json.loads((work / "spec.json").read_text())
        cfg = load_config(str(work / "config.yaml"), [])
        from bigtrain.trainer import Trainer, run_trainer

        sampler = Sampler(work / f"soak_rank{os.environ.get('RANK', '0')}.jsonl", spec["every"], cfg.train.max_steps, set(spec["shm_before"]))
        try:
            return run_trainer(Trainer(cfg, overwrite=True, callbacks=[sampler]))
        finally:
            sampler.close()
    except UserError as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr, flush=True)
        return UserError.exit_code


# --------------------------------------------------------------------------- configuration


def _check_args(ns: argparse.Namespace) -> None:
    for flag, value in (("--steps", ns.steps), ("--every", ns.every), ("--nproc", ns.nproc)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if ns.every is not None and ns.every > ns.steps:
        raise UserError(f"--every {ns.every} is more than --steps {ns.steps}: there would be no samples between start and end")
    if ns.work_dir is not None and Path(ns.work_dir).exists() and not Path(ns.work_dir).is_dir():
        raise UserError(f"--work-dir: {ns.work_dir} is not a directory")
    for flag, path in (("--json", ns.json), ("--plot", ns.plot)):
        if path is not None and Path(path).is_dir():
            raise UserError(f"{flag}: {path} is a directory")
    if ns.plot is not None and Path(ns.plot).suffix.lower() != ".png":
        raise UserError(f"--plot: {ns.plot}: expected a .png file name")


def schedule(steps: int) -> dict:
    """The soak's saves, evaluations and log records for `steps` steps."""
    return {"save_every": max(1, steps // 50), "keep_last": 2, "eval_every": max(1, steps // 20), "log_every": max(1, steps // 100)}


def soak_config(args: list[str], steps: int, output_dir: Path):
    """The run's Config: defaults (the tiny model and corpus without a CONFIG.yaml), the soak's
    schedule, then the user's overrides; train.max_steps is --steps."""
    from bigtrain.config import load_config, split_config_args

    config, overrides = split_config_args(args)
    if any(o.split("=", 1)[0].strip() == "train.max_steps" for o in overrides):
        raise UserError("bench soak: set the number of steps with --steps, not train.max_steps")
    base = []
    if config is None:
        stdlib = Path(sysconfig.get_path("stdlib"))
        base = [*TINY, "data.train_files=[" + ", ".join(str(stdlib / p) for p in CORPUS_PACKAGES) + "]"]
    plan = [f"train.{k}={v}" for k, v in schedule(steps).items()] + ["train.progress=false", "train.sample_tokens=0", f"output_dir={output_dir}"]
    return load_config(config, [*base, *plan, *overrides, f"train.max_steps={steps}"])


def _prepare(cfg, nproc: int) -> bool:
    """What `bigtrain train --nproc` checks before starting ranks, and the data tokenized once here."""
    from bigtrain.config import check_batch, where_of
    from bigtrain.engine import build_ds_config
    from bigtrain.process import setup_accelerator
    from bigtrain.tasks import build_task

    on_cpu = setup_accelerator()
    check_batch(cfg, nproc, lambda key: where_of(cfg, key))
    build_ds_config(cfg, nproc, on_cpu)
    build_task(cfg).prepare(0, False, lambda *a: print(*a, file=sys.stderr, flush=True))
    return on_cpu


# --------------------------------------------------------------------------- the ranks


def _start_ranks(nproc: int, work: Path, port: int) -> list[subprocess.Popen]:
    from bigtrain.launch import rank_env

    procs = []
    for rank in range(nproc):
        env = rank_env(dict(os.environ, PYTHONUNBUFFERED="1"), rank, nproc, port)
        with open(work / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "bigtrain.bench.soak", "--worker", str(work)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    return procs


def _last_step(path: Path) -> Optional[int]:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else None
    except (OSError, ValueError, KeyError):
        return None  # not written yet, or a line half written


def _wait(procs: list[subprocess.Popen], work: Path, steps: int) -> None:
    """Wait for every rank, printing rank 0's progress; a failed rank ends the run (the others get 10 s)."""
    shown, failed_at = None, None
    while True:
        codes = [p.poll() for p in procs]
        step = _last_step(work / "soak_rank0.jsonl")
        if step is not None and step != shown and (shown is None or step - shown >= max(1, steps // 10) or step == steps):
            print(f"soak: step {step}/{steps}", file=sys.stderr, flush=True)
            shown = step
        if all(c is not None for c in codes):
            break
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 10:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.5)
    bad = [(r, c) for r, c in enumerate(codes) if c != 0]
    if bad:
        r, c = bad[0]
        tail = "\n".join((work / f"rank{r}.log").read_text(errors="replace").strip().splitlines()[-15:])
        raise UserError(f"bench soak: the training run failed: rank {r} exited with {c}:\n{tail}")


def _release_buffers(port: int) -> None:
    """After a failed run: killed ranks leave DeepSpeed's buffers (RAM) behind."""
    for p in SHM.glob(f"{DS_BUFFER}*_127.0.0.1_{port}_*"):
        p.unlink(missing_ok=True)


def soak(cfg, nproc: int, every: int, work: Path) -> dict:
    """Run the ranks; returns {wall_s, samples: [per rank], shm_left}."""
    from bigtrain.config import dump_yaml
    from bigtrain.process import free_port

    before = set(os.listdir(SHM)) if SHM.is_dir() else set()
    (work / "config.yaml").write_text(dump_yaml(cfg))
    (work / "spec.json").write_text(json.dumps({"every": every, "shm_before": sorted(before)}))
    port = free_port()
    t0 = time.perf_counter()
    try:
        _wait(_start_ranks(nproc, work, port), work, cfg.train.max_steps)
    except BaseException:
        _release_buffers(port)
        raise
    wall = time.perf_counter() - t0
    samples = []
    for rank in range(nproc):
        path = work / f"soak_rank{rank}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if not rows:
            raise UserError(f"bench soak: rank {rank} wrote no samples ({path})")
        samples.append(rows)
    return {"wall_s": wall, "samples": samples, "shm_left": run_shm_files(before, "127.0.0.1", str(port))}


# --------------------------------------------------------------------------- the figures


def _slope(rows: list[dict], key: str) -> float:
    """Least-squares slope of `key` per step over `rows` (0 with fewer than two steps)."""
    xs, ys = [r["step"] for r in rows], [r[key] for r in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def _brief(s: dict) -> dict:
    return {k: s[k] for k in ("step", "rss", "fds", "threads", "shm", "shm_files")}


def summarize_rank(rank: int, rows: list[dict], warm_step: int) -> dict:
    """First, warm-up-end and last samples of one rank, the growth between the last two, and the verdicts."""
    first, last = rows[0], rows[-1]
    warm = next(r for r in rows if r["step"] >= warm_step)
    after = [r for r in rows if r["step"] >= warm["step"]]
    # Counts at the end: their least over the last tenth of the steps. A descriptor or thread a
    # background thread holds for a moment is not growth; a leaked one is there in every sample.
    tail = [r for r in after if r["step"] >= last["step"] - max(1, int(last["step"] * WARMUP_FRACTION))]
    growth = {
        "rss_pct": 100.0 * (last["rss"] - warm["rss"]) / warm["rss"], "rss_mb": (last["rss"] - warm["rss"]) / 1e6,
        **{k: min(r[k] for r in tail) - warm[k] for k in ("fds", "threads", "shm")},
        "rss_max_mb": (max(r["rss"] for r in after) - warm["rss"]) / 1e6,
        "rss_slope_mb_per_1000_steps": _slope(after, "rss") * 1000 / 1e6,
        "fds_peak": max(r["fds"] for r in after) - warm["fds"], "threads_peak": max(r["threads"] for r in after) - warm["threads"],
    }
    met = {"rss": growth["rss_pct"] < RSS_TARGET_PCT, "fds": growth["fds"] <= 0, "threads": growth["threads"] <= 0, "shm": growth["shm"] <= 0}
    return {"rank": rank, "samples": len(rows), "first": _brief(first), "warm": _brief(warm), "last": _brief(last), "growth": growth, "met": met}


def summarize(raw: dict, steps: int, every: int, nproc: int, cfg) -> dict:
    warm_step = max(1, int(steps * WARMUP_FRACTION))
    ranks = [summarize_rank(r, rows, warm_step) for r, rows in enumerate(raw["samples"])]
    rows0 = raw["samples"][0]
    loop_s = rows0[-1]["t"] - rows0[0]["t"]
    met = {k: all(r["met"][k] for r in ranks) for k in ("rss", "fds", "threads", "shm")}
    met["shm_after_exit"] = not raw["shm_left"]
    return {
        "steps": steps, "nproc": nproc, "every": every, "warmup_steps": warm_step, "schedule": schedule(steps),
        "output_dir": cfg.output_dir, "train_files": list(cfg.data.train_files or []),
        "wall_s": raw["wall_s"], "loop_s": loop_s, "steps_per_s": (rows0[-1]["step"] - rows0[0]["step"]) / loop_s if loop_s > 0 else float("nan"),
        "ranks": ranks, "shm_left": raw["shm_left"],
        "targets": {"rss_growth_pct_below": RSS_TARGET_PCT, "fds_growth_max": 0, "threads_growth_max": 0, "shm_growth_max": 0,
                    "shm_after_exit": "nothing of the run", "met": met, "all_met": all(met.values())},
        "series": [[{k: s[k] for k in ("step", "t", *METRICS)} for s in rows] for rows in raw["samples"]],
    }


def report(result: dict) -> str:
    r, t = result, result["targets"]
    s = r["schedule"]
    lines = [
        f"bigtrain bench soak: {r['steps']} steps on {r['nproc']} ranks, {r['device']}; a sample every {r['every']} steps, warm-up = the first "
        f"{r['warmup_steps']} steps; save every {s['save_every']} (keep {s['keep_last']}), eval every {s['eval_every']}, log every {s['log_every']}",
        f"wall {r['wall_s']:.1f} s (start-up, training, export, teardown); training loop {r['loop_s']:.1f} s, {r['steps_per_s']:.2f} steps/s",
        f"{'rank':>4} {'sample':<7} {'step':>7} {'RSS MiB':>9} {'fds':>5} {'threads':>7} {'shm':>4}",
    ]
    for x in r["ranks"]:
        for name in ("first", "warm", "last"):
            v = x[name]
            lines.append(f"{x['rank']:>4} {name:<7} {v['step']:>7} {v['rss'] / 2**20:>9.1f} {v['fds']:>5} {v['threads']:>7} {v['shm']:>4}")
    lines.append(f"growth after warm-up (warm -> end): {'rank':>4} {'RSS %':>7} {'RSS MB':>7} {'max MB':>7} {'MB/1k steps':>11} "
                 f"{'fds':>4} {'threads':>7} {'shm':>4}   (peaks: fds, threads)")
    for x in r["ranks"]:
        g = x["growth"]
        lines.append(f"{'':35} {x['rank']:>4} {g['rss_pct']:>7.2f} {g['rss_mb']:>7.1f} {g['rss_max_mb']:>7.1f} "
                     f"{g['rss_slope_mb_per_1000_steps']:>11.2f} {g['fds']:>4} {g['threads']:>7} {g['shm']:>4}   ({g['fds_peak']:+d}, {g['threads_peak']:+d})")
    left = ", ".join(r["shm_left"]) or "nothing"
    lines.append(f"/dev/shm after exit: {left}")
    ok = lambda b: "met" if b else "NOT MET"  # noqa: E731
    m = t["met"]
    lines.append(f"targets: RSS growth < {t['rss_growth_pct_below']:g}% after warm-up: {ok(m['rss'])}; no growth in fds: {ok(m['fds'])}, "
                 f"threads: {ok(m['threads'])}, /dev/shm: {ok(m['shm'])}; nothing left in /dev/shm: {ok(m['shm_after_exit'])}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """RSS (MiB) and open descriptors over the steps, one line per rank; the warm-up shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_fd) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for rank, rows in enumerate(result["series"]):
        steps = [s["step"] for s in rows]
        ax_rss.plot(steps, [s["rss"] / 2**20 for s in rows], label=f"rank {rank}")
        ax_fd.plot(steps, [s["fds"] for s in rows], label=f"rank {rank}")
    for ax in (ax_rss, ax_fd):
        ax.axvspan(0, result["warmup_steps"], color="0.9", label="warm-up")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_fd.set_ylabel("open file descriptors")
    ax_fd.set_xlabel("step")
    ax_rss.set_title(f"bigtrain bench soak: {result['steps']} steps, {result['nproc']} ranks")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- orchestration


def run(ns: argparse.Namespace) -> int:
    """Check the arguments, run the soak, print the table, write --json and --plot."""
    _check_args(ns)
    every = ns.every or max(1, ns.steps // 100)
    work = Path(ns.work_dir) if ns.work_dir else Path(tempfile.mkdtemp(prefix="bigtrain-soak-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        cfg = soak_config(list(ns.args), ns.steps, work / "run")
        on_cpu = _prepare(cfg, ns.nproc)
        print(f"# soak: {ns.steps} steps on {ns.nproc} ranks, samples every {every} steps, in {work}", file=sys.stderr, flush=True)
        result = summarize(soak(cfg, ns.nproc, every, work), ns.steps, every, ns.nproc, cfg)
        result["device"] = "cpu (gloo)" if on_cpu else "cuda (nccl)"
    finally:
        if not ns.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(report(result))
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(result, indent=1) + "\n")
    if ns.plot:
        plot(result, Path(ns.plot))
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m bigtrain.bench.soak ...` (the options of `bigtrain bench soak`), or a rank: `--worker WORK`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"] and len(argv) == 2:
        from bigtrain.process import leave

        leave(worker_main(Path(argv[1])))
    try:
        p = _Parser(prog="bigtrain bench soak")
        add_arguments(p)
        ns, extra = p.parse_known_args(argv)
        stray = [a for a in extra if a.startswith("-")]
        if stray:
            raise UserError(f"bigtrain bench soak: unrecognized arguments: {' '.join(stray)}")
        ns.args = list(ns.args) + extra
        return run(ns)
    except UserError as e:
        print(f"error: {' '.join(str(e).splitlines()).strip()}", file=sys.stderr, flush=True)
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
