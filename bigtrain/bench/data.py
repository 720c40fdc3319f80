"""`bigtrain bench data`: tokens/s of bigtrain's tokenize-and-pack pipeline vs transformers' run_clm recipe.

Both sides turn the same text files (the first N MB of the Python standard library's .py
sources, one document per file) into the same (n_blocks, seq_len) blocks of token ids, with the
same tokenizer (a byte-level BPE trained on the corpus beforehand, untimed, or --tokenizer DIR)
and the same number of worker processes:

- bigtrain: exactly what `bigtrain data prepare` does for packed data, from the files to the
  int32 block array: `load_documents` -> `tokenize` -> `_flat_tokens` -> `pack` (bigtrain.data),
  with a fresh cache directory each round so no cache hit helps.
- classic: the recipe of transformers' examples/pytorch/language-modeling/run_clm.py with the
  `datasets` library: load the files as a text dataset (one row per document),
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
command fails. `datasets`' caching of map results is off on both sides (datasets.disable_caching).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bigtrain.errors import UserError

CLASSIC_NOTE = ("classic = transformers run_clm recipe (map(tokenize_function) then map(group_texts)); "
                "tokenize_function appends EOS after each non-empty document and passes add_special_tokens=False, "
                "and group_texts runs over the whole dataset in one batch, so both sides yield the same blocks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `bigtrain bench data`."""
    parser.add_argument("--mb", type=float, default=8.0, help="MB of standard-library .py files to process (default 8)")
    parser.add_argument("--num-proc", type=int, default=None, metavar="P",
                        help="worker processes on both sides (default: os.cpu_count())")
    parser.add_argument("--seq-len", type=int, default=1024, help="block length in tokens (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bigtrain/classic rounds (default 3)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: train a byte-level BPE on the corpus, untimed)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG bar chart of tokens/s (matplotlib, Agg)")


# --------------------------------------------------------------------------- setup


def _corpus(mb: float, out: Path) -> list[Path]:
    """Copy the first `mb` MB of the standard library's .py files (sorted) into `out`, in order."""
    from bigtrain.data import stdlib_files

    limit = int(mb * 2**20)
    out.mkdir(parents=True)
    files: list[Path] = []
    total = 0
    for i, src in enumerate(stdlib_files()):
        if total >= limit:
            break
        # A flat directory whose sorted order is the standard library's order.
        dst = out / f"{i:05d}_{src.name}"
        shutil.copyfile(src, dst)
        files.append(dst)
        total += dst.stat().st_size
    return files


def _blocks_of(ds: Any, seq_len: int) -> Any:
    """The input_ids column of a dataset of blocks as an (n, seq_len) int32 array."""
    import numpy as np

    col = ds.data.column("input_ids")
    parts = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in col.chunks if len(chunk)]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return flat.astype(np.int32).reshape(-1, seq_len)


# --------------------------------------------------------------------------- the two sides


def _bigtrain_side(sources: list, tokenizer: Any, eos: int, seq_len: int, num_proc: int, cache: Path) -> tuple[float, Any]:
    """bigtrain's pipeline for packed data: files -> (n_blocks, seq_len) int32 ids. Returns (seconds, ids)."""
    from bigtrain.data import _flat_tokens, load_documents, pack, tokenize

    t0 = time.perf_counter()
    docs = load_documents(sources, "document", "text", "strict", cache)
    tok_ds = tokenize(docs, tokenizer, num_proc)
    flat, lengths = _flat_tokens(tok_ds)
    ids, _segments = pack(flat, lengths, eos, seq_len)
    seconds = time.perf_counter() - t0
    return seconds, ids


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
    num_proc = args.num_proc or os.cpu_count() or 1
    # The environment bigtrain's own verbs run in (bigtrain.engine.setup_accelerator).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import datasets

    from bigtrain.data import resolve_sources
    from bigtrain.tokenizer import separator_id

    datasets.disable_progress_bars()
    datasets.disable_caching()  # no map result is reused, on either side
    with tempfile.TemporaryDirectory(prefix="bigtrain-bench-data-") as tmp:
        work = Path(tmp)
        files = _corpus(args.mb, work / "corpus")
        corpus_bytes = sum(f.stat().st_size for f in files)
        tokenizer, tok_desc = _tokenizer(args, files, work)
        eos = separator_id(tokenizer)
        sources = resolve_sources([str(work / "corpus")], "--mb")
        if [s.path for s in sources] != files:
            raise RuntimeError("bench data: the corpus directory lists differently from the copied files")
        _print_header(args, corpus_bytes, len(files), tok_desc, num_proc)

        rounds: list[dict[str, Any]] = []
        n_tokens = n_classic = 0
        for r in range(args.rounds):
            measured = _round(args, r, work, sources, files, tokenizer, eos, num_proc)
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


def _tokenizer(args: argparse.Namespace, files: list[Path], work: Path) -> tuple[Any, str]:
    """(tokenizer, its description): --tokenizer DIR, or a byte-level BPE trained on the corpus (untimed)."""
    from bigtrain.tokenizer import iter_texts, load_tokenizer, train_bpe

    if args.tokenizer:
        tok_dir, tok_desc = Path(args.tokenizer), f"tokenizer {args.tokenizer}"
        tokenizer = load_tokenizer(tok_dir, where="--tokenizer")
    else:
        print(f"# training a byte-level BPE (vocab {args.vocab_size}) on the corpus (not timed) ...", flush=True)
        tok_dir = train_bpe(iter_texts(files), args.vocab_size, work / "tokenizer")
        tok_desc = f"byte-level BPE vocab {args.vocab_size} trained on the corpus"
        tokenizer = load_tokenizer(tok_dir)
    return tokenizer, tok_desc


def _print_header(args: argparse.Namespace, corpus_bytes: int, n_files: int, tok_desc: str, num_proc: int) -> None:
    print(f"# data benchmark: {corpus_bytes / 2**20:.2f} MB of the Python standard library "
          f"({n_files} .py files, one document each); {tok_desc}")
    print(f"# seq_len {args.seq_len}, num_proc {num_proc} on both sides, {args.rounds} round(s) alternating "
          f"bigtrain / classic; fresh caches, datasets map caching off")
    print(f"# {CLASSIC_NOTE}")
    print(f"{'round':>6} {'bigtrain s':>10} {'bigtrain tok/s':>15} {'classic s':>10} {'classic tok/s':>15} {'ratio':>6}",
          flush=True)


def _round(args: argparse.Namespace, r: int, work: Path, sources: list, files: list[Path], tokenizer: Any, eos: int,
           num_proc: int) -> tuple[dict[str, Any], int, int] | None:
    """Round r: bigtrain then classic, each with a fresh cache; prints its table line.

    Returns (the round's row, bigtrain's tokens, classic's tokens), or None after printing the
    error when the two sides' blocks differ.
    """
    import numpy as np

    cache = work / f"cache-bigtrain-{r}"
    sec_b, ids = _bigtrain_side(sources, tokenizer, eos, args.seq_len, num_proc, cache)
    shutil.rmtree(cache, ignore_errors=True)
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
           "ratio": sec_c / sec_b}
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
    print(f"# ratio bigtrain / classic (median tokens/s): {ratio:.2f}x (per round {min(ratios):.2f}-{max(ratios):.2f})")

    result = {
        "tokens_per_s": tps, "classic_tokens_per_s": ctps, "ratio": ratio,
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "tokens": n_tokens, "classic_tokens": n_classic, "blocks": n_tokens // args.seq_len,
        "mb": args.mb, "corpus_bytes": corpus_bytes, "files": n_files, "seq_len": args.seq_len,
        "num_proc": num_proc, "rounds": args.rounds, "per_round": rounds,
        "tokenizer": str(args.tokenizer) if args.tokenizer else f"bpe-{args.vocab_size} trained on the corpus",
        "classic": CLASSIC_NOTE, "cpu_count": os.cpu_count(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        _plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["bigtrain", "classic (run_clm)"]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain bench data", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
