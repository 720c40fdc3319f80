"""Prepared datasets: token shards on disk, read by memory map (training never imports datatrove).

A prepared directory (written by `bigtrain data prepare`, see bigtrain/prepare.py) holds plain
files a user can inspect:

    manifest.json                  what is here: tokenizer hash, dtype, EOS id, per source its files
    tokenizer/                     the tokenizer the tokens were made with
    train/NAME/00000_unshuffled.ds      tokens of task 0 of source NAME: raw little-endian uint16
                                        (uint32 when the vocabulary has more than 65,536 entries)
    train/NAME/00000_unshuffled.ds.index  the end of every document, in tokens: uint64
    valid/...                      the same for data.valid_files, when given

A source's token stream is its files one after another, task 0 first; every document ends with
EOS (included in the document). Block j of a source is tokens [j*L, (j+1)*L) of that stream
(L = data.seq_len; the incomplete last block is dropped, as transformers' run_clm does). Its
segment ids (which document each token belongs to, counted from 0 at the block's first token)
are computed at read time from the document ends, so no per-token column is stored: token t is
in document #{ends <= t}, and its segment id is #{ends e : start < e <= t}.

Opening costs one stat per file and no reading: the token and index files are memory-mapped, and
a block reads L tokens plus a binary search in the document ends.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from bigtrain.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "bigtrain-tokens-1"


def tokenizer_hash(tok_dir: Path) -> str:
    """sha256 over the tokenizer's files (names and contents): the tokens' meaning."""
    h = hashlib.sha256()
    for f in sorted(Path(tok_dir).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def read_manifest(root: Path, where: str) -> dict:
    """The manifest of a prepared directory, checked for format; errors name `where`."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        hint = " (its preparation has not finished: rerun the same `bigtrain data prepare` command)" if (Path(root) / "plan.json").is_file() else ""
        raise UserError(f"{where}: {root} is not a prepared dataset: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a bigtrain manifest of format {FORMAT}")
    return manifest


class TokenStream:
    """One source: the concatenation of its shard files, memory-mapped."""

    def __init__(self, root: Path, entry: dict, dtype: str, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(dtype).newbyteorder("<")
        files = [f for f in entry["files"] if f["tokens"] > 0]
        self._tokens, self._ends = [], []
        for f in files:
            tok_path, idx_path = Path(root) / f["path"], Path(root) / (f["path"] + ".index")
            _check_size(tok_path, f["tokens"] * self.dtype.itemsize, "tokens")
            _check_size(idx_path, f["documents"] * 8, "document index")
            self._tokens.append(np.memmap(tok_path, dtype=self.dtype, mode="r"))
            self._ends.append(np.memmap(idx_path, dtype="<u8", mode="r"))
        self.starts = np.concatenate([[0], np.cumsum([f["tokens"] for f in files], dtype=np.int64)])
        self.doc_starts = np.concatenate([[0], np.cumsum([f["documents"] for f in files], dtype=np.int64)])
        self.n_tokens = int(self.starts[-1])
        self.documents = int(self.doc_starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across file boundaries."""
        out = np.empty(length, np.int64)
        pos = start
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < start + length:
            local = pos - int(self.starts[i])
            take = min(start + length - pos, int(self.starts[i + 1]) - pos)
            out[pos - start : pos - start + take] = self._tokens[i][local : local + take]
            pos += take
            i += 1
        return out

    def ends_between(self, start: int, end: int) -> np.ndarray:
        """Document ends e with start < e < end, as stream positions."""
        parts = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while i < len(self._ends) and self.starts[i] < end:
            base = int(self.starts[i])
            ends = self._ends[i]
            lo = int(np.searchsorted(ends, start - base, side="right"))
            hi = int(np.searchsorted(ends, end - base, side="left"))
            parts.append(ends[lo:hi].astype(np.int64) + base)
            i += 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def document(self, i: int, limit: int) -> np.ndarray:
        """The first `limit` tokens of document i (numbered over the stream), its EOS left out."""
        f = int(np.searchsorted(self.doc_starts, i, side="right")) - 1
        local, base = i - int(self.doc_starts[f]), int(self.starts[f])
        end = int(self._ends[f][local]) - 1  # the index holds each document's end after its EOS
        start = int(self._ends[f][local - 1]) if local else 0
        return self.read(base + start, min(end - start, limit))

    def block(self, j: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Block j: its tokens and its segment ids (document number within the block, from 0)."""
        start = j * seq_len
        ids = self.read(start, seq_len)
        ends = self.ends_between(start, start + seq_len) - start
        segments = np.cumsum(np.bincount(ends, minlength=seq_len)[:seq_len])
        return ids, segments


def _check_size(path: Path, expected: int, what: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path}: shard {what} file is missing (prepare the dataset again)") from None
    if size != expected:
        raise UserError(f"{path}: shard {what} file is truncated or altered: {size:,} bytes, the manifest says {expected:,}")


class ShardBlocks:
    """The samples of several sources behind one flat index: source s owns ids base[s] ..
    base[s+1]-1. A sample is a seq_len block of the joined documents (data.mode=packed), or one
    document, truncated to seq_len and padded (data.mode=line_by_line: the documents are lines).
    `take(ids)` returns the arrays a task turns into a batch."""

    def __init__(self, streams: list[TokenStream], seq_len: int, lines: bool = False) -> None:
        self.streams, self.seq_len, self.lines = streams, seq_len, lines
        self.blocks = [s.documents if lines else s.n_tokens // seq_len for s in streams]
        self.base = np.concatenate([[0], np.cumsum(self.blocks, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.base[-1])

    def take(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        ids = np.zeros((len(indices), self.seq_len), np.int64)
        extra = np.empty(len(indices), np.int64) if self.lines else np.empty((len(indices), self.seq_len), np.int64)
        which = np.searchsorted(self.base, indices, side="right") - 1
        for row, (s, i) in enumerate(zip(which, indices)):
            local = int(i - self.base[s])
            if self.lines:
                doc = self.streams[s].document(local, self.seq_len)
                ids[row, : len(doc)], extra[row] = doc, len(doc)
            else:
                ids[row], extra[row] = self.streams[s].block(local, self.seq_len)
        return {"input_ids": ids, "length" if self.lines else "segment_ids": extra}


@dataclass
class PreparedDataset:
    """An opened prepared directory: its manifest, tokenizer, and one TokenStream per source."""

    root: Path
    manifest: dict
    sources: dict[str, TokenStream]
    valid: Optional[TokenStream]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.manifest["tokenizer"]["dir"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])


def open_prepared(root: Path, where: str) -> PreparedDataset:
    """Open a prepared directory: checks the manifest and every file's size, maps the files."""
    root = Path(root)
    manifest = read_manifest(root, where)
    dtype = manifest["dtype"]
    sources = {name: TokenStream(root, entry, dtype, name) for name, entry in manifest["sources"].items()}
    valid = TokenStream(root, manifest["valid"], dtype, "valid") if manifest.get("valid") else None
    return PreparedDataset(root, manifest, sources, valid)


def check_fits(ds: PreparedDataset, names: list[str], seq_len: int, where: str, lines: bool = False) -> None:
    """Every named source exists and holds at least one block of seq_len tokens (line_by_line:
    one document, which `bigtrain data prepare` guarantees)."""
    for name in names:
        if name not in ds.sources:
            have = ", ".join(sorted(ds.sources))
            raise UserError(f"{where}: source '{name}' is not in the prepared dataset {ds.root} (it has: {have})")
        stream = ds.sources[name]
        if stream.n_tokens < seq_len and not lines:
            raise UserError(
                f"{where}: source '{name}' of {ds.root} holds {stream.n_tokens:,} tokens, fewer than one block of data.seq_len={seq_len}; "
                "add data or lower data.seq_len"
            )
    if ds.valid is not None and ds.valid.n_tokens < seq_len and not lines:
        raise UserError(f"{where}: the validation split of {ds.root} holds {ds.valid.n_tokens:,} tokens, fewer than one block of data.seq_len={seq_len}")
