"""`bigtrain data prepare`: tokenize every source into token shards with datatrove.

Only this module imports datatrove; training reads the shards with bigtrain.shards.

The pipeline of one source is two datatrove steps, run as `tasks` independent tasks by a
`LocalPipelineExecutor` (`--workers` processes) or a `SlurmPipelineExecutor` (a job array):

1. `ReadDocuments`: task t reads its contiguous slice of the source's files (sorted, cut into
   `tasks` slices of about equal bytes) with bigtrain.documents, which checks as it reads. Slices
   are contiguous so that task 0's tokens, then task 1's, ... are the files in their order: the
   stream, and so every block, does not depend on the number of tasks.
2. `WriteTokens` (datatrove's `DocumentTokenizer`, without its shuffling): encodes batches of
   documents with the `tokenizers` library (long documents piecewise, as bigtrain always did),
   drops documents with no tokens, appends EOS to each, and writes raw uint16/uint32 tokens and
   a uint64 document-end index per task (datatrove's `TokenizedFile`, with the ends held in a
   compact array: 8 bytes per document, the only thing that grows with a task's input).

datatrove marks a task complete after its last step returns (`logs/NAME/completions/`); a rerun
skips completed tasks, so an interrupted preparation resumes. Each task also leaves a summary
(tokens, documents, input bytes, replaced bytes) and, on bad input, the error message, which the
parent reports as bigtrain's usual one-line `error:`. When every task of every source has finished
and every file has the size its summary says, the manifest is written: its presence means the
directory is complete.

datatrove's executors start workers with forkserver: a script that calls `prepare_dataset` must
guard its entry point with `if __name__ == "__main__":` (bigtrain's CLI does).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer, TokenizedFile

from bigtrain.corpus import SMALL_CORPUS, SourceJob
from bigtrain import faults
from bigtrain.data import DOC_PIECE_CHARS, long_pieces
from bigtrain.errors import UserError
from bigtrain.shards import FORMAT, MANIFEST, tokenizer_hash

# A batch handed to the tokenizer: at most this many documents or characters.
BATCH_DOCS, BATCH_CHARS = 1024, 1 << 20
# Slurm refuses or mishandles very large job arrays (datatrove issue #238): at most this many per job.
MAX_ARRAY = 1000


# --------------------------------------------------------------------------- what to do


def task_slices(sizes: list[int], tasks: int) -> list[tuple[int, int]]:
    """Cut files (by their sizes, in order) into `tasks` contiguous [lo, hi) slices of about equal
    bytes; slices may be empty when there are fewer files than tasks."""
    total = sum(sizes) or 1
    bounds, acc, f = [0], 0, 0
    for t in range(1, tasks):
        target = total * t / tasks
        while f < len(sizes) and acc + sizes[f] / 2 <= target:
            acc += sizes[f]
            f += 1
        bounds.append(max(f, bounds[-1]))
    bounds.append(len(sizes))
    return [(bounds[i], bounds[i + 1]) for i in range(tasks)]


# --------------------------------------------------------------------------- the two steps


def read_documents(job: SourceJob, path: str, kind: str, settings: dict):
    """The documents of one file of `job`, checked as they are read (bigtrain.documents)."""
    from bigtrain.documents import documents

    try:
        docs = documents(Path(path), kind, job.sample_by, job.text_field, settings["max_line_bytes"], settings["on_decode_error"])
        yield from (filter(str.strip, docs) if settings.get("skip_blank") else docs)
    except OSError as e:  # unreadable (permissions, /proc files, I/O errors)
        raise UserError(f"{job.key}: cannot read {path}: {e.strerror or e}") from None


class ReadDocuments(PipelineStep):
    """datatrove reader step for bigtrain's inputs: text files, JSON lines, Parquet, `datasets`
    directories. Task `rank` reads files [lo, hi) of its slice, in order."""

    name = "bigtrain reader"
    type = "📖 - READER"

    def __init__(self, job: SourceJob, tasks: int, settings: dict) -> None:
        super().__init__()
        self.job, self.tasks = job, tasks
        self.settings = {k: settings[k] for k in ("max_line_bytes", "on_decode_error", "skip_blank") if k in settings}
        self.slices = task_slices([b for _, _, b in job.files], tasks)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        lo, hi = self.slices[rank]
        for path, kind, _ in self.job.files[lo:hi]:
            for i, text in enumerate(read_documents(self.job, path, kind, self.settings)):
                self.stat_update("documents")
                yield Document(text=text, id=f"{path}#{i}")


class _CompactTokenizedFile(TokenizedFile):
    """datatrove's TokenizedFile with the document ends in an array('Q') (8 bytes per document
    instead of a Python int each) and written in one piece."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.doc_ends = array.array("Q")

    def close(self) -> None:
        self.tokens_file.close()
        with self.output_folder.open(f"{self.filename}.index", mode="wb") as f:
            f.write(np.frombuffer(self.doc_ends, np.uint64).astype("<u8").tobytes())


def encode_long(tokenizer, text: str) -> list[np.ndarray]:
    """Token ids of one long document with a `tokenizers` tokenizer, piece by piece
    (bigtrain.data.long_pieces: the same ids as the whole text, bounded memory)."""
    return [np.asarray(e.ids, np.int64) for group in long_pieces(text) for e in tokenizer.encode_batch(group, add_special_tokens=False)]


def _batches(docs, max_docs: int = BATCH_DOCS, max_chars: int = BATCH_CHARS):
    """Documents in lists of at most max_docs documents or max_chars characters (a longer
    document comes alone)."""
    batch, chars = [], 0
    for doc in docs:
        if batch and (len(batch) >= max_docs or chars + len(doc.text) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc.text)
    if batch:
        yield batch


class WriteTokens(DocumentTokenizer):
    """datatrove's DocumentTokenizer writing bigtrain's stream: documents in their input order
    (no shuffling: the training schedule shuffles blocks), empty ones dropped, EOS after each."""

    name = "bigtrain tokens"

    def __init__(self, output_folder: str, tokenizer_file: str, eos_id: int, summary_dir: str, label: str) -> None:
        super().__init__(output_folder, tokenizer_file, shuffle_documents=False, save_final_metadata=False)
        self.eos_id, self.summary_dir, self.label = eos_id, summary_dir, label

    def write_unshuffled(self, data, filename: str):
        from bigtrain.documents import REPLACED

        out = _CompactTokenizedFile(self.output_folder, filename, save_index=True, token_size=self.token_size)
        dtype = np.dtype("<u4" if self.token_size == 4 else "<u2")
        eos = np.asarray([self.eos_id], np.int64)
        documents, with_text, replaced_before = 0, 0, REPLACED.count
        for batch in _batches(data):
            with self.track_time(unit="batch"):
                texts = [d.text for d in batch]
                short = [t for t in texts if len(t) <= DOC_PIECE_CHARS]
                encoded = iter(self.tokenizer.encode_batch(short, add_special_tokens=False)) if short else iter(())
                for text in texts:
                    with_text += bool(text) and not text.isspace()
                    parts = [np.asarray(next(encoded).ids, np.int64)] if len(text) <= DOC_PIECE_CHARS else encode_long(self.tokenizer, text)
                    if sum(len(p) for p in parts) == 0:
                        continue  # a document with no tokens gets no EOS either, as before
                    out.write_bytes(np.concatenate(parts + [eos]).astype(dtype).tobytes())
                    documents += 1
            faults.in_prepare_task(self._rank)  # tests: a task killed after writing part of its shard
        out.close()
        self.stat_update("tokens", value=len(out))
        self._summary = {"tokens": len(out), "documents": documents, "documents_with_text": with_text,
                         "replaced_bytes": REPLACED.count - replaced_before, "file": filename}
        return out

    def run(self, data, rank: int = 0, world_size: int = 1):
        self._rank = rank
        try:
            super().run(data, rank, world_size)
        except UserError as e:
            _write_json(Path(self.summary_dir) / f"{rank:05d}.error.json", {"error": str(e)})
            raise
        _write_json(Path(self.summary_dir) / f"{rank:05d}.json", self._summary)
        print(f"bigtrain data prepare: {self.label} task {rank + 1}/{world_size}: "
              f"{self._summary['documents']:,} documents, {self._summary['tokens']:,} tokens", file=sys.stderr, flush=True)
        return iter(())


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- task logs


def _task_log_to_file(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove's task logger, without its copy on stderr: a task's log (and the traceback of a
    failed task) stays in logs/NAME/logs/task_NNNNN.log; bad input reaches the user as one
    `error:` line from the parent."""
    from datatrove.utils.logging import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(logfile, level="DEBUG", format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}")
    return logfile


def _close_task_log(logfile) -> None:
    from datatrove.utils.logging import logger

    logger.complete()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    logfile.close()


def _quiet_datatrove() -> None:
    import datatrove.executor.base as base
    from datatrove.utils.logging import logger

    base.add_task_logger, base.close_task_logger = _task_log_to_file, _close_task_log
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


# Applied on import: in the CLI, and in every worker or Slurm task (they import this module to
# unpickle the pipeline before running it).
_quiet_datatrove()


# --------------------------------------------------------------------------- running the tasks


@dataclass
class SlurmOptions:
    partition: Optional[str] = None
    nodes: Optional[int] = None  # at most this many array tasks at once
    cpus_per_task: int = 1
    time: str = "04:00:00"
    mem_per_cpu_gb: int = 2
    wait: bool = False


def build_pipeline(job: SourceJob, out: Path, tasks: int, tokenizer_file: Path, eos_id: int, settings: dict) -> list:
    return [
        ReadDocuments(job, tasks, settings),
        WriteTokens(str(out / job.split / job.name), str(tokenizer_file), eos_id, str(_summary_dir(out, job)), job.label),
    ]


def _summary_dir(out: Path, job: SourceJob) -> Path:
    return out / "logs" / job.split / job.name / "bigtrain"


def _logging_dir(out: Path, job: SourceJob) -> Path:
    return out / "logs" / job.split / job.name


def run_local(pipeline: list, tasks: int, workers: int, logging_dir: Path) -> None:
    """All unfinished tasks of one source on this machine, `workers` at a time."""
    executor = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=max(1, min(workers, tasks)), logging_dir=str(logging_dir))
    try:
        executor.run()
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a failed worker: report bad input from its error file, else re-raise
        first_task_error(logging_dir, tasks, reraise=True)
        raise


def first_task_error(logging_dir: Path, tasks: int, reraise: bool = False) -> Optional[str]:
    for t in range(tasks):
        f = logging_dir / "bigtrain" / f"{t:05d}.error.json"
        if f.is_file() and not (logging_dir / "completions" / f"{t:05d}").is_file():
            message = json.loads(f.read_text())["error"]
            if reraise:
                raise UserError(message)
            return message
    return None


def run_slurm(pipeline: list, tasks: int, opts: SlurmOptions, logging_dir: Path, job_name: str) -> Optional[str]:
    """Submit the unfinished tasks of one source as Slurm job arrays (at most MAX_ARRAY tasks
    each); returns the job id, or None when every task had finished."""
    from datatrove.executor import SlurmPipelineExecutor

    class Executor(SlurmPipelineExecutor):
        def get_sbatch_args(self, max_array: int = 1) -> dict:
            # No partition given: leave the directive out (the cluster's default), not "None".
            return {k: v for k, v in super().get_sbatch_args(max_array).items() if v is not None and v != "None"}

    activate = Path(sys.prefix) / "bin" / "activate"
    executor = Executor(
        pipeline=pipeline, tasks=tasks, time=opts.time, partition=opts.partition, cpus_per_task=opts.cpus_per_task,
        mem_per_cpu_gb=opts.mem_per_cpu_gb, workers=opts.nodes or -1, job_name=job_name, logging_dir=str(logging_dir),
        venv_path=str(activate) if activate.is_file() else None, qos="", max_array_size=MAX_ARRAY, mail_type="NONE",
    )
    executor.run()
    return None if executor.job_id in (None, -1) else str(executor.job_id)


def slurm_jobs_running(job_name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i"], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"squeue failed: {out.stderr.strip() or out.returncode}")
    return out.stdout.split()


def wait_for_slurm(job_names: list[str], log: Callable, every: float = 5.0) -> None:
    """Until no job of ours is queued or running (Slurm's view; the completions are checked after)."""
    while True:
        running = [j for name in job_names for j in slurm_jobs_running(name)]
        if not running:
            return
        log(f"waiting for {len(running)} Slurm job(s) of {len(job_names)} source(s) ...")
        time.sleep(every)


# --------------------------------------------------------------------------- checking and the manifest


def collect(out: Path, job: SourceJob, tasks: int, itemsize: int) -> dict:
    """The manifest entry of one source, after checking that every task finished and that every
    file has the size its task reported."""
    logs = _logging_dir(out, job)
    error = first_task_error(logs, tasks)
    if error:
        raise UserError(error)
    missing = [t for t in range(tasks) if not (logs / "completions" / f"{t:05d}").is_file() or not (_summary_dir(out, job) / f"{t:05d}.json").is_file()]
    if missing:
        shown = ", ".join(str(t) for t in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise UserError(
            f"{job.key}: {len(missing)} of {tasks} tokenization tasks did not finish (tasks {shown}; logs in {logs}/logs); "
            "run the same `bigtrain data prepare` command again to run only those"
        )
    files, replaced, with_text = [], 0, 0
    for t in range(tasks):
        summary = json.loads((_summary_dir(out, job) / f"{t:05d}.json").read_text())
        rel = f"{job.split}/{job.name}/{summary['file']}"
        for path, size in ((out / rel, summary["tokens"] * itemsize), (out / (rel + ".index"), summary["documents"] * 8)):
            if not path.is_file() or path.stat().st_size != size:
                raise UserError(f"{path}: shard file is missing or has the wrong size (expected {size:,} bytes); remove {logs / 'completions' / f'{t:05d}'} and rerun")
        files.append({"path": rel, "tokens": summary["tokens"], "documents": summary["documents"], "bytes": summary["tokens"] * itemsize})
        replaced += summary["replaced_bytes"]
        with_text += summary["documents_with_text"]
    return {
        "inputs": job.inputs, "weight": job.weight, "sample_by": job.sample_by, "text_field": job.text_field,
        "input_files": len(job.files), "input_bytes": sum(b for _, _, b in job.files),
        "tokens": sum(f["tokens"] for f in files), "documents": sum(f["documents"] for f in files),
        "replaced_bytes": replaced, "documents_with_text": with_text, "files": files,
    }


# --------------------------------------------------------------------------- the tokenizer


def sample_texts(jobs: list[SourceJob], budget: int, seed: int, settings: dict):
    """Documents for tokenizer training: each training source gets its weight's share of `budget`
    characters, read from its files in a seeded random order (all files in order when the
    source fits its share, so a small corpus trains on all of it)."""
    train = [j for j in jobs if j.split == "train"]
    total_weight = sum(j.weight for j in train)
    for s, job in enumerate(train):
        share = budget * job.weight / total_weight
        order = range(len(job.files))
        if sum(b for _, _, b in job.files) > share:
            order = np.random.default_rng([seed, s]).permutation(len(job.files))
        taken = 0
        for i in order:
            path, kind, _ = job.files[i]
            for text in read_documents(job, path, kind, settings):
                yield text
                taken += len(text)
                if taken >= share:
                    break
            if taken >= share:
                break


def provide_tokenizer(plan: dict, jobs: list[SourceJob], out: Path, log: Callable) -> Path:
    """out/tokenizer: a copy of the given tokenizer, or one trained on a sample (kept on rerun)."""
    from bigtrain.tokenizer import load_tokenizer, train_bpe, train_wordpiece

    dest = out / "tokenizer"
    spec = plan["tokenizer"]
    if not (dest / "tokenizer.json").is_file():
        if "dir" in spec:
            tmp = out / ".tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tok = load_tokenizer(spec["dir"])
            shutil.copytree(spec["dir"], tmp, ignore=shutil.ignore_patterns(".*"))
            if not (tmp / "tokenizer.json").is_file():  # a slow-tokenizer directory: datatrove needs tokenizer.json
                tok.save_pretrained(str(tmp))
            os.replace(tmp, dest)
        else:
            t = spec["train"]
            texts = sample_texts(jobs, t["sample_bytes"], t["seed"], plan)
            name = "WordPiece" if t["kind"].startswith("wordpiece") else "byte-level BPE"
            (train_wordpiece if t["kind"].startswith("wordpiece") else train_bpe)(texts, t["vocab_size"], dest)
            # Said after training: bad input met in the sample stops it with the error line alone.
            log(f"trained a {name} tokenizer (vocab {t['vocab_size']}) on a sample of up to {t['sample_bytes'] / 1e6:.0f} MB of the sources")
    return dest


# --------------------------------------------------------------------------- the whole preparation


def _claim(out: Path, plan: dict) -> bool:
    """Start or continue a preparation in `out`; True when it is already complete. Refuses a
    directory that holds anything else, so nothing of the user's is overwritten."""
    plan_file = out / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old != plan:
            differs = next((k for k in plan if old.get(k) != plan[k]), "?")
            if differs == "tasks" and all(old.get(k) == plan[k] for k in plan if k != "tasks"):
                raise UserError(f"--out: {out} was started with tasks per source {old['tasks']}: rerun with the same --tasks (and --workers) to continue it")
            raise UserError(
                f"--out: {out} holds a preparation of other inputs or settings ('{differs}' differs from its plan.json); "
                "use another directory, or remove that one"
            )
        return (out / MANIFEST).is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out} exists and is not a bigtrain preparation; give a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(plan_file, plan)
    return False


def precheck(jobs: list[SourceJob], settings: dict) -> None:
    """Read a small corpus whole before anything is written or logged, so bad input stops the
    preparation with one `error:` line and no directory left behind. (A large corpus is checked
    by the tasks as they read it; their error then follows their progress lines.)"""
    for job in jobs:
        any_text = False
        for path, kind, _ in job.files:
            for text in read_documents(job, path, kind, settings):
                any_text = any_text or (bool(text) and not text.isspace())
        if not any_text:
            raise UserError(f"{_what(job)}: the data files hold no text (all empty or blank)")


def _what(job: SourceJob) -> str:
    return f"{job.key}: source '{job.name}'" if job.key.startswith("data.sources") else job.key


def tasks_per_source(jobs: list[SourceJob], tasks: Optional[int], workers: int) -> dict[str, int]:
    """--tasks per source (default: --workers), never more than the source has files."""
    return {j.label: max(1, min(tasks or workers, len(j.files))) for j in jobs}


def prepare_dataset(cfg, out: Optional[Path], workers: Optional[int] = None, tasks: Optional[int] = None,
                    slurm: Optional[SlurmOptions] = None, log: Callable = print) -> Optional[Path]:
    """Tokenize every source into `out` (default: the cache directory of this plan); returns the
    directory, or None when Slurm jobs were submitted and not waited for."""
    from bigtrain.corpus import cached_dir, plan_key, preparation_plan, source_jobs

    jobs = source_jobs(cfg)
    plan = preparation_plan(cfg, jobs)
    out = Path(out) if out else cached_dir(cfg, plan)
    if workers is None:  # a small corpus is quickest in one process (no worker pool to start)
        workers = 1 if sum(b for j in jobs for _, _, b in j.files) < SMALL_CORPUS else min(os.cpu_count() or 1, 8)
    counts = tasks_per_source(jobs, tasks, workers)
    if not (out / MANIFEST).is_file() and sum(b for j in jobs for _, _, b in j.files) < SMALL_CORPUS:
        precheck(jobs, plan)
    if _claim(out, {**plan, "tasks": counts}):
        log(f"{out} is already prepared")
        return out
    tok_dir = provide_tokenizer(plan, jobs, out, log)
    eos_id, vocab, itemsize = _tokenizer_facts(tok_dir)
    names = {j.label: f"bigtrain-prepare-{plan_key(plan)[:8]}-{j.split}-{j.name}" for j in jobs}
    submitted = []
    if slurm:
        running = [j for n in names.values() for j in slurm_jobs_running(n)]
        if running:
            raise UserError(f"Slurm jobs of this preparation are still queued or running ({', '.join(running)}); wait for them, or rerun with --wait")
    with _task_environment(slurm.cpus_per_task if slurm else max(1, (os.cpu_count() or 1) // max(1, workers))):
        for job in jobs:
            pipeline = build_pipeline(job, out, counts[job.label], tok_dir / "tokenizer.json", eos_id, plan)
            if slurm:
                job_id = run_slurm(pipeline, counts[job.label], slurm, _logging_dir(out, job), names[job.label])
                submitted += [job_id] if job_id else []
            else:
                log(f"tokenizing {job.label}: {len(job.files):,} file(s), {sum(b for _, _, b in job.files) / 1e6:,.1f} MB, "
                    f"{counts[job.label]} task(s) on {workers} worker(s) ...")
                run_local(pipeline, counts[job.label], workers, _logging_dir(out, job))
    if submitted and not slurm.wait:
        log(f"submitted Slurm job(s) {', '.join(submitted)}; when they finish, run the same command again to check them and write the manifest")
        return None
    if submitted:
        wait_for_slurm(list(names.values()), log)
    write_manifest(out, plan, jobs, counts, tok_dir, eos_id, vocab, itemsize, log)
    return out


@contextlib.contextmanager
def _task_environment(threads: int):
    """The environment the tasks start with (forkserver workers and Slurm jobs inherit it), set
    only while they are launched: offline, no torch/transformers in data-only processes
    (bigtrain/__init__.py), and `threads` tokenizer threads per process unless RAYON_NUM_THREADS
    is set already (benchmarks set 1 to measure scaling with processes)."""
    wanted = {"HF_HUB_OFFLINE": "1", "BIGTRAIN_DATA_ONLY": "1", "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS", str(threads))}
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _tokenizer_facts(tok_dir: Path) -> tuple[int, int, int]:
    """(EOS id, vocabulary size, bytes per token) as the shards will use them."""
    from tokenizers import Tokenizer

    from bigtrain.tokenizer import load_tokenizer, separator_id

    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    return separator_id(load_tokenizer(tok_dir)), vocab, 4 if vocab > 65536 else 2


def write_manifest(out: Path, plan: dict, jobs: list[SourceJob], counts: dict, tok_dir: Path, eos_id: int, vocab: int, itemsize: int, log: Callable) -> None:
    """Check every task of every source, then write manifest.json (last: it marks completion)."""
    entries = {j.label: collect(out, j, counts[j.label], itemsize) for j in jobs}
    for job in jobs:
        if entries[job.label]["documents_with_text"] == 0:
            raise UserError(f"{_what(job)}: the data files hold no text (all empty or blank)")
    replaced = sum(e["replaced_bytes"] for e in entries.values())
    if replaced:
        log(f"warning: replaced {replaced} undecodable byte(s) with U+FFFD (data.on_decode_error=replace)")
    spec = plan["tokenizer"]
    manifest = {
        "format": FORMAT,
        "tokenizer": {"dir": "tokenizer", "sha256": spec.get("sha256") or tokenizer_hash(tok_dir), "source": spec.get("dir", "trained by bigtrain"),
                      "vocab_size": vocab, "eos_id": eos_id},
        "dtype": "uint32" if itemsize == 4 else "uint16",
        "sources": {j.name: entries[j.label] for j in jobs if j.split == "train"},
        "valid": next((entries[j.label] for j in jobs if j.split == "valid"), None),
        "tasks": counts,
    }
    _write_json(out / MANIFEST, manifest)
    for j in jobs:
        e = entries[j.label]
        log(f"{j.label}: {e['documents']:,} documents, {e['tokens']:,} tokens in {len(e['files'])} file(s), {e['tokens'] * itemsize / max(e['input_bytes'], 1):.2f} bytes of shard per byte of input")
