"""`bigtrain bench data`: `bigtrain data prepare` (datatrove, token shards) vs transformers' run_clm recipe, and how the preparation scales (--scale).

Comparison (the default). Both sides turn the same text files (the first N MB of the Python
standard library's .py sources, one document per file) into the same (n_blocks, seq_len) blocks of
token ids, with the same tokenizer (a byte-level BPE trained on the corpus beforehand, untimed, or
--tokenizer DIR) and the same number of worker processes P (--num-proc):

- bigtrain: `python -m bigtrain data prepare data.train_files=CORPUS data.tokenizer=TOKDIR
  --out DIR --workers P --tasks P` as a child process, into a fresh directory each round (so its
  forkserver workers are real processes and nothing is reused; data.tokenizer means no tokenizer
  is trained inside the timing). Its time is the child's whole wall time, Python start-up, the
  plan, the small-corpus precheck and the manifest included. The blocks are then read back from
  the shards with `bigtrain.shards.ShardBlocks` (not timed) for the comparison.
- classic: the recipe of transformers' examples/pytorch/language-modeling/run_clm.py with the
  `datasets` library, in this process: load the files as a text dataset (one row per document),
  `map(tokenize_function, batched=True, num_proc=P)`, then `map(group_texts, batched=True)`
  with run_clm's group_texts (concatenate Python lists, drop the remainder, cut into blocks,
  labels = a copy of input_ids). Two changes make its blocks comparable: tokenize_function
  appends EOS after each non-empty document (bigtrain packs documents that way; run_clm as
  written joins them with nothing) and passes add_special_tokens=False (as bigtrain does; no
  change for GPT-style tokenizers), and group_texts sees the whole dataset as one batch
  (batch_size=None, one process), so the remainder is dropped once at the end, as bigtrain
  does (run_clm's default batches of 1000 documents, per worker, drop one per batch).

The two sides alternate (bigtrain, classic, bigtrain, ...) for --rounds rounds; the table shows
each round and the medians. Both must yield identical blocks (same ids, same order), else the
command fails. `datasets`' caching of map results is off on the classic side
(datasets.disable_caching). Target: bigtrain at least 2x the classic tokens/s.

Scale (--scale). For each size of --sizes (e.g. 100MB,1GB), a JSON-lines corpus of that many bytes:
copies of the standard library's .py files, one record {"text": FILE} each, cycling through the
library as often as needed, written as --files files of about equal size (so --tasks can split
it: a task gets a contiguous run of whole files) and cached in --work-dir. Each corpus is
prepared by the same child command, once per worker count of --workers (--tasks equal to the
workers), with the tokenizer --tokenizer DIR or a byte-level BPE trained (untimed, cached in
--work-dir) on the first --mb MB of the standard library. Measured:

- peak RSS of any one process of the preparation: `os.wait4` on the child, whose ru_maxrss (KB on
  Linux) is the largest over the child and every descendant that was waited for. This process
  makes itself a child subreaper (Linux prctl), so the processes the child leaves to exit after it
  (datatrove's forkserver, which reaps the workers, and the like) are reparented here
  and reaped with os.wait4 too; the figure is the largest of those ru_maxrss. Cross-check: the
  child's process tree sampled with psutil every 0.2 s (the largest single process, and the
  largest sum over the tree, which counts pages shared by forked processes more than once).
- bytes on disk per token: the sizes of the token and index files the manifest lists, over the
  manifest's token count;
- tokens/s: the manifest's tokens over the child's wall time, per worker count, and the speedup of
  the most workers over the fewest. The child runs with RAYON_NUM_THREADS=1 (one tokenizer
  thread per worker process; `bigtrain data prepare` otherwise gives each worker cores // workers
  threads), so the speedup measures how the preparation scales with processes;
- for the largest size: the time of `ShardBlocks.take` on 64 random block ids of 2048 tokens (one
  global batch) from a warm page cache (every shard and index file read once first): median and
  p95 over --batches batches, in ms.

Targets, printed beside the figures: peak RSS <= 1.5 GB, and within 20% between the smallest and
the largest size; <= 2.1 bytes/token; the speedup near-linear (taken as >= 90% of the ratio of
the worker counts); a random batch under 5 ms (the median; p95 shown beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bigtrain.errors import UserError

CLASSIC_NOTE = ("classic = transformers run_clm recipe (map(tokenize_function) then map(group_texts)); "
                "tokenize_function appends EOS after each non-empty document and passes add_special_tokens=False, "
                "and group_texts runs over the whole dataset in one batch, so both sides yield the same blocks")
BIGTRAIN_NOTE = ("bigtrain = `python -m bigtrain data prepare --workers P --tasks P` in a child process (datatrove, "
                 "token shards), timed as the child's whole wall time (Python start-up included); its blocks are "
                 "read back with ShardBlocks, untimed")
RSS_NOTE = ("peak RSS: os.wait4 ru_maxrss of the child (the largest over it and its waited-for descendants; this "
            "process is a child subreaper, so the forkserver and the other processes the child leaves behind are "
            "reaped here too); psutil: the child's process tree sampled every 0.2 s (largest process / whole tree)")
# Scale mode: one global batch read at random, and the targets.
BATCH_ROWS, BATCH_SEQ = 64, 2048
TARGETS = {"peak_rss_bytes": 1.5e9, "rss_spread": 0.20, "bytes_per_token": 2.1, "speedup_efficiency": 0.9,
           "batch_ms": 5.0}
CORPUS_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `bigtrain bench data`."""
    parser.description = ("Default: tokens/s of `bigtrain data prepare` vs transformers' run_clm recipe on N MB of the "
                          "standard library (identical blocks required). --scale: peak RSS, bytes/token, tokens/s per "
                          "worker count and random-batch read time of `bigtrain data prepare` on JSON-lines corpora "
                          "of --sizes, against the targets.")
    parser.add_argument("--mb", type=float, default=8.0,
                        help="MB of standard-library .py files to process (default 8); with --scale, the sample the "
                             "BPE is trained on when no --tokenizer is given")
    parser.add_argument("--num-proc", type=int, default=None, metavar="P",
                        help="worker processes on both sides (default: os.cpu_count())")
    parser.add_argument("--seq-len", type=int, default=1024, help="block length in tokens (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bigtrain/classic rounds (default 3)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: train a byte-level BPE on the corpus, untimed)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG chart (matplotlib, Agg)")
    scale = parser.add_argument_group("scale mode (--scale; --num-proc, --seq-len and --rounds are for the comparison)")
    scale.add_argument("--scale", action="store_true",
                       help="measure `bigtrain data prepare` on JSON-lines corpora of --sizes instead of the comparison")
    scale.add_argument("--sizes", metavar="LIST", default=None, help="corpus sizes, comma-separated (default 100MB,1GB)")
    scale.add_argument("--workers", metavar="LIST", default=None, help="worker counts to time, --tasks equal (default 1,2)")
    scale.add_argument("--files", type=int, default=None, help="JSON-lines files per corpus (default 16)")
    scale.add_argument("--batches", type=int, default=None,
                       help=f"random {BATCH_ROWS} x {BATCH_SEQ} batches timed on the largest size (default 200)")
    scale.add_argument("--work-dir", metavar="DIR", default=None,
                       help="where corpora and the tokenizer are cached and preparations written "
                            "(default: $BIGTRAIN_CACHE/bench-data, else ~/.cache/bigtrain/bench-data)")


# --------------------------------------------------------------------------- setup


def _stdlib_head(mb: float) -> list[Path]:
    """The standard library's .py files (sorted) up to and including the one that passes `mb` MB."""
    from bigtrain.data import stdlib_files

    limit, total, out = int(mb * 2**20), 0, []
    for src in stdlib_files():
        if total >= limit:
            break
        out.append(src)
        total += src.stat().st_size
    return out


def _corpus(mb: float, out: Path) -> list[Path]:
    """Copy the first `mb` MB of the standard library's .py files (sorted) into `out`, in order."""
    out.mkdir(parents=True)
    files: list[Path] = []
    for i, src in enumerate(_stdlib_head(mb)):
        # A flat directory whose sorted order is the standard library's order.
        dst = out / f"{i:05d}_{src.name}"
        shutil.copyfile(src, dst)
        files.append(dst)
    return files


def _blocks_of(ds: Any, seq_len: int) -> Any:
    """The input_ids column of a dataset of blocks as an (n, seq_len) int32 array."""
    import numpy as np

    col = ds.data.column("input_ids")
    parts = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in col.chunks if len(chunk)]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return flat.astype(np.int32).reshape(-1, seq_len)


# --------------------------------------------------------------------------- the child process


def _become_subreaper() -> bool:
    """Make orphaned descendants (a child's forkserver, ...) our children, so they can be reaped
    with os.wait4 and their ru_maxrss counted. Linux only; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


class _TreeSampler(threading.Thread):
    """Samples the RSS of a process and its descendants with psutil every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        import psutil

        super().__init__(daemon=True)
        self.root, self.every = psutil.Process(pid), every
        self.peak_one = self.peak_tree = 0
        self.pids: set[int] = set()
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        import psutil

        while not self._done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:  # the child has gone
                procs = []
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                    self.pids.add(p.pid)
                except psutil.Error:
                    pass
            if rss:
                self.peak_one, self.peak_tree = max(self.peak_one, max(rss)), max(self.peak_tree, sum(rss))
            self._done.wait(self.every)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _reap_orphans(before: set[int], timeout: float = 60.0) -> int:
    """Reap our children that were not there before the child started (its orphans, reparented
    here); returns the largest ru_maxrss among them (0 if none)."""
    import psutil

    me, peak, deadline = psutil.Process(), 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [p.pid for p in me.children() if p.pid not in before]
        if not pending:
            break
        for pid in pending:
            try:
                got, _status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got:
                peak = max(peak, usage.ru_maxrss)
        time.sleep(0.02)
    return peak


def _run_prepare(overrides: list[str], out: Path, workers: int, env: dict) -> dict[str, Any]:
    """`python -m bigtrain data prepare OVERRIDES --out OUT --workers W --tasks W` as a child:
    its wall time and peak RSS (os.wait4 and psutil). Its `error:` line, if any, becomes ours."""
    import psutil

    cmd = [sys.executable, "-m", "bigtrain", "data", "prepare", *overrides, "--out", str(out),
           "--workers", str(workers), "--tasks", str(workers)]
    subreaper = _become_subreaper()
    before = {p.pid for p in psutil.Process().children()}
    log = out.with_name(out.name + ".stderr")
    with open(log, "w") as err:
        t0 = time.perf_counter()
        # Its own process group, so that an interrupted benchmark stops the workers too.
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        sampler = _TreeSampler(child.pid)
        try:
            _pid, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise
        finally:
            sampler.stop()
        seconds = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
    orphans = _reap_orphans(before) if subreaper else 0
    text = log.read_text(errors="replace")
    log.unlink()
    if child.returncode != 0:
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        if errors:
            raise UserError(f"bigtrain data prepare failed: {errors[-1][len('error: '):]}")
        how = f"exit code {child.returncode}"
        if child.returncode < 0:
            how = f"signal {signal.Signals(-child.returncode).name}" + (" (out of memory?)" if child.returncode == -signal.SIGKILL else "")
        raise RuntimeError(f"bigtrain data prepare ended with {how}; its stderr ends:\n{text[-4000:]}")
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB on Linux
    return {"seconds": seconds, "peak_rss_wait4_bytes": max(usage.ru_maxrss, orphans) * unit,
            "peak_rss_psutil_bytes": sampler.peak_one, "peak_rss_tree_bytes": sampler.peak_tree,
            "processes_seen": len(sampler.pids), "subreaper": subreaper}


def _child_env() -> dict[str, str]:
    """The environment the child runs in: the user's (before this process changes its own)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- the two sides


def _bigtrain_side(corpus: Path, tok_dir: Path, seq_len: int, num_proc: int, out: Path,
                   env: dict) -> tuple[float, Any, dict]:
    """`bigtrain data prepare` of the corpus as a child, then its blocks read with ShardBlocks.
    Returns (the child's seconds, (n_blocks, seq_len) ids, the child's figures)."""
    import numpy as np

    from bigtrain.shards import ShardBlocks, open_prepared

    child = _run_prepare([f"data.train_files={corpus}", f"data.tokenizer={tok_dir}"], out, num_proc, env)
    blocks = ShardBlocks([open_prepared(out, "bench data").sources["train"]], seq_len)
    ids = blocks.take(np.arange(len(blocks)))["input_ids"]
    return child["seconds"], ids, child


def _classic_side(files: list[Path], tokenizer: Any, eos: int, block_size: int, num_proc: int, cache: Path) -> tuple[float, Any]:
    """transformers' run_clm recipe on the same files. Returns (seconds, dataset of blocks)."""
    from itertools import chain

    import datasets

    def tokenize_function(examples):
        output = tokenizer(examples["text"], add_special_tokens=False)
        # run_clm joins documents with nothing; bigtrain puts EOS after each (non-empty) one.
        for key, fill in (("input_ids", eos), ("attention_mask", 1), ("token_type_ids", 0)):
            if key in output:
                output[key] = [x + [fill] if x else x for x in output[key]]
        return output

    def group_texts(examples):  # run_clm's, verbatim
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    t0 = time.perf_counter()
    raw = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train",
                                cache_dir=str(cache / "hf"))
    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc if num_proc > 1 else None,
                        remove_columns=raw.column_names)
    # One batch over the whole dataset: the remainder is dropped once, as bigtrain's pack does.
    lm = tokenized.map(group_texts, batched=True, batch_size=None)
    seconds = time.perf_counter() - t0
    return seconds, lm


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; prints a table, optionally writes JSON and a PNG. Returns an exit code."""
    _check_arguments(args)
    env = _child_env()  # before the settings below, which are for this process only
    # The environment bigtrain's own verbs run in (bigtrain.process.setup_accelerator).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _run_scale(args, env) if args.scale else _run_compare(args, env)


def _run_compare(args: argparse.Namespace, env: dict) -> int:
    """The comparison: bigtrain (child process) and classic, alternating, for --rounds rounds."""
    import datasets

    from bigtrain.data import resolve_sources
    from bigtrain.tokenizer import separator_id

    num_proc = args.num_proc or os.cpu_count() or 1
    datasets.disable_progress_bars()
    datasets.disable_caching()  # no map result is reused on the classic side
    with tempfile.TemporaryDirectory(prefix="bigtrain-bench-data-") as tmp:
        work = Path(tmp)
        files = _corpus(args.mb, work / "corpus")
        corpus_bytes = sum(f.stat().st_size for f in files)
        tokenizer, tok_dir, tok_desc = _tokenizer(args, files, work)
        eos = separator_id(tokenizer)
        sources = resolve_sources([str(work / "corpus")], "--mb")
        if [s.path for s in sources] != files:
            raise RuntimeError("bench data: the corpus directory lists differently from the copied files")
        _print_header(args, corpus_bytes, len(files), tok_desc, num_proc)

        rounds: list[dict[str, Any]] = []
        n_tokens = n_classic = 0
        for r in range(args.rounds):
            measured = _round(args, r, work, tok_dir, files, tokenizer, eos, num_proc, env)
            if measured is None:  # the two sides' blocks differ (the error is printed)
                return 1
            row, n_tokens, n_classic = measured
            rounds.append(row)
    return _report(args, rounds, n_tokens, n_classic, corpus_bytes, len(files), num_proc)


def _check_arguments(args: argparse.Namespace) -> None:
    if not args.mb > 0:
        raise UserError(f"--mb must be > 0, got {args.mb}")
    if args.num_proc is not None and args.num_proc < 1:
        raise UserError(f"--num-proc must be >= 1, got {args.num_proc}")
    if args.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {args.rounds}")
    if args.tokenizer is None and args.vocab_size < 300:
        raise UserError(f"--vocab-size must be >= 300 (256 bytes + specials + merges), got {args.vocab_size}")
    _check_scale_arguments(args)


def _check_scale_arguments(args: argparse.Namespace) -> None:
    """Parses --sizes and --workers into args.size_list [(label, bytes)] and args.worker_list."""
    from bigtrain.cli import parse_size

    given = [f"--{k.replace('_', '-')}" for k in ("sizes", "workers", "files", "batches", "work_dir")
             if getattr(args, k) is not None]
    if given and not args.scale:
        raise UserError(f"{', '.join(given)}: only with --scale")
    labels = [s.strip() for s in ("100MB,1GB" if args.sizes is None else args.sizes).split(",")]
    sizes = {parse_size(s, "--sizes"): s for s in labels}  # one entry per size
    args.size_list = sorted(((label, n) for n, label in sizes.items()), key=lambda x: x[1])
    try:
        workers = sorted({int(w) for w in ("1,2" if args.workers is None else args.workers).split(",")})
    except ValueError:
        raise UserError(f"--workers {args.workers!r}: expected worker counts such as 1,2") from None
    if workers[0] < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    args.worker_list = workers
    args.files = 16 if args.files is None else args.files
    args.batches = 200 if args.batches is None else args.batches
    if args.files < 1:
        raise UserError(f"--files must be >= 1, got {args.files}")
    if args.batches < 1:
        raise UserError(f"--batches must be >= 1, got {args.batches}")


def _tokenizer(args: argparse.Namespace, files: list[Path], work: Path) -> tuple[Any, Path, str]:
    """(tokenizer, its directory, its description): --tokenizer DIR, or a byte-level BPE trained on
    the corpus (untimed)."""
    from bigtrain.tokenizer import iter_texts, load_tokenizer, train_bpe

    if args.tokenizer:
        tok_dir, tok_desc = Path(args.tokenizer).resolve(), f"tokenizer {args.tokenizer}"
        tokenizer = load_tokenizer(tok_dir, where="--tokenizer")
    else:
        print(f"# training a byte-level BPE (vocab {args.vocab_size}) on the corpus (not timed) ...", flush=True)
        tok_dir = train_bpe(iter_texts(files), args.vocab_size, work / "tokenizer")
        tok_desc = f"byte-level BPE vocab {args.vocab_size} trained on the corpus"
        tokenizer = load_tokenizer(tok_dir)
    return tokenizer, tok_dir, tok_desc


def _print_header(args: argparse.Namespace, corpus_bytes: int, n_files: int, tok_desc: str, num_proc: int) -> None:
    print(f"# data benchmark: {corpus_bytes / 2**20:.2f} MB of the Python standard library "
          f"({n_files} .py files, one document each); {tok_desc}")
    print(f"# seq_len {args.seq_len}, num_proc {num_proc} on both sides, {args.rounds} round(s) alternating "
          f"bigtrain / classic; a fresh --out directory and fresh caches each round, datasets map caching off")
    print(f"# {BIGTRAIN_NOTE}")
    print(f"# {CLASSIC_NOTE}")
    print(f"{'round':>6} {'bigtrain s':>10} {'bigtrain tok/s':>15} {'classic s':>10} {'classic tok/s':>15} {'ratio':>6}",
          flush=True)


def _round(args: argparse.Namespace, r: int, work: Path, tok_dir: Path, files: list[Path], tokenizer: Any, eos: int,
           num_proc: int, env: dict) -> tuple[dict[str, Any], int, int] | None:
    """Round r: bigtrain then classic, each with a fresh directory; prints its table line.

    Returns (the round's row, bigtrain's tokens, classic's tokens), or None after printing the
    error when the two sides' blocks differ.
    """
    import numpy as np

    out = work / f"prepared-{r}"
    sec_b, ids, child = _bigtrain_side(work / "corpus", tok_dir, args.seq_len, num_proc, out, env)
    shutil.rmtree(out, ignore_errors=True)
    cache = work / f"cache-classic-{r}"
    sec_c, lm = _classic_side(files, tokenizer, eos, args.seq_len, num_proc, cache)
    classic_ids = _blocks_of(lm, args.seq_len)
    del lm
    shutil.rmtree(cache, ignore_errors=True)
    n_tokens, n_classic = int(ids.size), int(classic_ids.size)
    if n_tokens == 0 and n_classic == 0:
        raise UserError(f"--mb {args.mb}: too few tokens for one block of --seq-len {args.seq_len}; "
                        "raise --mb or lower --seq-len")
    if ids.shape != classic_ids.shape or not np.array_equal(ids, classic_ids):
        where = ""
        if ids.shape == classic_ids.shape:
            first = int(np.argmax((ids != classic_ids).reshape(-1)))
            where = f"; first difference at token {first} (block {first // args.seq_len})"
        print(f"error: bigtrain and the classic recipe yield different blocks: bigtrain {ids.shape[0]} x "
              f"{args.seq_len} ({n_tokens} tokens), classic {classic_ids.shape[0]} x {args.seq_len} "
              f"({n_classic} tokens){where}", file=sys.stderr)
        return None
    row = {"round": r + 1, "bigtrain_s": sec_b, "classic_s": sec_c,
           "tokens_per_s": n_tokens / sec_b, "classic_tokens_per_s": n_classic / sec_c,
           "ratio": sec_c / sec_b, "bigtrain_peak_rss_wait4_bytes": child["peak_rss_wait4_bytes"]}
    print(f"{r + 1:6d} {sec_b:10.2f} {row['tokens_per_s']:15,.0f} {sec_c:10.2f} "
          f"{row['classic_tokens_per_s']:15,.0f} {row['ratio']:6.2f}", flush=True)
    return row, n_tokens, n_classic


def _report(args: argparse.Namespace, rounds: list[dict[str, Any]], n_tokens: int, n_classic: int, corpus_bytes: int,
            n_files: int, num_proc: int) -> int:
    """Prints the medians and the ratio; writes the JSON and the plot if asked. Returns the exit code."""
    tps = statistics.median(x["tokens_per_s"] for x in rounds)
    ctps = statistics.median(x["classic_tokens_per_s"] for x in rounds)
    ratios = [x["ratio"] for x in rounds]
    ratio = tps / ctps
    print(f"{'median':>6} {statistics.median(x['bigtrain_s'] for x in rounds):10.2f} {tps:15,.0f} "
          f"{statistics.median(x['classic_s'] for x in rounds):10.2f} {ctps:15,.0f} {ratio:6.2f}")
    print(f"# both sides yield identical blocks: {n_tokens // args.seq_len} x {args.seq_len} = {n_tokens:,} tokens")
    print(f"# ratio bigtrain / classic (median tokens/s): {ratio:.2f}x (per round {min(ratios):.2f}-{max(ratios):.2f}); "
          f"target >= 2x: {'met' if ratio >= 2 else 'MISSED'}")

    result = {
        "mode": "compare", "tokens_per_s": tps, "classic_tokens_per_s": ctps, "ratio": ratio,
        "ratio_min": min(ratios), "ratio_max": max(ratios), "ratio_target": 2.0,
        "tokens": n_tokens, "classic_tokens": n_classic, "blocks": n_tokens // args.seq_len,
        "mb": args.mb, "corpus_bytes": corpus_bytes, "files": n_files, "seq_len": args.seq_len,
        "num_proc": num_proc, "rounds": args.rounds, "per_round": rounds,
        "tokenizer": str(args.tokenizer) if args.tokenizer else f"bpe-{args.vocab_size} trained on the corpus",
        "bigtrain": BIGTRAIN_NOTE, "classic": CLASSIC_NOTE, "cpu_count": os.cpu_count(),
    }
    _write_outputs(args, result, _plot)
    return 0


def _write_outputs(args: argparse.Namespace, result: dict[str, Any], plot) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(result: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    names = ["bigtrain (data prepare)", "classic (run_clm)"]
    med = [result["tokens_per_s"], result["classic_tokens_per_s"]]
    keys = ["tokens_per_s", "classic_tokens_per_s"]
    lo = [m - min(r[k] for r in result["per_round"]) for m, k in zip(med, keys)]
    hi = [max(r[k] for r in result["per_round"]) - m for m, k in zip(med, keys)]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    bars = ax.bar(names, med, yerr=[lo, hi], capsize=6, color=["tab:blue", "tab:gray"])
    for b, v in zip(bars, med):
        ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.set_title(f"tokenize + pack {result['corpus_bytes'] / 2**20:.1f} MB, num_proc {result['num_proc']}: "
                 f"{result['ratio']:.2f}x", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- scale mode


def _work_dir(args: argparse.Namespace) -> Path:
    if args.work_dir:
        return Path(args.work_dir)
    root = os.environ.get("BIGTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bigtrain")
    return Path(root) / "bench-data"


def _scale_tokenizer(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """(directory, description): --tokenizer DIR, or a BPE trained on the first --mb MB of the
    standard library (untimed; cached in the work directory)."""
    from bigtrain.tokenizer import iter_texts, load_tokenizer, train_bpe

    if args.tokenizer:
        load_tokenizer(args.tokenizer, where="--tokenizer")
        return Path(args.tokenizer).resolve(), f"tokenizer {args.tokenizer}"
    tok_dir = work / f"tokenizer-bpe{args.vocab_size}-stdlib{args.mb:g}MB"
    if not (tok_dir / "tokenizer.json").is_file():
        print(f"# training a byte-level BPE (vocab {args.vocab_size}) on {args.mb:g} MB of the standard library "
              "(not timed) ...", flush=True)
        train_bpe(iter_texts(_stdlib_head(args.mb)), args.vocab_size, tok_dir)
    return tok_dir.resolve(), f"byte-level BPE vocab {args.vocab_size} trained on {args.mb:g} MB of the standard library"


def _stdlib_records() -> list[bytes]:
    """Every standard-library .py file as one JSON line {"text": ...}."""
    from bigtrain.data import stdlib_files

    return [json.dumps({"text": p.read_bytes().decode("utf-8")}, ensure_ascii=False).encode() + b"\n"
            for p in stdlib_files()]


def _scale_corpus(size: int, n_files: int, work: Path) -> tuple[Path, dict[str, Any]]:
    """A JSON-lines corpus of about `size` bytes in `n_files` files (cached): the standard library's
    .py files as records, in order, as many times over as needed. Returns (directory, facts)."""
    d = work / f"corpus-{size}B-{n_files}files-v{CORPUS_VERSION}"
    facts_file = d.with_name(d.name + ".json")  # beside the directory: inside, it would be read as data
    if facts_file.is_file() and d.is_dir():
        return d, json.loads(facts_file.read_text())
    print(f"# writing a {size / 1e6:,.1f} MB JSON-lines corpus of standard-library files into {d} ...", flush=True)
    shutil.rmtree(d, ignore_errors=True)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records = _stdlib_records()
    written = count = 0
    for part in range(n_files):
        goal = size * (part + 1) // n_files
        with open(tmp / f"part-{part:04d}.jsonl", "wb") as f:
            while True:  # at least one record per file
                rec = records[count % len(records)]
                f.write(rec)
                written, count = written + len(rec), count + 1
                if written >= goal:
                    break
    os.replace(tmp, d)
    facts = {"bytes": written, "records": count, "files": n_files}
    facts_file.write_text(json.dumps(facts))
    return d, facts


def _disk_figures(out: Path) -> dict[str, Any]:
    """Tokens, documents, and the bytes of the token and index files the manifest lists."""
    from bigtrain.shards import read_manifest

    entry = read_manifest(out, "bench data")["sources"]["train"]
    disk = sum((out / f["path"]).stat().st_size + (out / (f["path"] + ".index")).stat().st_size
               for f in entry["files"])
    return {"tokens": entry["tokens"], "documents": entry["documents"], "disk_bytes": disk,
            "bytes_per_token": disk / max(entry["tokens"], 1), "shard_files": len(entry["files"])}


def _scale_size(args: argparse.Namespace, label: str, corpus: Path, facts: dict, tok_dir: Path, work: Path,
                env: dict, keep: bool) -> dict[str, Any]:
    """Prepare one corpus once per worker count; prints a line per run. With `keep`, the last
    preparation stays in work/prepared for the random-batch reads."""
    entry: dict[str, Any] = {"size": label, "input_bytes": facts["bytes"], "input_files": facts["files"],
                             "records": facts["records"], "runs": []}
    out = work / "prepared"
    for w in args.worker_list:
        shutil.rmtree(out, ignore_errors=True)
        child = _run_prepare([f"data.train_files={corpus}", f"data.tokenizer={tok_dir}"], out, w, env)
        disk = _disk_figures(out)
        if "tokens" in entry and disk["tokens"] != entry["tokens"]:
            raise RuntimeError(f"bench data: {label}: {w} worker(s) made {disk['tokens']:,} tokens, "
                               f"{entry['runs'][0]['workers']} made {entry['tokens']:,}")
        entry.update(disk)
        run = {"workers": w, "tasks": w, **child, "tokens_per_s": disk["tokens"] / child["seconds"]}
        entry["runs"].append(run)
        entry[f"tokens_per_s_{w}"] = run["tokens_per_s"]
        print(f"{label:>8} {facts['bytes'] / 1e6:10.1f} {w:8d} {child['seconds']:9.1f} {run['tokens_per_s']:13,.0f} "
              f"{child['peak_rss_wait4_bytes'] / 1e6:13.1f} {child['peak_rss_psutil_bytes'] / 1e6:12.1f} "
              f"{child['peak_rss_tree_bytes'] / 1e6:10.1f}", flush=True)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    runs = entry["runs"]
    entry["peak_rss_wait4_bytes"] = max(r["peak_rss_wait4_bytes"] for r in runs)
    entry["peak_rss_psutil_bytes"] = max(r["peak_rss_psutil_bytes"] for r in runs)
    entry["speedup"] = runs[-1]["tokens_per_s"] / runs[0]["tokens_per_s"] if len(runs) > 1 else None
    return entry


def _random_batches(out: Path, batches: int, seed: int = 0) -> dict[str, Any]:
    """ShardBlocks.take on BATCH_ROWS random block ids of BATCH_SEQ tokens, after reading every
    shard and index file once (warm page cache): median and p95 in ms."""
    import numpy as np

    from bigtrain.shards import ShardBlocks, open_prepared

    ds = open_prepared(out, "bench data")
    blocks = ShardBlocks([ds.sources["train"]], BATCH_SEQ)
    if len(blocks) == 0:
        raise UserError(f"--sizes: the largest corpus holds fewer than {BATCH_SEQ} tokens, not one block to read")
    warm = 0
    for f in ds.manifest["sources"]["train"]["files"]:
        for path in (out / f["path"], out / (f["path"] + ".index")):
            with open(path, "rb") as fh:
                while chunk := fh.read(16 << 20):
                    warm += len(chunk)
    rng = np.random.default_rng(seed)
    blocks.take(rng.integers(0, len(blocks), BATCH_ROWS))  # the code path warm too
    times = []
    for _ in range(batches):
        ids = rng.integers(0, len(blocks), BATCH_ROWS)
        t0 = time.perf_counter()
        blocks.take(ids)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"rows": BATCH_ROWS, "seq_len": BATCH_SEQ, "batches": batches, "blocks": len(blocks),
            "warmed_bytes": warm, "median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)),
            "max_ms": float(max(times))}


def _run_scale(args: argparse.Namespace, env: dict) -> int:
    """The scale mode: every size of --sizes, every worker count of --workers, then random batches."""
    env = {**env, "RAYON_NUM_THREADS": "1"}  # one tokenizer thread per worker: process scaling
    work = _work_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, tok_desc = _scale_tokenizer(args, work)
    print(f"# scale: JSON-lines corpora of the standard library's .py files (one record per file, {args.files} "
          f"files per corpus) of {', '.join(label for label, _ in args.size_list)}; {tok_desc}; work dir {work}")
    print("# `python -m bigtrain data prepare --workers W --tasks W` in a child process per run, fresh --out; "
          "time = the child's whole wall time (Python start-up included); tokens = the manifest's")
    print(f"# {RSS_NOTE}")
    print(f"{'size':>8} {'input MB':>10} {'workers':>8} {'seconds':>9} {'tokens/s':>13} {'RSS wait4 MB':>13} "
          f"{'RSS psutil':>12} {'tree MB':>10}", flush=True)
    sizes = []
    for i, (label, size) in enumerate(args.size_list):
        corpus, facts = _scale_corpus(size, args.files, work)
        sizes.append(_scale_size(args, label, corpus, facts, tok_dir, work, env, keep=i == len(args.size_list) - 1))
    batch = _random_batches(work / "prepared", args.batches)
    shutil.rmtree(work / "prepared", ignore_errors=True)
    result = _scale_result(args, sizes, batch, tok_desc, work, env)
    _print_scale(result)
    _write_outputs(args, result, _plot_scale)
    return 0


def _scale_result(args: argparse.Namespace, sizes: list[dict], batch: dict, tok_desc: str, work: Path,
                  env: dict) -> dict[str, Any]:
    """Every figure, and each target with its value and whether it is met (None: not measurable)."""
    small, large = sizes[0], sizes[-1]
    peak = max(s["peak_rss_wait4_bytes"] for s in sizes)
    spread = (large["peak_rss_wait4_bytes"] / small["peak_rss_wait4_bytes"] - 1) if len(sizes) > 1 else None
    bpt = max(s["bytes_per_token"] for s in sizes)
    linear = args.worker_list[-1] / args.worker_list[0]
    speedup = large["speedup"]
    targets = {
        "peak_rss": {"target": "peak RSS <= 1.5 GB", "value": peak, "met": peak <= TARGETS["peak_rss_bytes"]},
        "rss_spread": {"target": "peak RSS within 20% between the smallest and the largest size", "value": spread,
                       "met": None if spread is None else abs(spread) <= TARGETS["rss_spread"]},
        "bytes_per_token": {"target": "<= 2.1 bytes/token", "value": bpt, "met": bpt <= TARGETS["bytes_per_token"]},
        "speedup": {"target": f"tokens/s {args.worker_list[-1]} vs {args.worker_list[0]} worker(s) near-linear "
                              f"(>= {TARGETS['speedup_efficiency']:.0%} of {linear:g}x), largest size",
                    "value": speedup,
                    "met": None if speedup is None else speedup >= TARGETS["speedup_efficiency"] * linear},
        "random_batch": {"target": f"random {BATCH_ROWS} x {BATCH_SEQ} batch < 5 ms (median)",
                         "value": batch["median_ms"], "met": batch["median_ms"] < TARGETS["batch_ms"]},
    }
    return {
        "mode": "scale", "sizes": sizes, "random_batch": batch, "targets": targets,
        "peak_rss_bytes": peak, "peak_rss_psutil_bytes": max(s["peak_rss_psutil_bytes"] for s in sizes),
        "rss_spread": spread, "bytes_per_token": bpt, "speedup": speedup, "worker_counts": args.worker_list,
        "files_per_corpus": args.files, "tokenizer": tok_desc, "work_dir": str(work), "cpu_count": os.cpu_count(),
        "tokenizers_parallelism": env.get("TOKENIZERS_PARALLELISM"),
        "method": {"timing": "wall time of the whole `python -m bigtrain data prepare` child, Python start-up included",
                   "rss": RSS_NOTE, "subreaper": all(r["subreaper"] for s in sizes for r in s["runs"]),
                   "bytes_per_token": "sizes of the token and index files the manifest lists / the manifest's tokens"},
    }


def _print_scale(result: dict[str, Any]) -> None:
    """The per-size figures, the random-batch time, and the targets beside the figures."""
    workers = result["worker_counts"]
    print(f"{'size':>8} {'tokens':>15} {'documents':>11} {'disk MB':>10} {'bytes/token':>12} "
          f"{f'speedup {workers[-1]} vs {workers[0]}':>16}")
    for s in result["sizes"]:
        speedup = f"{s['speedup']:.2f}x" if s["speedup"] is not None else "n/a"
        print(f"{s['size']:>8} {s['tokens']:15,} {s['documents']:11,} {s['disk_bytes'] / 1e6:10.1f} "
              f"{s['bytes_per_token']:12.4f} {speedup:>16}")
    b = result["random_batch"]
    print(f"# random batch {b['rows']} x {b['seq_len']} (ShardBlocks.take, {b['blocks']:,} blocks of the largest size, "
          f"page cache warmed with {b['warmed_bytes'] / 1e6:,.1f} MB): median {b['median_ms']:.2f} ms, "
          f"p95 {b['p95_ms']:.2f} ms over {b['batches']} batches")
    t = result["targets"]
    shown = {
        "peak_rss": f"{t['peak_rss']['value'] / 1e9:.3f} GB (psutil: {result['peak_rss_psutil_bytes'] / 1e9:.3f} GB)",
        "rss_spread": "n/a (one size)" if t["rss_spread"]["value"] is None else f"{t['rss_spread']['value']:+.1%}",
        "bytes_per_token": f"{t['bytes_per_token']['value']:.4f}",
        "speedup": "n/a (one worker count)" if t["speedup"]["value"] is None else f"{t['speedup']['value']:.2f}x",
        "random_batch": f"{b['median_ms']:.2f} ms (p95 {b['p95_ms']:.2f} ms)",
    }
    print("# targets:")
    for key, v in t.items():
        verdict = {True: "met", False: "MISSED", None: "n/a"}[v["met"]]
        print(f"#   {v['target']}: {shown[key]}  {verdict}")


def _plot_scale(result: dict[str, Any], path: str) -> None:
    """Peak RSS per size and worker count (wait4 bars, psutil dots, the 1.5 GB line) and tokens/s."""
    import numpy as np

    plt = _pyplot()
    labels = [s["size"] for s in result["sizes"]]
    workers = result["worker_counts"]
    x, width = np.arange(len(labels)), 0.8 / len(workers)
    fig, (ax_rss, ax_tps) = plt.subplots(1, 2, figsize=(9, 3.8))
    for k, w in enumerate(workers):
        runs = [next(r for r in s["runs"] if r["workers"] == w) for s in result["sizes"]]
        pos = x - 0.4 + width * (k + 0.5)
        ax_rss.bar(pos, [r["peak_rss_wait4_bytes"] / 1e9 for r in runs], width, label=f"{w} worker(s), wait4")
        ax_rss.plot(pos, [r["peak_rss_psutil_bytes"] / 1e9 for r in runs], "k.", label="psutil" if k == 0 else None)
        bars = ax_tps.bar(pos, [r["tokens_per_s"] for r in runs], width, label=f"{w} worker(s)")
        for b, r in zip(bars, runs):
            ax_tps.annotate(f"{r['tokens_per_s'] / 1e3:,.0f}k", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax_rss.axhline(TARGETS["peak_rss_bytes"] / 1e9, color="tab:red", ls="--", lw=1, label="target 1.5 GB")
    ax_rss.set_ylabel("peak RSS of one process (GB)")
    ax_tps.set_ylabel("tokens/s (whole child process)")
    for ax in (ax_rss, ax_tps):
        ax.set_xticks(x, labels)
        ax.set_xlabel("corpus size")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    b = result["random_batch"]
    fig.suptitle(f"bigtrain data prepare: {result['bytes_per_token']:.3f} bytes/token; random {b['rows']}x{b['seq_len']} "
                 f"batch {b['median_ms']:.2f} ms median, {b['p95_ms']:.2f} ms p95", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain bench data", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
