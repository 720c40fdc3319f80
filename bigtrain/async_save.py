"""Asynchronous checkpoints (`train.async_save: true`): the step loop stops only for a snapshot.

A synchronous save (bigtrain.checkpoint.save) stops every rank until DeepSpeed's files are
written, fsynced and hashed. Here a save has two parts:

1. **Snapshot** (the step loop waits): DeepSpeed's `save_checkpoint` runs as always (its barriers,
   its tag check, its file names), but through `SnapshotEngine`, a checkpoint engine whose `save`
   copies the state into host memory instead of writing it: every tensor storage once (views keep
   their offsets and strides, an object seen twice stays one object), so the file written later is
   what `torch.save` would have written at this moment. On a GPU the copies go to pinned buffers,
   reused from one save to the next, and the device is synchronized once at the end. bigtrain's
   own small files (RNG states, trainer_state.json, hf/) are written into `.tmp-step_N` as in a
   synchronous save.
2. **Write** (a background thread per rank): the queued files are written by DeepSpeed's own
   engine (the same `torch.save` call and serialization setting), then fsynced and hashed. No
   collective runs on this thread.

**Commit** happens on the step loop, where collectives are safe: at the next log step (`poll`,
which does not wait) or before the next save, at the end of training, at a preemption stop and at
a divergence stop (`wait`). Every rank reports whether its writer is done (one small all-gather);
when all are, rank 0 seals the files no writer listed (DeepSpeed's copied zero_to_fp32.py,
bigtrain's own files), writes the manifest, renames `.tmp-step_N` to `step_N`, points `latest` at
it and prunes (keep_last) - exactly the synchronous save's commit. So `bigtrain export`,
`zero_to_fp32.py`, universal conversion and resume see the same layout.

At most one save is in flight per rank: a save first waits for the previous one to commit (the
wait is recorded as `checkpoint_wait_s`). A writer that fails (a full disk, an I/O error) is
reported at the next commit point as the same `CheckpointWriteError` a synchronous save raises,
after the partial `.tmp-` directory is removed; the previous checkpoint is untouched. A process
killed while a write is in flight leaves a `.tmp-` directory, which is never taken for a
checkpoint (it has no manifest and the wrong name) and which the next save removes.

Host memory: the snapshot holds a copy of this rank's part of the checkpoint (model states on the
ranks that write them, this rank's optimizer shard) for as long as the write takes, in buffers
kept for the next save. That is why `train.async_save` is off by default (README).
"""

from __future__ import annotations

import copy
import enum
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bigtrain import faults
from bigtrain.checkpoint import (TMP_PREFIX, CheckpointWriteError, _commit, _files, _is_write_failure, _reason, _seal_files,
                                 _write_agreed, prune, tag_for)

try:  # the base class DeepSpeed's engine expects; imported lazily by the trainer anyway
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
except ImportError:  # pragma: no cover - DeepSpeed is a dependency
    CheckpointEngine = object  # type: ignore[assignment,misc]

# Leaves copied as they are (immutable) when a state is snapshotted.
_ATOMS = (type(None), bool, int, float, complex, str, bytes, enum.Enum)


class HostBuffers:
    """Host copies of tensor storages, kept from one save to the next (a save's storages come in
    the same order each time, so the k-th one reuses the k-th buffer when its size matches)."""

    def __init__(self) -> None:
        self._buffers: list = []
        self._next = 0
        self.bytes = 0  # host memory held by the buffers

    def begin(self) -> None:
        self._next = 0

    def _buffer(self, nbytes: int, pin: bool):
        import torch

        k, self._next = self._next, self._next + 1
        if k < len(self._buffers) and self._buffers[k].nbytes() == nbytes:
            return self._buffers[k]
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).untyped_storage()
        if k < len(self._buffers):
            self.bytes -= self._buffers[k].nbytes()
            self._buffers[k] = buf
        else:
            self._buffers.append(buf)
        self.bytes += nbytes
        return buf

    def snapshot(self, obj: Any, memo: Optional[dict] = None, storages: Optional[dict] = None) -> Any:
        """`obj` with every tensor replaced by a host copy of the same view of a copied storage."""
        import torch

        memo = {} if memo is None else memo
        storages = {} if storages is None else storages
        if isinstance(obj, _ATOMS) or isinstance(obj, (torch.dtype, torch.device, torch.Size)):
            return obj
        if id(obj) in memo:
            return memo[id(obj)]
        if torch.is_tensor(obj):
            out = self._tensor(obj, storages)
        elif isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the mapping's type (OrderedDict) and attributes
            out.clear()
            memo[id(obj)] = out
            out.update((k, self.snapshot(v, memo, storages)) for k, v in obj.items())
            return out
        elif isinstance(obj, list):
            out = []
            memo[id(obj)] = out
            out.extend(self.snapshot(v, memo, storages) for v in obj)
            return out
        elif isinstance(obj, tuple):
            items = [self.snapshot(v, memo, storages) for v in obj]
            out = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        else:  # DeepSpeed's plain-data objects (a loss scaler's numbers): small
            out = copy.deepcopy(obj)
        memo[id(obj)] = out
        return out

    def _tensor(self, t, storages: dict):
        import torch

        src = t.untyped_storage()
        key = (src.device, src.data_ptr(), src.nbytes())
        host = storages.get(key)
        if host is None:
            host = self._buffer(src.nbytes(), pin=src.device.type == "cuda")
            host.copy_(src, non_blocking=True)
            storages[key] = host
        view = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(view, requires_grad=t.requires_grad)
        # torch.save records requires_grad (ZeRO's fp32 partitions have it): the snapshot keeps it.
        return view.requires_grad_(t.requires_grad)


class SnapshotEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine during an asynchronous save: `save` snapshots and queues the
    file; otherwise (synchronous saves, loads) everything goes to the engine it wraps."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, "bigtrain-snapshot"
        self.capturing = False
        self.queued: list[tuple[str, Any]] = []
        self.buffers = HostBuffers()

    def create(self, info) -> None:
        self.inner.create(info)

    def makedirs(self, path, exist_ok=False) -> None:
        self.inner.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str) -> None:
        if not self.capturing:
            return self.inner.save(state_dict, path)
        self.queued.append((path, self.buffers.snapshot(state_dict)))
        return None

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def commit(self, info):
        return True if self.capturing else self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank) -> bool:
        return self.inner.is_data_parallel_writer(dp_rank)

    def preserves_storage_sharing(self) -> bool:
        return self.inner.preserves_storage_sharing()


@dataclass
class Pending:
    """One save in flight on this rank."""

    step: int
    tmp: Path
    final: Path
    started: float  # perf_counter when the save began (blocking part included)
    files: list  # [(path, snapshot)] for the writer
    note: dict = field(default_factory=dict)  # the trainer's: what to do once it commits (best, ...)
    entries: Optional[dict] = None  # {relative path: {"size", "sha256"}} once written and sealed
    error: Optional[str] = None
    thread: Optional[threading.Thread] = None


class AsyncSaver:
    """This rank's side of asynchronous saves (module docstring): `start`, `poll`, `wait`."""

    def __init__(self, engine, root: Path, rank: int, keep_last: int, verify: bool = True) -> None:
        self.snap = SnapshotEngine(engine.checkpoint_engine)
        engine.checkpoint_engine = self.snap
        self.engine, self.root, self.rank, self.keep_last, self.verify = engine, Path(root), rank, keep_last, verify
        self.pending: Optional[Pending] = None

    def start(self, state: dict, hf_config, tokenizer, note: Optional[dict] = None) -> Path:
        """The blocking part of a save (collective): snapshot, then hand the files to a writer."""
        import torch.distributed as dist

        if self.pending is not None:
            raise RuntimeError("AsyncSaver.start: a save is still in flight (wait for it first)")
        t0 = time.perf_counter()
        tag = tag_for(state["step"])
        tmp, final = self.root / (TMP_PREFIX + tag), self.root / tag
        self.snap.capturing, self.snap.queued = True, []
        self.snap.buffers.begin()
        try:
            failed = _write_agreed(self.engine, self.root, tmp, state, self.rank, hf_config, tokenizer)
        finally:
            self.snap.capturing = False
        if failed is not None:
            self.snap.queued = []
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            raise CheckpointWriteError(state["step"], self.root, failed)
        _synchronize()
        p = Pending(state["step"], tmp, final, t0, self.snap.queued, dict(note or {}))
        self.snap.queued = []
        p.thread = threading.Thread(target=self._write, args=(p,), name=f"bigtrain-checkpoint-writer-{tag}")
        p.thread.start()
        self.pending = p
        return final

    def _write(self, p: Pending) -> None:
        """The writer thread: DeepSpeed's files, then fsync and hash them (no collectives here)."""
        try:
            faults.slow_save(p.step, self.rank)
            rels = []
            for path, snapshot in p.files:
                self.snap.inner.save(snapshot, path)
                rels.append(str(Path(path).relative_to(p.tmp)))
            p.files = []  # the buffers stay for the next save; the structures go
            p.entries = _seal_files(p.tmp, rels, self.verify)
        except BaseException as e:  # noqa: BLE001 - reported at the next commit point, on every rank
            why = _reason(e, self.root) if _is_write_failure(e) else f"{type(e).__name__}: {e}"
            p.error, p.files = f"rank {self.rank}: {why}", []

    def poll(self) -> Optional[Pending]:
        """Commit the save in flight if every rank's writer is done (collective; never waits)."""
        return self._land(wait=False)

    def wait(self) -> Optional[Pending]:
        """Wait for the save in flight and commit it (collective)."""
        return self._land(wait=True)

    def join(self) -> None:
        """This rank's writer finished (no collective: for exits where the ranks may not agree)."""
        if self.pending is not None and self.pending.thread is not None:
            self.pending.thread.join()

    def _land(self, wait: bool) -> Optional[Pending]:
        import torch.distributed as dist

        p = self.pending
        if p is None:  # the same on every rank: saves start together
            return None
        if wait:
            p.thread.join()
        done = not p.thread.is_alive()
        reports: list = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (done, p.error, p.entries if done else None))
        if not all(d for d, _, _ in reports):
            return None
        self.pending = None
        errors = [e for _, e, _ in reports if e]
        if errors:
            if self.rank == 0:
                shutil.rmtree(p.tmp, ignore_errors=True)
            dist.barrier()
            raise CheckpointWriteError(p.step, self.root, "; ".join(errors))
        outcome = [self._commit(p, {rel: e for _, _, entries in reports for rel, e in entries.items()}) if self.rank == 0 else None]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise CheckpointWriteError(p.step, self.root, outcome[0])
        p.note["total_s"] = time.perf_counter() - p.started
        return p

    def _commit(self, p: Pending, entries: dict) -> Optional[str]:
        """Rank 0: seal what no writer listed, write the manifest, rename, prune. The error, if any."""
        try:
            rest = [str(f.relative_to(p.tmp)) for f in _files(p.tmp) if str(f.relative_to(p.tmp)) not in entries]
            entries.update(_seal_files(p.tmp, rest, self.verify))
            _commit(p.tmp, p.final, entries, self.verify)
        except OSError as e:
            shutil.rmtree(p.tmp, ignore_errors=True)
            return f"rank 0: {_reason(e, self.root)}"
        prune(self.root, self.keep_last, upto=p.step)
        return None


def _synchronize() -> None:
    """Wait for the device-to-host copies of the snapshot (pinned, non-blocking) to land."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
