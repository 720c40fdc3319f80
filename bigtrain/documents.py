"""What one document is, for each kind of input file, read as a stream (memory bounded by the
longest document, never by the file).

- text files (.txt, .py, .md, ... and `@stdlib`): decoded as UTF-8 with universal newlines
  ("\\r\\n" and "\\r" become "\\n", as Python's text mode and `datasets`' text builder do), then
  one document per file (`sample_by: document`), per paragraph (split at "\\n\\n", empty ones
  dropped) or per line.
- JSON lines (.jsonl, .jsonl.gz, .jsonl.zst): the `text_field` string of each record.
- Parquet files and `datasets` directories saved with `save_to_disk`: the `text_field` column,
  read one record batch at a time.

Every check happens here, on the way: a line longer than `data.max_line_bytes` (FILE:LINE),
invalid UTF-8 (the byte offset, unless data.on_decode_error=replace, which replaces and counts),
invalid JSON or a missing or non-string field (FILE:LINE). The messages are the ones bigtrain
printed before it read files as streams.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
from pathlib import Path
from typing import BinaryIO, Iterator

from bigtrain.errors import UserError


class ReplacementCounter:
    """codecs error handler that replaces undecodable bytes with U+FFFD and counts them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, err: UnicodeDecodeError):
        self.count += err.end - err.start
        return ("\ufffd", err.end)


REPLACED = ReplacementCounter()
codecs.register_error("bigtrain_replace_count", REPLACED)


def open_binary(path: Path) -> BinaryIO:
    """A file, decompressed on the fly when it ends in .gz or .zst."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)") from None
        # Buffered: the decompressing reader itself has no readline.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), buffer_size=1 << 20)
    return open(path, "rb")


def iter_lines(f: BinaryIO, path: Path, limit: int) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes of the line with its "\\n") for each line of `f`.

    A line (bytes between newlines) longer than `limit` is refused, naming FILE:LINE: a
    multi-megabyte line is almost never prose, and tokenizers need ~100x its size in memory.
    At most limit + 1 bytes of any line are held.
    """
    lineno, offset = 0, 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            n = len(line)
            while not line.endswith(b"\n"):
                line = f.readline(1 << 20)
                if not line:
                    break
                n += len(line) - line.endswith(b"\n")
            raise UserError(
                f"{path}:{lineno}: line of {n:,} bytes is longer than data.max_line_bytes={limit:,}; "
                "split it into shorter lines, or raise data.max_line_bytes"
            )
        yield lineno, offset, line
        offset += len(line)


def decode(raw: bytes, path: Path, offset: int, on_decode_error: str) -> str:
    """UTF-8 bytes (that start at byte `offset` of `path`) as text, by data.on_decode_error."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_decode_error != "replace":
            raise UserError(
                f"{path}: not valid UTF-8 at byte offset {offset + e.start} (set data.on_decode_error=replace to decode with replacement characters)"
            ) from None
        return raw.decode("utf-8", errors="bigtrain_replace_count")


def _text_chunks(f: BinaryIO, path: Path, limit: int, on_decode_error: str, size: int = 1 << 20) -> Iterator[str]:
    """The decoded text of a file with universal newlines, in pieces that end at line ends.
    ("\\r\\n" never spans two pieces: a piece ends with "\\n".)"""
    buf, start = [], 0
    pending = 0
    for _, offset, line in iter_lines(f, path, limit):
        if not buf:
            start = offset
        buf.append(line)
        pending += len(line)
        if pending >= size:
            yield decode(b"".join(buf), path, start, on_decode_error).replace("\r\n", "\n").replace("\r", "\n")
            buf, pending = [], 0
    if buf:
        yield decode(b"".join(buf), path, start, on_decode_error).replace("\r\n", "\n").replace("\r", "\n")


def text_documents(path: Path, sample_by: str, limit: int, on_decode_error: str) -> Iterator[str]:
    """A text file's documents: the whole file, its paragraphs or its lines."""
    with open_binary(path) as f:
        chunks = _text_chunks(f, path, limit, on_decode_error)
        if sample_by == "document":
            yield "".join(chunks)
            return
        sep = "\n\n" if sample_by == "paragraph" else "\n"
        carry = ""
        for chunk in chunks:
            parts = (carry + chunk).split(sep)
            carry = parts.pop()
            yield from (p for p in parts if p or sample_by == "line")
        if carry:
            yield carry


def json_documents(path: Path, text_field: str, limit: int, on_decode_error: str) -> Iterator[str]:
    """The `text_field` of each JSON-lines record; errors name FILE:LINE."""
    with open_binary(path) as f:
        for lineno, offset, raw in iter_lines(f, path, limit):
            line = decode(raw, path, offset, on_decode_error)
            if line.strip():
                yield json_text(line, path, lineno, text_field)


def json_text(line: str, path: Path, lineno: int, text_field: str) -> str:
    """The `text_field` string of one JSON-lines record; errors name FILE:LINE."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise UserError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
    if not isinstance(rec, dict) or text_field not in rec:
        raise UserError(f"{path}:{lineno}: JSON record has no '{text_field}' field (data.text_field)")
    if not isinstance(rec[text_field], str):
        raise UserError(f"{path}:{lineno}: field '{text_field}' must be a string")
    return rec[text_field]


def parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - any failure to open is a bad file
        raise UserError(f"{path}: cannot read as Parquet: {e}") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: Parquet file has no '{text_field}' column (data.text_field); columns: {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def arrow_documents(path: Path, text_field: str) -> Iterator[str]:
    """A `datasets` directory (save_to_disk): its Arrow stream files in order, batch by batch."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        if not (path / "train").is_dir():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise UserError(f"{path}: saved DatasetDict has no 'train' split (has {', '.join(splits)})")
        path = path / "train"
    state = json.loads((path / "state.json").read_text())
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(path / entry["filename"])) as source:
            reader = pa.ipc.open_stream(source)
            if text_field not in reader.schema.names:
                raise UserError(f"{path}: dataset has no '{text_field}' column (data.text_field); columns: {', '.join(reader.schema.names)}")
            for batch in reader:
                yield from (t for t in batch.column(text_field).to_pylist() if t is not None)


def documents(path: Path, kind: str, sample_by: str, text_field: str, limit: int, on_decode_error: str) -> Iterator[str]:
    """The documents of one input (a `bigtrain.data.Source`'s path and kind)."""
    if kind == "json":
        return json_documents(path, text_field, limit, on_decode_error)
    if kind == "parquet":
        return parquet_documents(path, text_field)
    if kind == "arrow":
        return arrow_documents(path, text_field)
    return text_documents(path, sample_by, limit, on_decode_error)
