"""Data: find files, the line-by-line cache, the batch schedule of one index set, prefetching.

1. `resolve_sources` turns `data.train_files` (files, directories, globs, "@stdlib", or a
   `datasets` directory) into a list of `Source`s. Packed clm/mlm data is then tokenized by
   `bigtrain data prepare` (bigtrain/prepare.py, datatrove) into token shards that training
   reads by memory map (bigtrain/shards.py, bigtrain/corpus.py, docs/data.md).
2. `prepare` (data.mode=line_by_line only) loads the files with `datasets`, tokenizes with a
   batched multi-process `map` and keeps one padded example per line, saved with `save_to_disk`
   under a key hashing the files' contents, the tokenizer and the settings. `pack` is bigtrain's
   classic in-memory packing, kept as the reference the shard reader is tested against.
3. `BatchSchedule` decides, from the seed alone, which examples make up global batch number k
   (line_by_line and labeled data; packed data uses bigtrain.mixture): a fresh permutation each
   epoch, cut into global batches, each split across data-parallel ranks and micro-steps. The
   position is a count of samples, so resuming (at any world size with the same global batch)
   continues exactly where the run stopped.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import sysconfig
import tempfile
import threading
import time
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from bigtrain import faults
from bigtrain.errors import UserError

CACHE_FORMAT = 2  # bump when the cached layout changes
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


# --------------------------------------------------------------------------- loading with datasets


def _json_texts(files: list[str], text_field: str, errors: str, content_hash: str):
    """The `text_field` of every record of JSON-lines `files` (already checked by check_sources).

    Read here rather than with the `datasets` JSON builder: that one infers an Arrow type for
    every column, and a column bigtrain never reads (say "meta": "" on one line, [] on the next)
    made it fail with a bare `ValueError: Expected object or value`. `content_hash` is unused: it
    is in the arguments so that the `datasets` cache key changes with the files' contents.
    """
    del content_hash
    for f in files:
        for line in Path(f).read_bytes().decode("utf-8", errors=errors).split("\n"):
            if line.strip():
                yield {"text": json.loads(line)[text_field]}


def load_documents(sources: list[Source], sample_by: str, text_field: str, on_decode_error: str, cache_dir: Path, content_hash: Optional[str] = None):
    """One `datasets.Dataset` with a single 'text' column, one row per document."""
    import datasets

    datasets.disable_progress_bars()
    parts = []
    text_files = [str(s.path) for s in sources if s.kind == "text"]
    json_files = [str(s.path) for s in sources if s.kind == "json"]
    errors = "replace" if on_decode_error == "replace" else "strict"
    hf_cache = str(cache_dir / "hf")
    if text_files:
        ds = datasets.load_dataset(
            "text", data_files=text_files, sample_by=sample_by, encoding_errors=errors, split="train", cache_dir=hf_cache
        )
        parts.append(ds)
    if json_files:
        if content_hash is None:
            content_hash = hashlib.sha256(b"".join(hashlib.sha256(Path(f).read_bytes()).digest() for f in json_files)).hexdigest()
        ds = datasets.Dataset.from_generator(
            _json_texts, features=datasets.Features({"text": datasets.Value("string")}), cache_dir=hf_cache,
            gen_kwargs={"files": json_files, "text_field": text_field, "errors": errors, "content_hash": content_hash},
        )
        parts.append(ds)
    for s in sources:
        if s.kind == "arrow":
            ds = datasets.load_from_disk(str(s.path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UserError(f"{s.path}: saved DatasetDict has no 'train' split (has {', '.join(ds)})")
                ds = ds["train"]
            if text_field not in ds.column_names:
                raise UserError(f"{s.path}: dataset has no '{text_field}' column (data.text_field); columns: {', '.join(ds.column_names)}")
            parts.append(ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds.select_columns(["text"]))
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(parts)


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


def _encode_long(tokenizer, text: str) -> np.ndarray:
    """Token ids of one long document with a transformers tokenizer, piece by piece (long_pieces)."""
    parts = [np.asarray(ids, np.int32) for group in long_pieces(text) for ids in tokenizer(group, add_special_tokens=False)["input_ids"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def tokenize(docs, tokenizer, num_proc: Optional[int]):
    def fn(batch):
        # The Arrow column is built from numpy: several times faster than `datasets` converting
        # Python lists of ints (measured by `bigtrain bench data`).
        import pyarrow as pa

        texts = batch["text"]
        long = [len(t) > DOC_PIECE_CHARS for t in texts]
        if not any(long):
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:  # a few long documents among short ones: those go piece by piece
            short_texts = [t for t, is_long in zip(texts, long) if not is_long]
            short = iter(tokenizer(short_texts, add_special_tokens=False)["input_ids"] if short_texts else [])
            ids = [_encode_long(tokenizer, t) if is_long else np.asarray(next(short), np.int32) for t, is_long in zip(texts, long)]
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, ids), np.int64, len(ids)), out=offsets[1:])
        if any(long):
            values = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        else:
            values = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(offsets[-1]))
        return pa.table({"input_ids": pa.LargeListArray.from_arrays(offsets, values)})

    n = num_proc or min(os.cpu_count() or 1, 8)
    # Worker processes only pay off for many documents; a handful is faster in-process.
    n = max(1, min(n, len(docs) // 64))
    return docs.map(fn, batched=True, batch_size=256, num_proc=n if n > 1 else None, remove_columns=docs.column_names)


def _flat_tokens(tok_ds) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated token ids and per-document lengths, straight from Arrow (no Python lists)."""
    import pyarrow as pa

    col = tok_ds.data.column("input_ids")
    values, lengths = [], []
    for chunk in col.chunks:
        values.append(chunk.flatten().to_numpy(zero_copy_only=False))
        lengths.append(pa.compute.list_value_length(chunk).to_numpy(zero_copy_only=False))
    if not values:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(values).astype(np.int64), np.concatenate(lengths).astype(np.int64)


def line_examples(flat: np.ndarray, lengths: np.ndarray, pad_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One example per non-empty line, truncated to seq_len and right-padded; returns (ids, lengths)."""
    keep = lengths > 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts, lens = offsets[:-1][keep], np.minimum(lengths[keep], seq_len)
    ids = np.full((len(starts), seq_len), pad_id, dtype=np.int32)
    for i, (s, n) in enumerate(zip(starts, lens)):
        ids[i, :n] = flat[s : s + n]
    return ids, lens.astype(np.int32)


# --------------------------------------------------------------------------- the cached dataset


class TokenBlocks:
    """Memory-mapped packed (or line-by-line) examples: `take(indices)` gives numpy arrays."""

    def __init__(self, path: Path) -> None:
        import datasets

        self.path = path
        self.meta = json.loads((path / "bigtrain_meta.json").read_text())
        ds = datasets.load_from_disk(str(path))
        self._chunks = []
        for chunk in ds.data.column("input_ids").chunks:
            self._chunks.append(chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), -1))
        self._extra = []
        extra_col = "segment_ids" if self.meta["mode"] == "packed" else "length"
        for chunk in ds.data.column(extra_col).chunks:
            arr = chunk.flatten() if self.meta["mode"] == "packed" else chunk
            arr = arr.to_numpy(zero_copy_only=False)
            self._extra.append(arr.reshape(len(chunk), -1) if self.meta["mode"] == "packed" else arr)
        self._bounds = np.cumsum([0] + [len(c) for c in self._chunks])
        self.seq_len = int(self.meta["seq_len"])
        self.mode = self.meta["mode"]

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        which = np.searchsorted(self._bounds, indices, side="right") - 1
        ids = np.stack([self._chunks[c][i - self._bounds[c]] for c, i in zip(which, indices)]) if len(indices) else np.zeros((0, self.seq_len), np.int32)
        extra = [self._extra[c][i - self._bounds[c]] for c, i in zip(which, indices)]
        out = {"input_ids": ids.astype(np.int64)}
        if self.mode == "packed":
            out["segment_ids"] = np.stack(extra).astype(np.int64)
        else:
            out["length"] = np.asarray(extra, dtype=np.int64)
        return out


def cache_key(content_hash: str, tokenizer_hash: str, cfg_data) -> str:
    parts = [CACHE_FORMAT, content_hash, tokenizer_hash, cfg_data.seq_len, cfg_data.mode, cfg_data.sample_by, cfg_data.text_field, cfg_data.on_decode_error]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def build_blocks(sources, cfg_data, tokenizer, tok_hash: str, content_hash: str, cache: Path, log=print) -> Path:
    """line_by_line: tokenize `sources` into one padded example per line unless a cached copy
    exists; returns the cache directory. (Packed data goes through bigtrain.prepare.)"""
    import datasets
    import pyarrow as pa

    key = cache_key(content_hash, tok_hash, cfg_data)
    out = cache / "packed" / key
    if (out / "bigtrain_meta.json").is_file():
        return out
    docs = load_documents(sources, "line", cfg_data.text_field, cfg_data.on_decode_error, cache, content_hash)
    # As transformers' old LineByLineTextDataset: blank and whitespace-only lines are no examples.
    docs = docs.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, batch_size=4096)
    log(f"tokenizing {len(docs)} documents ...")
    tok_ds = tokenize(docs, tokenizer, cfg_data.num_proc)
    flat, lengths = _flat_tokens(tok_ds)
    seq = cfg_data.seq_len
    ids, lens = line_examples(flat, lengths, tokenizer.pad_token_id, seq)
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq), "length": pa.array(lens)})
    if len(ids) == 0:
        raise UserError(
            f"data.train_files: {int(lengths.sum())} tokens are too few for one block of data.seq_len={seq}; "
            "add data or lower data.seq_len"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=out.parent))
    datasets.Dataset(table).save_to_disk(str(tmp))
    meta = {
        "format": CACHE_FORMAT, "mode": cfg_data.mode, "seq_len": seq, "examples": int(len(ids)),
        "tokens": int(flat.size + (lengths > 0).sum()), "documents": int((lengths > 0).sum()),
        "files": len(sources),
    }
    (tmp / "bigtrain_meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():  # another process finished first with the same content
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- order of batches


@dataclass
class BatchSchedule:
    """Which examples form each micro-batch of each rank, from the seed alone.

    Epoch e visits `indices` in the order of a permutation seeded by (seed, e). Global batch k
    takes the next `global_batch` samples of that stream; within it, micro-step m of rank r
    takes samples [(m * world + r) * micro, ... + micro). `position` counts samples consumed,
    so it is the same number on every rank and at every world size.
    """

    indices: np.ndarray
    global_batch: int
    micro_batch: int
    world_size: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        if len(self.indices) < self.global_batch:
            raise UserError(
                f"data: {len(self.indices)} training examples are fewer than one global batch of {self.global_batch} "
                "(train.micro_batch_size x train.grad_accum x world size); add data or lower the batch"
            )
        self.per_epoch = (len(self.indices) // self.global_batch) * self.global_batch
        self._perm_epoch = -1
        self._perm = None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = self.indices[rng.permutation(len(self.indices))]
            self._perm_epoch = epoch
        return self._perm

    def global_ids(self, position: int) -> list[int]:
        """Every sample id (over all ranks) of the global batch that starts at sample `position`."""
        epoch, offset = divmod(position, self.per_epoch)
        return [int(i) for i in self._order(epoch)[offset : offset + self.global_batch]]

    def micro_batches(self, position: int) -> list[np.ndarray]:
        """This rank's micro-batches for the global batch that starts at sample `position`."""
        epoch, offset = divmod(position, self.per_epoch)
        batch = self._order(epoch)[offset : offset + self.global_batch]
        accum = self.global_batch // (self.micro_batch * self.world_size)
        out = []
        for m in range(accum):
            start = (m * self.world_size + self.rank) * self.micro_batch
            out.append(batch[start : start + self.micro_batch])
        return out


def to_model_batch(arrays: dict[str, np.ndarray], pad_id: int):
    """numpy arrays -> torch tensors: input_ids, labels (padding = -100), masks."""
    import torch

    ids = torch.from_numpy(arrays["input_ids"])
    batch = {"input_ids": ids}
    if "length" in arrays:
        positions = torch.arange(ids.shape[1])
        mask = positions[None, :] < torch.from_numpy(arrays["length"])[:, None]
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

    def __init__(self, make_batch: Callable[[np.ndarray, int], dict], schedule: BatchSchedule, position: int, depth: int = 2, pin: bool = False) -> None:
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


@dataclass
class PreparedData:
    tokenizer_dir: Path
    train_path: Path
    valid_path: Optional[Path]  # None: validation is split off the training blocks


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


def prepare(cfg, log=print) -> PreparedData:
    """Check the data, train or load the tokenizer, tokenize and pack (cached). Idempotent."""
    from bigtrain.config import cache_root
    from bigtrain.tokenizer import cached_tokenizer, load_tokenizer

    d = cfg.data
    if d.mode != "line_by_line":
        raise ValueError("bigtrain.data.prepare is for data.mode=line_by_line; packed data goes through bigtrain.corpus.ensure_prepared")
    cache = cache_root(cfg)
    sources = resolve_sources(d.train_files, "data.train_files")
    content_hash, replaced = check_sources(sources, "data.train_files", d.on_decode_error, d.text_field, d.max_line_bytes)
    valid_sources, valid_hash = None, None
    if d.valid_files:
        valid_sources = resolve_sources(d.valid_files, "data.valid_files")
        valid_hash, r2 = check_sources(valid_sources, "data.valid_files", d.on_decode_error, d.text_field, d.max_line_bytes)
        replaced += r2
    if replaced:
        log(f"warning: replaced {replaced} undecodable byte(s) with U+FFFD (data.on_decode_error=replace)")

    tok_dir = resolve_tokenizer_dir(cfg)
    if tok_dir is None:
        kind = "wordpiece-v1" if cfg.task == "mlm" else "bpe-v1"
        tok_dir = cached_tokenizer(cache, [content_hash, d.vocab_size, d.text_field, kind], kind, d.vocab_size,
                                   iter_document_texts(sources, d.text_field, d.on_decode_error), f"{len(sources)} file(s)", log)
    tokenizer = load_tokenizer(tok_dir)
    from bigtrain.shards import tokenizer_hash

    tok_hash = tokenizer_hash(tok_dir)
    train_path = build_blocks(sources, d, tokenizer, tok_hash, content_hash, cache, log)
    valid_path = build_blocks(valid_sources, d, tokenizer, tok_hash, valid_hash, cache, log) if valid_sources else None
    return PreparedData(tok_dir, train_path, valid_path)


def split_indices(n: int, valid_fraction: float, seed: int, has_valid_files: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation example indices; without valid files, a seeded hold-out."""
    all_idx = np.arange(n)
    if has_valid_files or valid_fraction == 0 or n < 2:
        return all_idx, np.zeros(0, np.int64)
    n_valid = max(1, int(round(n * valid_fraction)))
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])
