"""Readers of labeled files for fine-tuning (sequence classification and token labeling).

Every problem is a `UserError` whose message starts with `FILE:LINE: ` (1-based line of the
offending row), so a user with a 2-million-row file can open it at the right place. Nothing is
dropped silently: blank lines are skipped, but a bad row either stops the read
(`on_bad_rows="error"`, the default) or is skipped, counted, and reported once through `log`
(`on_bad_rows="skip"`).

Formats (see `guess_format`):
- tsv: `label<TAB>text` or `label<TAB>text_a<TAB>text_b`, or columns named by a header line.
- csv: a header naming the columns is required (`label`, `text`/`sentence`/..., `text_b`/...).
- jsonl: one JSON object per line with `text`, optional `text_b`, `label` (string or integer).
- conll: one token per line, token first and label last, blank line between sentences.

Files are decoded here rather than by `open` so that invalid UTF-8 is reported with its line.
A UTF-8 byte-order mark and CRLF line ends are accepted everywhere.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from bigtrain.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]
Log = Optional[Callable[[str], None]]

FORMATS = ("tsv", "csv", "jsonl", "conll")
_EXTENSIONS = {
    ".tsv": "tsv", ".tab": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl", ".json": "jsonl",
    ".conll": "conll", ".conllu": "conll", ".bio": "conll", ".iob": "conll", ".txt": "conll",
}
# Column names, in order of preference, for header lines (TSV/CSV) and JSON keys.
TEXT_A_NAMES = ("text", "text_a", "sentence", "sentence1")
TEXT_B_NAMES = ("text_b", "sentence2")
LABEL_NAME = "label"
_ID_NAMES = ("id", "idx", "index", "guid")  # columns ignored without comment
_KNOWN_NAMES = set(TEXT_A_NAMES) | set(TEXT_B_NAMES) | {LABEL_NAME} | set(_ID_NAMES)
_INT_RE = re.compile(r"[+-]?\d+")
# A labeled text is a sentence or a paragraph. A longer one is a broken row (a lost quote or line
# end): the tokenizer would encode all of it (~100x its size in memory) to keep data.seq_len tokens.
MAX_TEXT_CHARS = 1 << 20
_BOM = b"\xef\xbb\xbf"


@dataclass
class TextExample:
    """One classification example; `where` ("FILE:LINE") lets later checks point at the row."""

    text_a: str
    text_b: Optional[str]
    label: Optional[str]
    where: str


@dataclass
class TokenExample:
    """One sentence for token classification; `where` is the line of its first token."""

    tokens: list[str]
    labels: Optional[list[str]]
    where: str


# --------------------------------------------------------------------------- helpers


def guess_format(path: PathLike, fmt: Optional[str] = None) -> str:
    """The file format: `fmt` when the user set `data.format`, else from the extension."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UserError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(str(path))[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    shown = f"extension '{ext}'" if ext else "no extension"
    raise UserError(f"{path}: cannot tell the format from {shown}; set data.format to one of {', '.join(FORMATS)}")


def _read_text(path: PathLike) -> str:
    """The file decoded as UTF-8 (BOM dropped), or a UserError naming the line of a bad byte."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end) for \\n, \\r\\n and \\r line ends."""
    for number, line in enumerate(io.StringIO(text, newline=""), 1):
        yield number, line.rstrip("\r\n")


class _BadRows:
    """Raise at the first bad row, or count them and report once (on_bad_rows="skip")."""

    def __init__(self, path: PathLike, on_bad_rows: str, log: Log, what: str = "rows") -> None:
        if on_bad_rows not in ("error", "skip"):
            raise UserError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
        self.path, self.skip, self.what = path, on_bad_rows == "skip", what
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.count = 0
        self.first: Optional[str] = None

    def __call__(self, line: int, problem: str) -> None:
        message = f"{self.path}:{line}: {problem}"
        if not self.skip:
            raise UserError(message)
        self.count += 1
        if self.first is None:
            self.first = message

    def finish(self, n_examples: int) -> None:
        """Report the skipped rows; a file that yields nothing at all is an error."""
        if self.count:
            self.log(f"{self.path}: skipped {self.count} bad {self.what} (first: {self.first})")
        if n_examples == 0:
            extra = f" ({self.count} bad {self.what} skipped; first: {self.first})" if self.count else ""
            raise UserError(f"{self.path}: no examples{extra}")


def _clean_label(value: Optional[str]) -> Optional[str]:
    value = (value or "").strip()
    return value or None


@dataclass
class _Columns:
    """Where a header put the columns; indices into a row."""

    text_a: int
    text_b: Optional[int]
    label: Optional[int]
    width: int
    line: int


def _header_columns(path: PathLike, fields: list[str], line: int, require_label: bool, log: Log,
                    required: bool) -> Optional[_Columns]:
    """Read a header row. Returns None when `fields` is not a header (only if not `required`)."""
    names = [f.strip().lower() for f in fields]
    has_text = any(n in TEXT_A_NAMES for n in names)
    looks_like_header = has_text and (LABEL_NAME in names or all(n in _KNOWN_NAMES for n in names if n))
    if not required and not looks_like_header:
        return None
    listed = ", ".join(f.strip() for f in fields)
    dupes = sorted({n for n in names if n and names.count(n) > 1})
    if dupes:
        raise UserError(f"{path}:{line}: the header names column '{dupes[0]}' twice")
    if not has_text:
        raise UserError(f"{path}:{line}: the header names no text column (expected one of "
                        f"{', '.join(TEXT_A_NAMES)}); found: {listed}")
    if require_label and LABEL_NAME not in names:
        raise UserError(f"{path}:{line}: the header names no '{LABEL_NAME}' column; found: {listed}")
    text_a = next(names.index(n) for n in TEXT_A_NAMES if n in names)
    text_b = next((names.index(n) for n in TEXT_B_NAMES if n in names), None)
    label = names.index(LABEL_NAME) if LABEL_NAME in names else None
    used = {text_a, text_b, label}
    ignored = [fields[i].strip() or f"(unnamed column {i + 1})" for i, n in enumerate(names)
               if i not in used and n not in _ID_NAMES]
    if ignored:
        known = ", ".join((*TEXT_A_NAMES, *TEXT_B_NAMES, LABEL_NAME))
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"{path}:{line}: ignoring column(s) {', '.join(ignored)} (bigtrain reads {known})")
    return _Columns(text_a, text_b, label, len(fields), line)


def _example(path: PathLike, line: int, bad: _BadRows, text_a: Optional[str], text_b: Optional[str],
             has_b: bool, label: Optional[str], require_label: bool) -> Optional[TextExample]:
    """Check one row's values; None (after reporting) when the row is bad."""
    text_a = (text_a or "").strip()
    if not text_a:
        bad(line, "empty text")
        return None
    longest = max(len(text_a), len(text_b or ""))
    if longest > MAX_TEXT_CHARS:
        bad(line, f"a text of {longest:,} characters (at most {MAX_TEXT_CHARS:,}): a lost quote or line end?")
        return None
    if has_b:
        text_b = (text_b or "").strip()
        if not text_b:
            bad(line, "empty text_b")
            return None
    else:
        text_b = None
    label = _clean_label(label)
    if label is None and require_label:
        bad(line, "empty label")
        return None
    return TextExample(text_a, text_b, label, f"{path}:{line}")


def _blank(fields: Sequence[str]) -> bool:
    return all(not f.strip() for f in fields)


# --------------------------------------------------------------------------- classification


def _split_tsv_line(line: str) -> list[str]:
    """Tab-split one line, undoing CSV-style quoting only where a field is well-formed quoted.

    The `csv` module parses the line (so `"a ""quoted"" text"` becomes `a "quoted" text` and a
    quoted field may hold a tab), strictly and one physical line at a time: text such as
    `"Great" movie` or a lone `"` is kept verbatim instead of being mangled or swallowing the
    following lines, which is what reading GLUE-style TSVs with csv defaults does.
    """
    if '"' not in line:
        return line.split("\t")
    try:
        return next(csv.reader([line], delimiter="\t", strict=True))
    except (csv.Error, StopIteration):
        return line.split("\t")


def _read_tsv(path: PathLike, text: str, bad: _BadRows, require_label: bool, log: Log) -> list[TextExample]:
    out: list[TextExample] = []
    columns: Optional[_Columns] = None
    first_row = True
    pairs: Optional[tuple[bool, int]] = None  # without a header: (rows have text_b, first such line)
    for line, raw in _lines(text):
        fields = _split_tsv_line(raw)
        if _blank(fields):
            continue
        if first_row:
            first_row = False
            columns = _header_columns(path, fields, line, require_label, log, required=False)
            if columns is not None:
                continue
        n = len(fields)
        if columns is not None:
            if n != columns.width:
                bad(line, f"expected {columns.width} tab-separated fields as in the header (line {columns.line}), found {n}")
                continue
            ex = _example(path, line, bad, fields[columns.text_a],
                          fields[columns.text_b] if columns.text_b is not None else None, columns.text_b is not None,
                          fields[columns.label] if columns.label is not None else None, require_label)
        elif n in (2, 3) or (n == 1 and not require_label):
            # One file is either single texts or pairs: a 2-field row among 3-field ones has lost
            # a field (or vice versa), so it is a bad row rather than a silent single text.
            if pairs is None:
                pairs = (n == 3, line)
            elif pairs[0] != (n == 3):
                expected = "3" if pairs[0] else ("2" if require_label else "1 or 2")
                bad(line, f"expected {expected} tab-separated fields like line {pairs[1]}, found {n}")
                continue
            if n == 1:
                ex = _example(path, line, bad, fields[0], None, False, None, False)
            else:
                ex = _example(path, line, bad, fields[1], fields[2] if n == 3 else None, n == 3, fields[0],
                              require_label)
        else:
            expected = "2 or 3" if require_label else "1 to 3"
            shape = "(label, text[, text_b])" if require_label else "(text, or label, text[, text_b])"
            bad(line, f"expected {expected} tab-separated fields {shape}, found {n}")
            continue
        if ex is not None:
            out.append(ex)
    return out


def _read_csv(path: PathLike, text: str, bad: _BadRows, require_label: bool, log: Log) -> list[TextExample]:
    out: list[TextExample] = []
    columns: Optional[_Columns] = None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    end = 0  # last physical line consumed: a row starts on the line after the previous row
    while True:
        start = end + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            end = reader.line_num
            if columns is None:
                raise UserError(f"{path}:{start}: bad CSV quoting in the header: {e}") from None
            bad(start, f"bad CSV quoting: {e}")
            continue
        end = reader.line_num
        if _blank(fields):
            continue
        if columns is None:
            columns = _header_columns(path, fields, start, require_label, log, required=True)
            continue
        n = len(fields)
        if n != columns.width:
            bad(start, f"expected {columns.width} comma-separated fields as in the header (line {columns.line}), found {n}")
            continue
        ex = _example(path, start, bad, fields[columns.text_a],
                      fields[columns.text_b] if columns.text_b is not None else None, columns.text_b is not None,
                      fields[columns.label] if columns.label is not None else None, require_label)
        if ex is not None:
            out.append(ex)
    return out


def _json_label(value: object) -> tuple[Optional[str], Optional[str]]:
    """(label, problem): labels are strings or integers; null/missing is no label."""
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"label must be a string or an integer, got {json.dumps(value)[:40]}"
    return str(value), None


def _read_jsonl(path: PathLike, text: str, bad: _BadRows, require_label: bool) -> list[TextExample]:
    out: list[TextExample] = []
    seen_row = False
    for line, raw in _lines(text):
        if not raw.strip():
            continue
        first, seen_row = not seen_row, True
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            hint = ("; expected one JSON object per line (JSON Lines), this looks like a JSON array"
                    if first and raw.strip().startswith("[") else "")
            bad(line, f"invalid JSON: {e.msg} at column {e.colno}{hint}")
            continue
        if not isinstance(obj, dict):
            bad(line, f"expected a JSON object, found {type(obj).__name__}")
            continue
        key_a = next((k for k in TEXT_A_NAMES if k in obj), None)
        if key_a is None:
            bad(line, f"no text field (expected one of {', '.join(TEXT_A_NAMES)})")
            continue
        key_b = next((k for k in TEXT_B_NAMES if k in obj), None)
        problem = next((f"'{k}' must be a string, got {json.dumps(obj[k])[:40]}" for k in (key_a, key_b)
                        if k is not None and not isinstance(obj[k], str)), None)
        label, label_problem = _json_label(obj.get(LABEL_NAME))
        if problem or label_problem:
            bad(line, problem or label_problem)
            continue
        ex = _example(path, line, bad, obj[key_a], obj[key_b] if key_b else None, key_b is not None, label, require_label)
        if ex is not None:
            out.append(ex)
    return out


def read_classification(path: PathLike, fmt: Optional[str] = None, *, on_bad_rows: str = "error",
                        require_label: bool = True, log: Log = None) -> list[TextExample]:
    """Read a sequence-classification file (tsv, csv or jsonl) into `TextExample`s.

    Labels are kept as strings (`0\\ttext` gives label "0"; JSON integers become their str).
    Texts and labels are stripped of surrounding whitespace. Blank lines, and rows whose every
    field is blank (such as `,,` from spreadsheets), are skipped; a file with no examples is an
    error. Bad rows (wrong field count, empty text, empty label when `require_label`, bad quoting
    or JSON) raise at the first one, or with `on_bad_rows="skip"` are skipped and reported once
    through `log` (stderr when None).

    TSV: without a header a row is `label, text` or `label, text_a, text_b` (the first row decides
    which: a file does not mix them); one physical line per row (use CSV or JSONL for texts that
    contain newlines). A first line is a header when it names
    a text column (text, text_a, sentence, sentence1) and either a `label` column or only known
    names (also text_b, sentence2, id, idx, index, guid), e.g. GLUE's `sentence\\tlabel`; then
    columns go by name and every row must have the header's field count. Other columns are
    ignored, with one log line naming them (id/idx/index/guid without comment).
    CSV: the header is required, with the same names. JSONL: keys as above; labels may be strings
    or integers, null or missing means no label.

    `require_label=False` (input to `predict`): an empty or missing label gives `label=None`
    instead of a bad row, and a TSV line with exactly one field is a text. Two fields are still
    `label, text`; for unlabeled pairs use a header or an empty first field (`\\ta\\tb`).
    """
    fmt = guess_format(path, fmt)
    if fmt == "conll":
        raise UserError(f"{path}: CoNLL files hold token labels; a classification task needs tsv, csv or jsonl")
    bad = _BadRows(path, on_bad_rows, log)
    text = _read_text(path)
    if fmt == "tsv":
        out = _read_tsv(path, text, bad, require_label, log)
    elif fmt == "csv":
        out = _read_csv(path, text, bad, require_label, log)
    else:
        out = _read_jsonl(path, text, bad, require_label)
    bad.finish(len(out))
    return out


# --------------------------------------------------------------------------- token classification


def read_token_classification(path: PathLike, *, on_bad_rows: str = "error", require_label: bool = True,
                              log: Log = None) -> list[TokenExample]:
    """Read a CoNLL-style file: one token per line, blank line between sentences.

    Columns are whitespace-separated, the token first and the label last, so both `EU B-ORG` and
    CoNLL-2003's `EU NNP B-NP B-ORG` work; `-DOCSTART-` lines are skipped (and end a sentence).
    The first token line fixes the column count: a line with a different count is bad (it would
    otherwise take, say, a chunk tag for the label). A bad line makes its whole sentence bad, since
    dropping one token would misalign the rest: with `on_bad_rows="skip"` the sentence is skipped
    and counted. With `require_label=False` a file with one column gives sentences with
    `labels=None`. CoNLL-U (token in column 2) is not understood.
    """
    bad = _BadRows(path, on_bad_rows, log, what="sentences")
    text = _read_text(path)
    out: list[TokenExample] = []
    ncols: Optional[int] = None
    ncols_line = 0
    tokens: list[str] = []
    labels: list[str] = []
    start = 0
    broken = False

    def flush() -> None:
        nonlocal tokens, labels, broken
        if tokens and not broken:
            out.append(TokenExample(tokens, labels if ncols and ncols > 1 else None, f"{path}:{start}"))
        tokens, labels, broken = [], [], False

    for line, raw in _lines(text):
        cols = raw.split()
        if not cols:
            flush()
            continue
        if cols[0] == "-DOCSTART-":
            flush()
            continue
        if not tokens and not broken:
            start = line
        if broken:
            continue
        n = len(cols)
        problem = None
        if n == 1 and require_label:
            problem = "expected a token and a label (whitespace-separated), found 1 column"
        elif ncols is not None and n != ncols:
            problem = f"expected {ncols} whitespace-separated columns as on line {ncols_line}, found {n}"
        if problem:
            bad(line, problem)  # raises unless skipping
            broken = True
            continue
        if ncols is None:
            ncols, ncols_line = n, line
        tokens.append(cols[0])
        labels.append(cols[-1])
    flush()
    bad.finish(len(out))
    return out


# --------------------------------------------------------------------------- labels


def label_list(labels: Iterable[Optional[str]]) -> list[str]:
    """The sorted label set (None ignored); integer labels sort by value, so "2" < "10"."""
    unique = {label for label in labels if label is not None}
    if unique and all(_INT_RE.fullmatch(label) for label in unique):
        return sorted(unique, key=lambda label: (int(label), label))
    return sorted(unique)


def check_known_labels(examples: Iterable[Union[TextExample, TokenExample]], known: Sequence[str],
                       path: PathLike) -> None:
    """Fail on a label the model cannot predict: it is in `path` (an eval file), not in training."""
    allowed = set(known)
    shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
    for ex in examples:
        found = [ex.label] if isinstance(ex, TextExample) else (ex.labels or [])
        for i, label in enumerate(found):
            if label is not None and label not in allowed:
                where = ex.where or str(path)
                file, _, line = where.rpartition(":")
                if i and line.isdigit():  # a sentence's tokens are on consecutive lines
                    where = f"{file}:{int(line) + i}"
                raise UserError(f"{where}: label '{label}' is not in the training labels ({shown})")
