"""Data: find files, turn model inputs into tensors, prefetch.

1. `resolve_sources` turns `data.train_files` (files, directories, globs, "@stdlib", or a
   `datasets` directory) into a list of `Source`s (one input file each). `bigtrain data prepare`
   (bigtrain/prepare.py, datatrove) tokenizes them into token shards that training reads by
   memory map (bigtrain/shards.py, bigtrain/corpus.py, docs/data.md): packed blocks, or with
   data.mode=line_by_line one padded example per line, from the same shards.
2. bigtrain.mixture's `MixtureSchedule` decides which samples form each global batch, for every
   task; `Prefetcher` builds the next steps' batches on a thread.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import threading
import time
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from bigtrain import faults
from bigtrain.errors import UserError

TEXT_EXTENSIONS = {".txt", ".text", ".md", ".py", ".rst", ".csv", ".tsv", ".c", ".h", ".js", ".html"}
JSON_EXTENSIONS = {".jsonl", ".json"}


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "text", "json" or "arrow"


# --------------------------------------------------------------------------- files


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources (no site-packages): ~30 MB every Python has."""
    root = Path(sysconfig.get_path("stdlib"))
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    # A few test files are deliberately in other encodings; the corpus is the UTF-8 ones.
    return [p for p in out if _is_utf8(p)]


def _is_utf8(p: Path) -> bool:
    try:
        p.read_bytes().decode("utf-8")
        return True
    except (UnicodeDecodeError, OSError):
        return False


def _is_arrow_dir(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def _kind(p: Path) -> Optional[str]:
    name = p.name.lower()
    for compressed in (".gz", ".zst"):  # data.jsonl.gz, data.jsonl.zst
        if name.endswith(compressed):
            name = name[: -len(compressed)]
    ext = os.path.splitext(name)[1]
    if ext in JSON_EXTENSIONS:
        return "json"
    if ext == ".parquet":
        return "parquet"
    if ext in TEXT_EXTENSIONS:
        return "text"
    return None


def resolve_sources(specs: list[str], key: str) -> list[Source]:
    """Expand files, directories, globs and '@stdlib' into sources; errors name the key."""
    sources: list[Source] = []
    for spec in specs:
        try:
            sources.extend(_resolve_one(spec, key))
        except OSError as e:  # e.g. a name too long for the file system, or a path through a file
            raise UserError(f"{key}: cannot read {spec}: {e.strerror or e}") from None
    if not sources:
        raise UserError(f"{key}: no data files given")
    return sources


def _resolve_one(spec: str, key: str) -> list[Source]:
    """One entry of data.train_files / data.valid_files as sources."""
    sources: list[Source] = []
    if spec == "@stdlib":
        return [Source(p, "text") for p in stdlib_files()]
    p = Path(os.path.expanduser(spec))
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
        # Regular files only (a FIFO would block the read), each once: `**` follows symlinks, so
        # a link back up the tree (d/loop -> d) matches every file again at each depth.
        files, seen = [], set()
        for m in matches:
            real = os.path.realpath(m)
            if real not in seen and m.is_file():
                seen.add(real)
                files.append(m)
        if not files:
            raise UserError(f"{key}: no files match {spec}")
        sources.extend(Source(m, _kind(m) or "text") for m in files)
    elif p.is_dir():
        if _is_arrow_dir(p):
            return [Source(p, "arrow")]
        found = []
        # followlinks=False: a symlink loop in a data directory cannot make this walk forever.
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            dirnames.sort()
            for f in sorted(filenames):
                fp = Path(dirpath) / f
                if _kind(fp) and fp.is_file():
                    found.append(Source(fp, _kind(fp)))
        if not found:
            raise UserError(f"{key}: directory {spec} holds no data files ({', '.join(sorted(TEXT_EXTENSIONS | JSON_EXTENSIONS))})")
        sources.extend(found)
    elif p.is_file():
        sources.append(Source(p, _kind(p) or "text"))
    elif p.exists():
        # A FIFO, socket or device: refused before anything opens it (a FIFO would block).
        raise UserError(f"{key}: {spec} is not a regular file or directory")
    elif p.is_symlink():
        raise UserError(f"{key}: {spec} is a symbolic link that leads nowhere (-> {os.readlink(p)})")
    else:
        raise UserError(f"{key}: data file not found: {spec}")
    return sources


def _check_line_lengths(raw: bytes, path: Path, limit: int) -> None:
    """Refuse a line (bytes between newlines) longer than `limit`, naming FILE:LINE.

    A 100 MB one-line file would otherwise be tokenized as one text: the tokenizer's output for it
    takes ~100x its size in memory (a 5 MB line peaked at 1.1 GB). Vectorized: a fraction of a
    second for 100 MB.
    """
    if len(raw) <= limit:
        return
    newlines = np.flatnonzero(np.frombuffer(raw, np.uint8) == 10)
    lengths = np.diff(np.concatenate(([-1], newlines, [len(raw)]))) - 1
    too_long = np.flatnonzero(lengths > limit)
    if len(too_long):
        i = int(too_long[0])
        raise UserError(
            f"{path}:{i + 1}: line of {int(lengths[i]):,} bytes is longer than data.max_line_bytes={limit:,}; "
            "split it into shorter lines, or raise data.max_line_bytes"
        )


def check_sources(sources: list[Source], key: str, on_decode_error: str, text_field: str, max_line_bytes: int = 4 << 20) -> tuple[str, int]:
    """Read every file once: check it is readable UTF-8 (and JSON lines parse), hash the contents.

    Returns (content hash, number of undecodable bytes replaced). Raises UserError naming the
    file and byte offset (or line) of the first problem, and when all data is empty.
    """
    h = hashlib.sha256()
    replaced = 0
    any_text = False
    for src in sources:
        h.update(str(src.path).encode() + b"\0" + src.kind.encode())
        if src.kind == "arrow":
            for f in sorted(src.path.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            any_text = True
            continue
        try:
            raw = src.path.read_bytes()
        except OSError as e:
            raise UserError(f"{key}: cannot read {src.path}: {e.strerror or e}") from None
        h.update(hashlib.sha256(raw).digest())
        _check_line_lengths(raw, src.path, max_line_bytes)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if on_decode_error != "replace":
                raise UserError(
                    f"{src.path}: not valid UTF-8 at byte offset {e.start} (set data.on_decode_error=replace to decode with replacement characters)"
                ) from None
            from bigtrain.documents import REPLACED

            before = REPLACED.count
            text = raw.decode("utf-8", errors="bigtrain_replace_count")
            replaced += REPLACED.count - before
        if src.kind == "json":
            # JSON lines end at "\n" only: str.splitlines() would also cut at U+2028, U+0085 & co.,
            # which JSON strings may hold unescaped.
            from bigtrain.documents import json_text

            for lineno, line in enumerate(text.split("\n"), 1):
                if line.strip() and json_text(line, src.path, lineno, text_field).strip():
                    any_text = True
        elif text.strip():
            any_text = True
    if not any_text:
        raise UserError(f"{key}: the data files hold no text (all empty or blank)")
    return h.hexdigest(), replaced


def iter_document_texts(sources: list[Source], text_field: str, on_decode_error: str) -> Iterator[str]:
    """Documents as strings, for tokenizer training (no datasets cache needed)."""
    errors = "replace" if on_decode_error == "replace" else "strict"
    for s in sources:
        if s.kind == "text":
            yield s.path.read_bytes().decode("utf-8", errors=errors)
        elif s.kind == "json":
            for line in s.path.read_bytes().decode("utf-8", errors=errors).split("\n"):
                if line.strip():
                    yield json.loads(line)[text_field]
        else:
            import datasets

            ds = datasets.load_from_disk(str(s.path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
            for i in range(0, len(ds), 1000):
                yield from ds[i : i + 1000][text_field]


# Documents longer than this many characters are tokenized in pieces (see `_encode_long`).
DOC_PIECE_CHARS = 1 << 18


def _cut_point(text: str, start: int, end: int) -> int:
    """Where to end the piece text[start:end]: before a newline (else a space) that follows a
    non-space character, so no pre-token spans the cut; `end` itself when there is none."""
    for sep in ("\n", " "):
        cut = text.rfind(sep, start + 1, end)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(sep, start + 1, cut)
        if cut > start:
            return cut
    return end


def long_pieces(text: str, group: int = 4) -> Iterator[list[str]]:
    """A long document in pieces of at most DOC_PIECE_CHARS characters, `group` pieces at a time.

    A fast tokenizer's output for one text holds offsets, tokens and more per token: ~100 bytes
    per character of input, so a whole 100 MB document would need ~10 GB at once. Pieces are cut
    at whitespace after a non-space character, where byte-level BPE and WordPiece pre-tokenizers
    split anyway, so the ids of the pieces are those of the whole text (a run of DOC_PIECE_CHARS
    characters without any whitespace is cut where it must).
    """
    pieces, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= DOC_PIECE_CHARS else _cut_point(text, start, start + DOC_PIECE_CHARS)
        pieces.append(text[start:end])
        start = end
        if len(pieces) == group or start >= len(text):
            yield pieces
            pieces = []


def to_model_batch(arrays: dict[str, np.ndarray], pad_id: int):
    """numpy arrays -> torch tensors: input_ids, labels (padding = -100), masks."""
    import torch

    ids = torch.from_numpy(arrays["input_ids"])
    batch = {"input_ids": ids}
    if "length" in arrays:  # one example per row, padded: padding is no input and no target
        positions = torch.arange(ids.shape[1])
        mask = positions[None, :] < torch.from_numpy(arrays["length"])[:, None]
        batch["input_ids"] = ids.masked_fill(~mask, pad_id)
        batch["attention_mask"] = mask.long()
        batch["labels"] = ids.masked_fill(~mask, -100)
    else:
        batch["labels"] = ids
        batch["segment_ids"] = torch.from_numpy(arrays["segment_ids"])
    return batch


class Prefetcher:
    """Builds the next steps' batches on a background thread so the model never waits on data.

    `make_batch(indices, position)` turns one micro-batch's sample indices (and the position, in
    samples, of the global batch: per-batch randomness such as MLM masking is seeded from it)
    into a dict of tensors.
    """

    def __init__(self, make_batch: Callable[[np.ndarray, int], dict], schedule, position: int, depth: int = 2, pin: bool = False) -> None:
        self.make_batch, self.schedule, self.pin = make_batch, schedule, pin
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._position = position
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos = self._position
        try:
            while not self._stop.is_set():
                micro = [self.make_batch(idx, pos) for idx in self.schedule.micro_batches(pos)]
                faults.data_delay()
                if self.pin:
                    micro = [{k: v.pin_memory() for k, v in b.items()} for b in micro]
                while not self._stop.is_set():
                    try:
                        self._q.put((pos, micro), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                pos += self.schedule.global_batch
        except BaseException as e:  # surface loader errors in the training thread
            self._q.put((None, e))

    def next(self) -> list[dict]:
        waited = time.perf_counter()
        pos, micro = self._q.get()
        self.wait_s += time.perf_counter() - waited  # the time the loop waited for data (logged as data_wait)
        if pos is None:
            raise micro
        return micro

    def close(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------- one entry point


def resolve_tokenizer_dir(cfg) -> Optional[Path]:
    """data.tokenizer, else the tokenizer saved with model.from_pretrained, else None (train one)."""
    from bigtrain.tokenizer import load_tokenizer

    if cfg.data.tokenizer:
        load_tokenizer(cfg.data.tokenizer)  # fail early on a bad directory
        return Path(cfg.data.tokenizer)
    src = cfg.model.from_pretrained
    if src and any((Path(src) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        load_tokenizer(src, where="model.from_pretrained")
        return Path(src)
    return None
