"""The pretraining corpus (clm, mlm): which sources, where their prepared shards are, and the
blocks and sample order training reads from them.

- `source_jobs(cfg)`: data.sources (or data.train_files as the one source "train") and
  data.valid_files, resolved to files.
- `preparation_plan` / `plan_key`: everything the tokens depend on (files with sizes and mtimes,
  reading options, tokenizer); its hash names the cache directory of an automatic preparation,
  and `bigtrain data prepare` keeps it in plan.json so a rerun continues only the same work.
- `ensure_prepared(cfg)`: data.prepared, else the cached preparation of this plan, else (under
  data.auto_prepare_max_bytes) runs `bigtrain data prepare` into the cache in a child process,
  so the training process never imports datatrove; a larger corpus stops with the command to run.
- `ShardData`: the opened dataset for training: blocks of every source behind one flat index
  (bigtrain.shards), the validation blocks, and the mixture schedule (bigtrain.mixture).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bigtrain.errors import UserError

PLAN_VERSION = 1
# Below this many bytes, an automatic preparation runs in one process.
SMALL_CORPUS = 16 << 20


@dataclass
class SourceJob:
    """One source (or the validation split) to tokenize: its files and reading options."""

    name: str
    split: str  # "train" or "valid"
    files: list  # [(path, kind, bytes)]
    sample_by: str
    text_field: str
    weight: float = 1.0
    inputs: list = field(default_factory=list)  # the specs the user gave
    key: str = "data.train_files"  # the config key, for messages
    mtimes: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.split}/{self.name}"


def _file_identity(path: Path) -> tuple[int, int]:
    """(bytes, latest mtime_ns) of a file, or of every file below a directory (a `datasets` dir)."""
    if path.is_dir():
        stats = [f.stat() for f in sorted(path.rglob("*")) if f.is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _job(name: str, split: str, specs, key: str, sample_by: str, text_field: str, weight: float) -> SourceJob:
    from bigtrain.data import resolve_sources

    sources = resolve_sources(list(specs), key)
    files, mtimes = [], []
    for s in sources:
        size, mtime = _file_identity(s.path)
        files.append((os.path.abspath(s.path), s.kind, size))
        mtimes.append(mtime)
    return SourceJob(name, split, files, sample_by, text_field, weight, list(specs), key, mtimes)


def source_jobs(cfg) -> list[SourceJob]:
    """The training sources and, with data.valid_files, the validation split ("valid/valid")."""
    from bigtrain.config import source_specs

    d = cfg.data
    lines = d.mode == "line_by_line"  # one example per line, whatever data.sample_by says
    jobs = [_job(s.name, "train", s.files, s.key, "line" if lines else s.sample_by, s.text_field, s.weight) for s in source_specs(cfg)]
    if d.valid_files:
        jobs.append(_job("valid", "valid", d.valid_files, "data.valid_files", "line" if lines else d.sample_by, d.text_field, 1.0))
    return jobs


def tokenizer_plan(cfg) -> dict:
    """The tokenizer part of the plan: a given directory (by content hash), or what to train."""
    from bigtrain.data import resolve_tokenizer_dir
    from bigtrain.shards import tokenizer_hash

    tok_dir = resolve_tokenizer_dir(cfg)
    if tok_dir is not None:
        return {"dir": str(Path(tok_dir).resolve()), "sha256": tokenizer_hash(tok_dir)}
    kind = "wordpiece-v1" if cfg.task == "mlm" else "bpe-v1"
    return {"train": {"kind": kind, "vocab_size": cfg.data.vocab_size, "sample_bytes": cfg.data.tokenizer_sample_bytes, "seed": cfg.train.seed}}


def preparation_plan(cfg, jobs: list[SourceJob]) -> dict:
    """Everything the prepared tokens depend on (not the weights: they only steer sampling)."""
    d = cfg.data
    return {
        "version": PLAN_VERSION,
        "sources": [
            {"name": j.name, "split": j.split, "sample_by": j.sample_by, "text_field": j.text_field,
             "files": [[p, k, b, m] for (p, k, b), m in zip(j.files, j.mtimes)]}
            for j in jobs
        ],
        "on_decode_error": d.on_decode_error,
        "max_line_bytes": d.max_line_bytes,
        "tokenizer": tokenizer_plan(cfg),
        # line_by_line examples: blank and whitespace-only lines are none (as transformers' old
        # LineByLineTextDataset). Only then in the plan, so packed plans keep their keys.
        **({"skip_blank": True} if d.mode == "line_by_line" else {}),
    }


def plan_key(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:24]


def cached_dir(cfg, plan: dict) -> Path:
    from bigtrain.config import cache_root

    return cache_root(cfg) / "prepared" / plan_key(plan)


def prepare_command(cfg) -> str:
    """The `bigtrain data prepare` command line for this config (as the user gave it)."""
    args = cfg.origin.args
    return "bigtrain data prepare " + (shlex.join(args) if args else "CONFIG.yaml")


def ensure_prepared(cfg, log: Callable = print) -> Path:
    """The prepared directory to train from (rank 0, before the process group exists)."""
    from bigtrain.config import where_of
    from bigtrain.shards import MANIFEST

    if cfg.data.prepared:
        return Path(cfg.data.prepared)
    jobs = source_jobs(cfg)
    plan = preparation_plan(cfg, jobs)
    out = cached_dir(cfg, plan)
    if (out / MANIFEST).is_file():
        return out
    total = sum(b for j in jobs for _, _, b in j.files)
    limit = cfg.data.auto_prepare_max_bytes
    if total > limit:
        raise UserError(
            f"{where_of(cfg, jobs[0].key)}: the corpus is {total / 1e9:.2f} GB, more than data.auto_prepare_max_bytes={limit:,}, "
            f"so training does not tokenize it itself: run `{prepare_command(cfg)}` first (add --workers N, or --slurm), "
            "then train with the same config; or prepare into a directory with --out DIR and train with data.prepared=DIR"
        )
    log(f"preparing {total / 1e6:.1f} MB of text into {out} ...")
    run_prepare_child(cfg, out)
    return out


def run_prepare_child(cfg, out: Path) -> None:
    """`bigtrain data prepare` in a child process; its `error:` line becomes ours."""
    import tempfile

    from bigtrain.config import dump_yaml

    with tempfile.TemporaryDirectory(prefix="bigtrain-prepare-") as tmp:
        # The config as it is now (callers such as `bigtrain eval` change it after loading).
        config = Path(tmp) / "config.yaml"
        config.write_text(dump_yaml(cfg))
        cmd = [sys.executable, "-m", "bigtrain", "data", "prepare", str(config), "--out", str(out)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "BIGTRAIN_DATA_ONLY": "1"}
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        error = None
        for line in child.stderr:
            if line.startswith("error: "):
                error = line[len("error: "):].rstrip("\n")
            else:
                sys.stderr.write(line)
        if child.wait() != 0:
            raise UserError(error or f"bigtrain data prepare failed with exit code {child.returncode}")


# --------------------------------------------------------------------------- reading for training


class ShardData:
    """A prepared dataset opened for training: the blocks of the sources in use (weights from
    data.sources, else from the manifest), the validation blocks, and the schedule."""

    def __init__(self, cfg, root: Path) -> None:
        from bigtrain.config import where_of
        from bigtrain.shards import ShardBlocks, check_fits, open_prepared

        key = "data.prepared" if cfg.data.prepared else ("data.sources" if cfg.data.sources is not None else "data.train_files")
        self.where = where_of(cfg, key)
        self.ds = open_prepared(root, self.where)
        self.names, self.weights = self._sources(cfg)
        lines = cfg.data.mode == "line_by_line"
        check_fits(self.ds, self.names, cfg.data.seq_len, self.where, lines)
        self._check_tokenizer(cfg)
        self.seq_len, self.seed = cfg.data.seq_len, cfg.train.seed
        self.valid_fraction = cfg.data.valid_fraction
        self.train = ShardBlocks([self.ds.sources[n] for n in self.names], cfg.data.seq_len, lines)
        self.valid = ShardBlocks([self.ds.valid], cfg.data.seq_len, lines) if self.ds.valid is not None else self.train
        self.tokenizer_dir, self.vocab_size = self.ds.tokenizer_dir, self.ds.vocab_size
        # The hold-out blocks depend on the seed and the block counts only, not on the batch.
        self.valid_ids = np.arange(len(self.valid)) if self.ds.valid is not None else self.schedule(1, 1, 1, 0, self.seed).valid_ids()

    def _sources(self, cfg) -> tuple[list[str], list[float]]:
        from bigtrain.config import source_specs

        if cfg.data.sources is not None or not cfg.data.prepared:
            specs = source_specs(cfg)
            return [s.name for s in specs], [s.weight for s in specs]
        entries = self.ds.manifest["sources"]
        return list(entries), [float(e.get("weight", 1.0)) for e in entries.values()]

    def _check_tokenizer(self, cfg) -> None:
        from bigtrain.data import resolve_tokenizer_dir
        from bigtrain.shards import tokenizer_hash

        given = resolve_tokenizer_dir(cfg)
        made_with = self.ds.manifest["tokenizer"]
        if given is not None and tokenizer_hash(given) != made_with["sha256"]:
            raise UserError(
                f"{self.where}: {self.ds.root} was tokenized with another tokenizer than {given} "
                f"(sha256 {made_with['sha256'][:12]}..., made from {made_with.get('source', '?')}); prepare it again with this tokenizer"
            )

    def schedule(self, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int):
        from bigtrain.mixture import MixtureSchedule

        self._schedule = MixtureSchedule(self.names, self.train.blocks, self.weights, global_batch, micro_batch, world_size, rank, seed,
                               valid_fraction=self.valid_fraction, valid_separate=self.ds.valid is not None)
        return self._schedule

    def progress(self, position: int) -> dict:
        """Cumulative samples and current epoch per source at sample `position` (metrics.jsonl)."""
        return {"source_samples": self._schedule.source_samples(position), "source_epochs": self._schedule.epochs(position)}

    def describe(self) -> str:
        parts = [f"{n} {b:,} blocks x{w:g}" for n, b, w in zip(self.names, self.train.blocks, self.weights)]
        return f"{sum(self.train.blocks):,} blocks ({'; '.join(parts)})" if len(parts) > 1 else f"{sum(self.train.blocks):,} blocks"
