"""Checkpoints: DeepSpeed's engine checkpoint plus bigtrain's trainer state, under output_dir/checkpoints/.

Layout of one checkpoint, `checkpoints/step_00000100/`:
- DeepSpeed's files (model states, ZeRO optimizer shards), written by `engine.save_checkpoint`;
- `trainer_state.json`: step, samples and tokens seen (the data position), world size, ZeRO stage;
- `rng_rank{R}.pt`: each rank's RNG states (torch, numpy, python), so dropout resumes exactly;
- `hf/`: the model's config.json and the tokenizer, so `bigtrain export` needs nothing else;
- `manifest.json`: every file above with its size and SHA-256.
`checkpoints/latest` names the newest one.

Crash safety: a checkpoint is written into `checkpoints/.tmp-step_N/`, every file is fsynced and
listed in the manifest, and only then is the directory renamed to `step_N` (an atomic rename)
and `latest` replaced (write, fsync, rename). A save killed at any point leaves either the
previous checkpoints untouched plus a `.tmp-` directory (removed by the next save), or a complete
new one. On resume each candidate is checked against its manifest, newest first; a damaged one is
skipped with the reason, never loaded.

Sealing in parallel: fsync and SHA-256 are the slow part of a save (a 7B model's checkpoint is
~112 GB), so every rank seals an equal share instead of rank 0 reading everything while the
others wait. The share is not "the files this rank wrote": DeepSpeed decides its file names
(per stage, precision, pipeline and MoE layout) and also copies files with plain `copyfile`
(zero_to_fp32.py), so a list of a rank's own writes would depend on DeepSpeed's internals, and
snapshotting the directory before and after this rank's writes races with the other ranks'. It
would also be unbalanced: rank 0 writes the whole model states on top of its optimizer shard.
Instead, after the barrier that follows every write, rank 0 lists the directory once and
broadcasts the list (one listing, so every rank splits the same list even where a shared file
system caches directory entries per node); every rank splits it the same way, largest file first
to the least-loaded rank (`_split`), and fsyncs and hashes its share in a few threads (hashlib and
file reads release the GIL). The entries are gathered on rank 0, which writes the manifest and
renames as before. fsync flushes a file however it was written, so one rank may fsync another's
file; like the single-rank scheme it replaces, this needs every rank to see the checkpoint
directory (a shared file system across nodes). `save(verify=False)` fsyncs the same way but
skips hashing: its manifest has sizes only (`"sha256": null`, `"checksums": false`), and
`check_checkpoint` then checks sizes, which catches truncated and missing files, not flipped bytes.

Resume: `choose_resume` checks candidates on one rank, which broadcasts its verdict; every rank
re-hashing every candidate would read the checkpoint world-size times over.

Safe loading: bigtrain reads its own files with `torch.load(weights_only=True)`. DeepSpeed's
loader unpickles freely, so before it runs every pickle in the checkpoint is scanned for classes
outside torch's weights-only allowlist plus DeepSpeed's own plain-data classes below; anything
else is refused unless the user passes `--trust-checkpoint`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from bigtrain.errors import UserError

TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


MANIFEST = "manifest.json"
# Upper bound of a checkpoint's size per parameter: weights (4 bytes in fp32), the fp32 master
# copy that ZeRO and mixed precision keep (4), Adam's two moments (8).
BYTES_PER_PARAMETER = 16
TMP_PREFIX = ".tmp-"
# Threads per process that fsync and hash files (hashlib and reads release the GIL): a few keep a
# fast disk busy and use the cores a rank leaves idle while it waits.
HASH_THREADS = 4
HASH_MODES = ("split", "rank0")


def list_checkpoints(root: Path) -> list[Path]:
    """Every step_N directory, oldest first (complete or not: see `check_checkpoint`)."""
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda p: int(TAG_RE.match(p.name).group(1)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def _read_manifest(ckpt: Path) -> dict | str:
    """The manifest's {relative path: {"size", "sha256"}}, or why it cannot be used."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"manifest.json is unreadable ({e})"
    if not isinstance(files, dict):
        return "manifest.json is malformed (its files are not a mapping)"
    for rel, meta in files.items():
        size = meta.get("size") if isinstance(meta, dict) else None
        digest = meta.get("sha256") if isinstance(meta, dict) else None
        if type(size) is not int or not (digest is None or isinstance(digest, str)):
            return f"manifest.json is malformed (the entry of {rel})"
    return files


def has_checksums(ckpt: Path) -> bool:
    """Whether `ckpt`'s manifest has a SHA-256 for every file (False for save(verify=False))."""
    files = _read_manifest(ckpt)
    return isinstance(files, dict) and all(meta["sha256"] is not None for meta in files.values())


def check_checkpoint(ckpt: Path, checksums: bool = True, threads: int = HASH_THREADS) -> Optional[str]:
    """None if `ckpt` matches its manifest; otherwise why not, naming the file.

    Presence and sizes are checked first (cheap), then SHA-256s in `threads` threads. A file the
    manifest lists without a SHA-256 (a save with verify=False) gets the size check only.
    """
    files = _read_manifest(ckpt)
    if isinstance(files, str):
        return files
    try:
        for rel, meta in files.items():
            p = ckpt / rel
            if not p.is_file():
                return f"{rel} is missing"
            size = p.stat().st_size
            if size != meta["size"]:
                return f"{rel} has {size} bytes, the manifest says {meta['size']}"
        todo = [rel for rel, meta in files.items() if checksums and meta["sha256"] is not None]
        todo.sort(key=lambda rel: -files[rel]["size"])  # largest first: the threads finish together
        with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
            digests = dict(zip(todo, pool.map(lambda rel: _sha256(ckpt / rel), todo)))
    except OSError as e:
        return f"cannot be read ({e})"
    for rel, meta in files.items():  # the first mismatch in the manifest's order
        if rel in digests and digests[rel] != meta["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest"
    return None


def latest_checkpoint(root: Path, log: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest checkpoint that passes `check_checkpoint`; each one skipped is reported to `log`."""
    for ckpt in reversed(list_checkpoints(root)):
        problem = check_checkpoint(ckpt)
        if problem is None:
            return ckpt
        if log is not None:
            log(f"checkpoint {ckpt} is damaged: {problem}; skipping it")
    return None


def resolve_checkpoint(path: str | Path, what: str = "--resume", log: Optional[Callable[[str], None]] = None) -> Path:
    """A run's output_dir (-> its newest valid checkpoint) or one checkpoint directory."""
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        problem = check_checkpoint(p)
        if problem is not None:
            raise UserError(f"{what}: checkpoint {p} is damaged: {problem}")
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root, log)
        if found is not None:
            return found
    if not p.exists():
        raise UserError(f"{what}: {path} does not exist")
    raise UserError(f"{what}: no complete bigtrain checkpoint in {path} (expected a run's output_dir or a checkpoints/step_N directory)")


def choose_resume(resume: Optional[str], root: Path, log: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint a run resumes from: None (no --resume) -> None; "auto" -> the newest one
    under `root` that passes `check_checkpoint`, each one skipped reported to `log` (None if none
    is left); anything else -> `resolve_checkpoint` (a run's output_dir or one checkpoint).

    Run by ONE rank (rank 0), whose verdict the others receive with `dist.broadcast_object_list`
    (an error too, so that every rank stops): checking hashes every candidate, and every rank
    doing it would read the same checkpoint world-size times over while the GPUs wait.
    """
    if not resume:
        return None
    found = latest_checkpoint(root, log) if resume == "auto" else resolve_checkpoint(resume, log=log)
    if found is not None and not has_checksums(found):
        log(f"checkpoint {found} was saved without checksums (verify=False): only its files' presence and sizes were checked")
    return found


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def _rng_state() -> dict:
    """RNG states as tensors, ints and tuples only, so they load with weights_only=True."""
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`: readers see the old or the new content, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _seal_file(path: Path, verify: bool) -> dict:
    """fsync one file; its manifest entry: the size, and the SHA-256 unless `verify` is False."""
    h = hashlib.sha256() if verify else None
    with open(path, "rb") as f:
        if h is not None:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        os.fsync(f.fileno())
        size = os.fstat(f.fileno()).st_size
    return {"size": size, "sha256": h.hexdigest() if h is not None else None}


def _seal_files(tmp: Path, rels: list[str], verify: bool, threads: int = HASH_THREADS) -> dict[str, dict]:
    """`_seal_file` on each of `rels` (paths relative to `tmp`) in up to `threads` threads."""
    with ThreadPoolExecutor(max(1, min(threads, len(rels)))) as pool:
        return dict(zip(rels, pool.map(lambda rel: _seal_file(tmp / rel, verify), rels)))


def _split(files: list[tuple[str, int]], world: int) -> list[list[str]]:
    """Deal (relative path, size) pairs out to `world` ranks: largest first, each to the rank with
    the fewest bytes so far (the lowest rank on a tie). Every rank computes the same shares."""
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for rel, size in sorted(files, key=lambda f: (-f[1], f[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(rel)
        load[r] += size
    return shares


def _seal_shares(tmp: Path, rank: int, world: int, verify: bool, timings: Optional[dict]) -> tuple[Optional[dict], Optional[str]]:
    """Collective: every rank seals its `_split` share of rank 0's listing of `tmp`. Returns every
    file's manifest entry on rank 0 (None elsewhere), or the ranks' errors, the same on every rank."""
    import torch.distributed as dist

    listing: list = [None]
    if rank == 0:
        try:
            listing[0] = [(str(p.relative_to(tmp)), p.stat().st_size) for p in _files(tmp)]
        except OSError as e:
            listing[0] = f"rank 0: {e}"
    dist.broadcast_object_list(listing, src=0)
    if isinstance(listing[0], str):
        return None, listing[0]
    share = _split(listing[0], world)[rank]
    t0 = time.perf_counter()
    try:
        mine, error = _seal_files(tmp, share, verify), None
    except OSError as e:  # reported by every rank below, so that no rank waits for the others
        mine, error = {}, f"rank {rank}: {e}"
    if timings is not None:
        sizes = dict(listing[0])
        timings.update(share_files=len(share), share_bytes=sum(sizes[rel] for rel in share), share_s=time.perf_counter() - t0)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, error))
    errors = [e for _, e in gathered if e is not None]
    if errors:
        return None, "; ".join(errors)
    return ({rel: entry for m, _ in gathered for rel, entry in m.items()} if rank == 0 else None), None


def _seal_rank0_hashes_all(tmp: Path, verify: bool = True) -> dict[str, dict]:
    """The scheme `save` used before per-rank sealing, kept for `bigtrain bench checkpoint`:
    rank 0 alone fsyncs and hashes every file, one after another, while the other ranks wait."""
    return {str(p.relative_to(tmp)): _seal_file(p, verify) for p in _files(tmp)}


def _commit(tmp: Path, final: Path, files: dict[str, dict], verify: bool) -> None:
    """Write `tmp`'s manifest, fsync its directories, rename it to `final`, point `latest` at it."""
    manifest = {"files": dict(sorted(files.items())), "checksums": verify, "written_at": time.time()}
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(d)
    replaced = None
    if final.exists():  # a damaged checkpoint of the same step, skipped at resume: replace it
        replaced = final.with_name(TMP_PREFIX + "replaced-" + final.name)
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    tmp.rename(final)
    _fsync_dir(final.parent)
    write_atomic(final.parent / "latest", final.name)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (a full disk, an I/O error) on some rank; every rank
    raises it alike, after the partial `.tmp-` directory was removed."""

    def __init__(self, step: int, root: Path, reason: str) -> None:
        super().__init__(f"could not write checkpoint step {step} to {root}: {reason}")
        self.step, self.root, self.reason = step, root, reason


def _is_write_failure(e: BaseException) -> bool:
    """An OSError, or torch.save's RuntimeError when its writer fails (a full disk shows as
    "[enforce fail at inline_container.cc] ... unexpected pos" or "PytorchStreamWriter failed")."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(k in str(e) for k in ("inline_container", "PytorchStreamWriter", "file write failed")))


def _reason(e: BaseException, root: Path) -> str:
    free = shutil.disk_usage(root).free if root.exists() else 0
    if getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or free < (1 << 20):
        return f"no space left on the device ({free / 1e6:.1f} MB free)"
    return f"{getattr(e, 'strerror', None) or str(e).splitlines()[0]} ({free / 1e6:.1f} MB free)"


def _write_agreed(engine, root: Path, tmp: Path, state: dict, rank: int, hf_config, tokenizer) -> Optional[str]:
    """Write every rank's files; returns the first failure of any rank (the same on all ranks).

    A rank that fails inside DeepSpeed's save still joins the barrier that closes it, so the
    ranks that did not fail are not left waiting there; then all ranks exchange their outcome.
    """
    import torch.distributed as dist

    error, joined = None, True
    try:
        _write(engine, root, tmp, state, rank, hf_config, tokenizer)
    except BaseException as e:  # noqa: BLE001 - only write failures are handled; the rest re-raised
        if not _is_write_failure(e):
            raise
        error, joined = f"rank {rank}: {_reason(e, root)}", getattr(e, "_after_deepspeed", False)
    if not joined:
        dist.barrier()  # DeepSpeed's closing barrier, which the failed save did not reach
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _write(engine, root: Path, tmp: Path, state: dict, rank: int, hf_config, tokenizer) -> None:
    """Every rank's files of one checkpoint, into `tmp` (collective)."""
    import torch
    import torch.distributed as dist

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TMP_PREFIX + "step_*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"bigtrain": state}, save_latest=False)
    try:
        _write_own(tmp, state, rank, hf_config, tokenizer, torch)
    except BaseException as e:
        e._after_deepspeed = True  # type: ignore[attr-defined]
        raise


def _write_own(tmp: Path, state: dict, rank: int, hf_config, tokenizer, torch) -> None:
    """bigtrain's own files of a checkpoint (after DeepSpeed's)."""
    from bigtrain import faults

    faults.maybe_enospc_in_save(state["step"], rank)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        hf = tmp / "hf"
        hf.mkdir(exist_ok=True)
        hf_config.save_pretrained(str(hf))
        # The tokenizer object, not its source directory: a pretrained model's directory also
        # holds its weights, which must never travel into the checkpoint or the export.
        tokenizer.save_pretrained(str(hf))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))


def save(engine, root: Path, state: dict, rank: int, hf_config, tokenizer, keep_last: int, verify: bool = True, *,
         hash_mode: str = "split", timings: Optional[dict] = None) -> Path:
    """Save on every rank (DeepSpeed checkpoints are collective); crash-safe, see the module doc.

    verify=False fsyncs without hashing (a manifest of sizes only). hash_mode="rank0" is the former
    scheme (rank 0 alone seals every file), kept for `bigtrain bench checkpoint`. A `timings` dict
    receives this rank's seconds writing ("write_s") and sealing ("seal_s"), and its share
    ("share_files", "share_bytes", "share_s"; split mode only).
    """
    import torch.distributed as dist

    from bigtrain import faults

    if hash_mode not in HASH_MODES:
        raise ValueError(f"hash_mode must be one of {', '.join(HASH_MODES)}, got {hash_mode!r}")
    tag = tag_for(state["step"])
    tmp, final = root / (TMP_PREFIX + tag), root / tag
    t0 = time.perf_counter()
    failed = _write_agreed(engine, root, tmp, state, rank, hf_config, tokenizer)  # also: every rank's files are written
    if failed is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise CheckpointWriteError(state["step"], root, failed)
    t1 = time.perf_counter()
    if rank == 0:
        faults.maybe_kill_in_save(state["step"])
    files, error = _seal_shares(tmp, rank, dist.get_world_size(), verify, timings) if hash_mode == "split" else (None, None)
    if rank == 0 and error is None:
        try:
            _commit(tmp, final, files if files is not None else _seal_rank0_hashes_all(tmp, verify), verify)
        except OSError as e:
            error = f"rank 0: {e}"
    outcome = [error]
    dist.broadcast_object_list(outcome, src=0)  # every rank fails alike, none waits for the others
    if outcome[0] is not None:
        raise OSError(f"checkpoint {final}: sealing {tmp.name} failed: {outcome[0]}")
    if timings is not None:
        timings.update(write_s=t1 - t0, seal_s=time.perf_counter() - t1)
    if rank == 0:
        prune(root, keep_last, upto=state["step"])
    return final


# DeepSpeed's own classes in its checkpoints: plain data (a loss scaler's numbers, an enum, a
# named tuple of offsets). Any other class outside torch's weights-only allowlist is refused.
DEEPSPEED_DATA_CLASSES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def load_weights_only(path: Path, mmap: bool = False) -> Any:
    """torch.load with the weights-only unpickler, allowing DeepSpeed's plain-data classes."""
    import importlib

    import torch

    classes = []
    for name in DEEPSPEED_DATA_CLASSES:
        module, _, attr = name.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    with torch.serialization.safe_globals(classes):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def check_pickles(ckpt: Path, what: str = "--resume") -> None:
    """Refuse a checkpoint whose pickles would run code other than plain-data construction."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for p in sorted(ckpt.rglob("*.pt")):
        try:
            unsafe = set(get_unsafe_globals_in_checkpoint(str(p))) - DEEPSPEED_DATA_CLASSES
        except Exception as e:  # noqa: BLE001 - not torch's zip format: cannot be inspected
            unsafe = {f"<not inspectable: {type(e).__name__}>"}
        if unsafe:
            raise UserError(
                f"{what}: {p} needs arbitrary unpickling ({', '.join(sorted(unsafe))}), which can run code; "
                "bigtrain refuses to load it. If you trust where it came from, pass --trust-checkpoint"
            )


BEST_POINTER = "best.json"


def read_best(root: Path) -> Optional[dict]:
    """The best evaluation's checkpoint ({"tag", "metric", "value", "step"}), if one was recorded."""
    p = root / BEST_POINTER
    return json.loads(p.read_text()) if p.is_file() else None


def write_best(root: Path, best: dict) -> None:
    tmp = root / (BEST_POINTER + ".tmp")
    tmp.write_text(json.dumps(best))
    tmp.replace(root / BEST_POINTER)


def prune(root: Path, keep_last: int, upto: Optional[int] = None) -> None:
    """Delete all but the newest keep_last checkpoints up to step `upto`, never the best one.

    Checkpoints after `upto` belong to a timeline this run abandoned by resuming from an older
    one (the newer was damaged, or the user chose): they are replaced as the run reaches them.
    """
    found = [p for p in list_checkpoints(root) if upto is None or int(TAG_RE.match(p.name).group(1)) <= upto]
    best = (read_best(root) or {}).get("tag")
    for old in found[: max(0, len(found) - keep_last)]:
        if old.name == best:
            continue
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.parent / (old.name + "_universal"), ignore_errors=True)


UNIVERSAL_SUFFIX = "_universal"


# Checkpoints smaller than this convert inside the calling process: DeepSpeed is imported there
# already, and a second interpreter costs ~4 CPU-seconds of imports. Larger ones convert in a
# process of their own, whose memory (every rank's fp32 states, merged) ends with it.
IN_PROCESS_BYTES = 1 << 30


def to_universal(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal (world-size independent) format, once."""
    out = ckpt.parent / (ckpt.name + UNIVERSAL_SUFFIX)
    if (out / "zero").is_dir():
        return out
    tmp = ckpt.parent / (".tmp-" + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    source = _sequence_parallel_view(ckpt)
    args = ["--input_folder", str(source or ckpt), "--output_folder", str(tmp),
            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    try:
        size = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
        failure = _ds_to_universal_here(args) if size < IN_PROCESS_BYTES else _ds_to_universal_process(args)
    finally:
        if source is not None:
            shutil.rmtree(source, ignore_errors=True)
    if failure is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--resume: converting {ckpt} to a universal checkpoint failed: {failure}")
    tmp.rename(out)
    return out


def _ds_to_universal_here(args: list[str]) -> Optional[str]:
    """DeepSpeed's ds_to_universal in this process (one worker each: it forks nothing); its
    progress output is kept off the run's log. None, or the failure's message."""
    import contextlib
    import io
    import sys

    from deepspeed.checkpoint import ds_to_universal

    argv, sys.argv = sys.argv, ["ds_to_universal", *args]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(ds_to_universal.parse_arguments())
    except Exception as e:  # noqa: BLE001 - any failure of the conversion is reported as one line
        return (str(e).strip().splitlines() or [type(e).__name__])[-1]
    finally:
        sys.argv = argv
    return None


def _ds_to_universal_process(args: list[str]) -> Optional[str]:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", *args], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    return ((r.stderr or r.stdout).strip().splitlines()[-1:] or ["unknown error"])[0]


def _sequence_parallel_view(ckpt: Path) -> Optional[Path]:
    """A ZeRO-1/2 checkpoint saved under Ulysses records the sequence-parallel size as its
    tensor-parallel degree (DeepSpeed 0.19's sequence-parallel mpu answers the model-parallel
    queries), and ds_to_universal then looks for that many model-state files. Sequence
    parallelism splits no weight: a view of the checkpoint (links to its files, the model states
    rewritten with tp_degree 1) converts as it should. None when no view is needed."""
    import torch

    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if read_state(ckpt).get("sequence_parallel", 1) == 1 or not files:
        return None
    view = ckpt.parent / (TMP_PREFIX + "view-" + ckpt.name)
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    for p in ckpt.iterdir():
        (view / p.name).symlink_to(p.resolve())
    for p in files:
        states = torch.load(p, map_location="cpu", weights_only=False)  # already checked by check_pickles (or trusted)
        dims = states.get("checkpoint_parallel_dimensions") or {}
        if "tp_degree" in dims:
            dims["tp_degree"] = 1
        (view / p.name).unlink()
        torch.save(states, view / p.name)
    return view


def load(engine, ckpt: Path, rank: int, universal: bool = False, trust: bool = False) -> dict[str, Any]:
    """Load engine weights, optimizer and scheduler, and this rank's RNG; returns the trainer state."""
    import torch

    if not trust:
        check_pickles(ckpt)

    tag = ckpt.name + UNIVERSAL_SUFFIX if universal else ckpt.name
    # DeepSpeed 0.19.8's ZeRO-3 universal load gives every optimizer group the first group's
    # settings (stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3): norms and biases
    # would then decay. Each group's weight decay is bigtrain's choice (engine.param_groups): kept.
    decay = [g.get("weight_decay") for g in engine.optimizer.param_groups] if universal else None
    path, client = engine.load_checkpoint(str(ckpt.parent), tag=tag)
    if path is None:
        raise UserError(f"--resume: DeepSpeed could not load the checkpoint in {ckpt.parent / tag}")
    for group, wd in zip(engine.optimizer.param_groups, decay or []):
        group["weight_decay"] = wd
    rng = ckpt / f"rng_rank{rank}.pt"
    # At another world size the ranks hold other samples: their old RNG streams do not apply.
    if rng.is_file() and not universal:
        _set_rng_state(torch.load(rng, weights_only=True))
    return read_state(ckpt)
