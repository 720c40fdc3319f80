"""Hostile inputs: random configs and data files, nasty files, code hidden in configs, models and
checkpoints, and runs that cannot fit. The rule throughout: bad input ends as exactly one
`error: ...` line on stderr naming the problem and where, exit code 2, no traceback, nothing run
that the input smuggled in, and nothing half-written.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import signal
import string
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigtrain.cli import main
from bigtrain.config import Config, _all_keys, check_batch, dump_yaml, load_config
from bigtrain.engine import build_ds_config
from bigtrain.errors import UserError

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], derandomize=True)
TINY_DATA = ["data.vocab_size=300", "data.seq_len=16"]
SMALLEST_DATA = ["data.vocab_size=300", "data.seq_len=2", "data.valid_fraction=0"]  # random data gets far


# --------------------------------------------------------------------------- helpers


def documents_prepared(out: str) -> int:
    """Documents in the prepared directory `bigtrain data prepare` printed (its manifest)."""
    manifest = json.loads((Path(out.strip()) / "manifest.json").read_text())
    return sum(src["documents"] for src in manifest["sources"].values())


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and stderr is exactly one `error:` line (as in test_bad_input)."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_ends_in_one_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 after progress lines: exactly one `error:` line, and it is the last one."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def assert_clean_exit(code: int, err: str) -> None:
    """The data property: it worked (exit 0), or it is one clean error (exit 2)."""
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        assert_ends_in_one_error(code, err)
    else:
        assert not any(line.startswith("error: ") for line in err.splitlines()), err


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""

    def expired(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"still running after {seconds} s: hung?")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def no_temp_leftovers(cache: Path) -> None:
    """Nothing half-written in the cache: every write there goes through a .tmp- directory."""
    left = [p for p in cache.rglob(".tmp-*")] if cache.exists() else []
    assert not left, left


# --------------------------------------------------------------------------- 1. config values

LEAF_KEYS = sorted(k for k in _all_keys(Config) if k not in ("model", "data", "train", "deepspeed"))
# Never starting with "-": the command line would read "--nproc=2" as an option and start work.
JUNK_KEY = st.text(alphabet=string.ascii_lowercase + "._-0123456789", min_size=1, max_size=12).filter(lambda k: not k.startswith("-"))
KEYS = st.one_of(
    st.sampled_from(LEAF_KEYS),
    st.sampled_from(LEAF_KEYS).map(lambda k: k + ".x"),  # below a leaf
    JUNK_KEY,
    JUNK_KEY.map(lambda k: f"train.{k}"),
    JUNK_KEY.map(lambda k: f"model.config.{k}"),
    JUNK_KEY.map(lambda k: f"deepspeed.config.{k}"),
)
SCALARS = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 10**30, -(10**30), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["fp16", "bf16", "zero_optimization", "optimizer", "train_batch_size",
                                     "gradient_accumulation_steps", "train_micro_batch_size_per_gpu"]),
                    st.one_of(SCALARS, st.dictionaries(st.sampled_from(["enabled", "stage", "type"]), SCALARS, max_size=2)),
                    max_size=3),
)
# Text as typed after `key=` (or after `key:` in a file): YAML tags, broken flow, anchors, ...
RAW = st.sampled_from([
    "nan", ".nan", ".inf", "-.inf", "1e999", "-1e999", "9" * 400, "1" * 5000, "0x" + "f" * 400, "0x", "!!int 0x",
    "!!float abc", "!!timestamp 2020-13-45", "!!binary ***", "!!python/object/apply:os.system ['true']",
    "!!set {a}", "[1, 2", "{a: 1", "{a: [1, {b: 2}]}", "&a [*a]", "~", "", "  ", "yes", "off", "3e-4", "2020-01-01",
    "'quoted'", '"\\x00nul"', "[" * 300 + "]" * 300, "{fp16: 5}", "{bf16: null}", "{zero_optimization: 5}",
    "{x: 2020-01-01}", "{1: 2}", "a\u2028b", "a\rb", "\t", "- 1",
])
PAIRS = st.lists(st.tuples(KEYS, st.one_of(VALUES.map(lambda v: ("value", v)), RAW.map(lambda r: ("raw", r)))), min_size=1, max_size=3)


def config_property(path, overrides) -> tuple[str, str]:
    """A Config (that also builds a ds_config, passes the batch check and dumps as YAML), or a
    one-line UserError; any other exception fails the test. Returns (stage, message): stage is
    "ok", "load" (load_config refused it) or "build" (the ds_config or batch check did)."""
    stage = "load"
    try:
        cfg = load_config(path, overrides)
        stage = "build"
        build_ds_config(cfg, 1, True)
        check_batch(cfg, 1)
        dump_yaml(cfg)
        json.dumps(cfg.to_dict()["deepspeed"]["config"] or {})
        return "ok", ""
    except UserError as e:
        message = str(e)
        assert message.strip() and "\n" not in message, message
        return stage, message


def override_text(kind: str, value) -> str:
    if kind == "raw":
        return value
    try:
        return json.dumps(value, allow_nan=True)
    except ValueError:  # ints beyond the default digit limit
        return str(value)


@settings(max_examples=40, **FAST)
@given(pairs=PAIRS)
def test_config_overrides_never_crash(capsys, tmp_path, pairs):
    overrides = [f"{key}={override_text(kind, value)}" for key, (kind, value) in pairs]
    stage, message = config_property(None, overrides)
    if stage != "ok":
        assert message.startswith("override "), message  # where: the override at fault
    if stage == "load":
        # The same failure through the command line: one line, exit 2, nothing written. (Only
        # load failures: a config that loads would start a run, with its side effects.)
        code, _, err = run_main(capsys, ["train", f"output_dir={tmp_path}/never", *overrides])
        assert_one_error(code, err)
        assert not (tmp_path / "never").exists()


def _yaml_text(pairs) -> str:
    """A YAML file setting each dotted key: dumped values, or raw text after `key: `."""
    lines = []
    for key, (kind, value) in pairs:
        parts = [p or "x" for p in key.split(".")]
        for depth, part in enumerate(parts[:-1]):
            lines.append("  " * depth + yaml.safe_dump(part, default_style='"').strip().removesuffix("...").strip() + ":")
        leaf = "  " * (len(parts) - 1) + yaml.safe_dump(parts[-1], default_style='"').strip().removesuffix("...").strip() + ": "
        if kind == "raw":
            lines.append(leaf + value.replace("\n", " ").replace("\r", " ").replace("\u2028", " "))
        else:
            try:
                dumped = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("...").strip()
            except ValueError:  # ints beyond the default digit limit
                dumped = str(value)
            lines.append(leaf + dumped)
    return "\n".join(lines) + "\n"


@settings(max_examples=30, **FAST)
@given(pairs=PAIRS)
def test_config_files_never_crash(capsys, tmp_path, pairs):
    cfg_file = tmp_path / "hostile.yaml"
    cfg_file.write_text(_yaml_text(pairs), encoding="utf-8")
    stage, message = config_property(str(cfg_file), [])
    if stage != "ok":
        assert str(cfg_file) in message, message
    if stage == "load":
        code, _, err = run_main(capsys, ["train", str(cfg_file), f"output_dir={tmp_path}/never"])
        assert_one_error(code, err, str(cfg_file))
        assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("override, needles", [
    ("train.lr=" + "9" * 400, ["train.lr", "finite"]),                     # was OverflowError
    ("train.lr=0x" + "f" * 400, ["train.lr", "finite"]),                   # was OverflowError
    ("train.lr=!!timestamp 2020-13-45", ["train.lr", "must be float"]),    # was ValueError from PyYAML
    ("train.lr=!!int 0x", ["train.lr"]),
    ("train.lr=" + "[" * 3000, ["train.lr"]),                              # was RecursionError
    ("deepspeed.timeout_minutes=" + "1" * 5000, ["deepspeed.timeout_minutes", "finite"]),  # was ValueError (int digits)
    ("deepspeed.config={fp16: 5}", ["deepspeed.config", "'fp16' must be a mapping"]),  # was AttributeError in build_ds_config
    ("deepspeed.config={bf16: null}", ["deepspeed.config", "'bf16' must be a mapping"]),
    ("model.config={n_layer: 2020-01-01}", ["model.config", "plain JSON"]),  # would fail writing config.json mid-run
    ("output_dir=a\x00b", ["output_dir", "NUL"]),                          # was ValueError from mkdir
    ("x.y.z=1", ["override x.y.z=1", "unknown config key 'x'"]),          # was located at 'defaults'
])
def test_config_regressions(capsys, override, needles):
    code, _, err = run_main(capsys, ["train", override])
    line = assert_one_error(code, err, *needles)
    assert len(line) < 400, line  # a 5000-digit value is not echoed whole


@pytest.mark.parametrize("text, line", [
    ("train:\n  lr: 0.1\n  max_steps: !!int 0x\n", 3),
    ("train:\n  lr: !!timestamp 2020-13-45\n", 2),
])
def test_yaml_constructor_errors_name_the_line(capsys, tmp_path, text, line):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    code, _, err = run_main(capsys, ["train", str(cfg_file)])
    assert_one_error(code, err, f"{cfg_file}:{line}", "invalid YAML")


def test_model_config_values_are_checked_before_building(capsys):
    from bigtrain.models import preset_config

    for overrides, needle in [
        ({"n_layer": [1]}, "model.config.n_layer: must be int"),
        ({"n_layer": 10**30}, "model.config.n_layer: must be an integer in"),
        ({"n_head": 0}, "model.config.n_head"),
        ({"n_embd": 100, "n_head": 3}, "must be a multiple of n_head=3"),
        ({"layer_norm_epsilon": "small"}, "model.config.layer_norm_epsilon: must be float"),
    ]:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            preset_config("tiny", overrides, 512)
    assert preset_config("tiny", {"n_layer": 3, "layer_norm_epsilon": 1}, 512).n_layer == 3


# --------------------------------------------------------------------------- 2. data files


def _mixed_encodings(parts) -> bytes:
    return b"".join(text.encode(enc, errors="replace") for text, enc in parts)


DATA_BYTES = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.sampled_from(["", " ", "\t", "\r", "\x0b", "\x0c", "\u3000", "\u2028", "\x1c", "\x85"]), max_size=40)
    .map(lambda xs: "\n".join(xs).encode("utf-8")),
    st.lists(st.tuples(st.text(max_size=80), st.sampled_from(["utf-8", "latin-1", "utf-16", "utf-16-le", "utf-32"])), min_size=1, max_size=6)
    .map(_mixed_encodings),
    st.lists(st.one_of(st.text(alphabet=string.printable, max_size=60).map(str.encode), st.just(b"\x00"), st.just(b"\x00" * 50)), max_size=20)
    .map(b"".join),
)


@settings(max_examples=10, **FAST)
@given(data=DATA_BYTES, ext=st.sampled_from([".txt", ".jsonl", ".md"]),
       options=st.fixed_dictionaries({
           "data.on_decode_error": st.sampled_from(["replace", "replace", "error"]),
           "data.mode": st.sampled_from(["packed", "line_by_line"]),
           "data.sample_by": st.sampled_from(["document", "line", "paragraph"]),
       }))
def test_data_prepare_random_files(capsys, tmp_path, cache_dir, data, ext, options):
    f = tmp_path / f"d-{hashlib.sha256(data).hexdigest()[:12]}{ext}"
    f.write_bytes(data)
    argv = ["data", "prepare", f"data.train_files={f}", *SMALLEST_DATA, *(f"{k}={v}" for k, v in options.items())]
    with deadline(60):
        code, _, err = run_main(capsys, argv)
    assert_clean_exit(code, err)
    no_temp_leftovers(cache_dir)


JSON_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=200)
GOOD_RECORD = st.one_of(
    st.fixed_dictionaries({"text": JSON_TEXT}),
    # Other fields of changing types: the `datasets` JSON loader infers one Arrow type per column.
    st.fixed_dictionaries({"text": JSON_TEXT, "meta": st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                                                                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))}),
)
BAD_RECORD = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.integers(), st.none(), st.lists(JSON_TEXT, max_size=2))}),
    st.fixed_dictionaries({"txt": JSON_TEXT}),
    st.just([1, 2]),
)


@settings(max_examples=8, **FAST)
@given(records=st.lists(GOOD_RECORD, min_size=1, max_size=8), bad=st.one_of(st.none(), st.tuples(st.integers(0, 8), BAD_RECORD)),
       ascii_only=st.booleans(), blank=st.sampled_from(["", "\n", "\r\n"]))
def test_data_prepare_random_jsonl(capsys, tmp_path, cache_dir, records, bad, ascii_only, blank):
    """JSON lines may hold U+2028, U+0085 & co. unescaped: they are not line ends."""
    if bad is not None:
        records = records[: bad[0]] + [bad[1]] + records[bad[0]:]
    text = blank.join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records)
    f = tmp_path / f"r-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    f.write_text(text, encoding="utf-8")
    code, _, err = run_main(capsys, ["data", "prepare", f"data.train_files={f}", *SMALLEST_DATA])
    assert_clean_exit(code, err)
    if bad is not None:
        assert code == 2, err
        assert f"{f}:" in err


def test_jsonl_with_unicode_line_separators_is_valid(capsys, tmp_path, cache_dir):
    f = tmp_path / "u2028.jsonl"
    doc = "first part\u2028second part\x85third part " * 40
    f.write_text(json.dumps({"text": doc}, ensure_ascii=False) + "\n", encoding="utf-8")
    code, out, err = run_main(capsys, ["data", "prepare", f"data.train_files={f}", *TINY_DATA])
    assert code == 0, err  # was "invalid JSON" at a line that does not exist
    assert documents_prepared(out) == 1


def test_jsonl_fields_bigtrain_does_not_read_may_change_type(capsys, tmp_path, cache_dir):
    """Found by test_data_prepare_random_jsonl: `datasets`' JSON builder failed with a bare
    `ValueError: Expected object or value` (a traceback) on "meta": "" then "meta": []."""
    f = tmp_path / "meta.jsonl"
    f.write_text('{"text": "0", "meta": ""}\n\n{"text": "some more words", "meta": []}\n{"text": "x", "meta": {"a": [1, "b"]}}\n')
    code, out, err = run_main(capsys, ["data", "prepare", f"data.train_files={f}", *SMALLEST_DATA])
    assert code == 0, err
    assert documents_prepared(out) == 3


LABELED_FIELD = st.one_of(st.text(max_size=15), st.sampled_from(["", " ", '"', '""', '"a\tb"', "label", "text", "sentence", "0", "1", "pos"]))
LABELED_ROWS = st.lists(st.lists(LABELED_FIELD, min_size=0, max_size=4), max_size=8)


@settings(max_examples=25, **FAST)
@given(kind=st.sampled_from(["tsv", "csv", "jsonl", "conll"]), rows=LABELED_ROWS, junk=st.binary(max_size=200),
       use_junk=st.booleans(), on_bad_rows=st.sampled_from(["error", "skip"]))
def test_labeled_readers_random_files(tmp_path, kind, rows, junk, use_junk, on_bad_rows):
    from bigtrain.labeled import check_known_labels, label_list
    from bigtrain.tasks import read_examples

    sep = {"tsv": "\t", "csv": ",", "conll": " "}.get(kind)
    if use_junk:
        data = junk
    elif kind == "jsonl":
        data = "\n".join(json.dumps(dict(zip(["label", "text", "text_b", "x"], r))) for r in rows).encode("utf-8", "surrogatepass")
    else:
        data = "\n".join(sep.join(r) for r in rows).encode("utf-8", "surrogatepass")
    f = tmp_path / f"l-{hashlib.sha256(data).hexdigest()[:12]}.{kind}"
    f.write_bytes(data)
    task = "token_classify" if kind == "conll" else "classify"
    try:
        examples = read_examples(task, str(f), None, on_bad_rows, log=lambda *a: None)
    except UserError as e:
        message = str(e)
        assert message.startswith(str(f)) and "\n" not in message, message
        return
    assert examples
    names = label_list([lab for e in examples for lab in (e.labels if task == "token_classify" else [e.label])])
    check_known_labels(examples, names, str(f))


def test_labeled_special_files(tmp_path):
    from bigtrain.tasks import read_examples

    fifo = tmp_path / "fifo.tsv"
    os.mkfifo(fifo)
    with deadline(20):  # opening the FIFO would block forever
        with pytest.raises(UserError, match="no such file"):
            read_examples("classify", str(fifo), None, "error", print)
    if Path("/proc/self/mem").exists():  # a regular file that cannot be read (even as root)
        with pytest.raises(UserError, match="cannot read"):
            read_examples("classify", "/proc/self/mem", "tsv", "error", print)
    long = tmp_path / "long.tsv"
    long.write_text("pos\tfine\nneg\t" + "word " * 300_000 + "\n")
    with pytest.raises(UserError, match=f"{long}:2: a text of 1,499,999 characters"):
        read_examples("classify", str(long), None, "error", print)
    big = tmp_path / "wide.csv"
    big.write_text("text,label\n" + "x" * 200_000 + ",1\nfine,0\n")
    with pytest.raises(UserError, match=f"{big}:2: bad CSV quoting: field larger than field limit"):
        read_examples("classify", str(big), None, "error", print)


# --------------------------------------------------------------------------- 3. nasty files


def test_100mb_single_line_is_refused_quickly(capsys, tmp_path, cache_dir):
    """A 100 MB line would be tokenized as one text (~100x its size in memory, minutes): refused
    up front at data.max_line_bytes (default 4 MiB), naming FILE:LINE and the key."""
    f = tmp_path / "oneline.txt"
    chunk = b"lorem ipsum dolor sit amet, consectetur adipiscing elit " * 1000
    with open(f, "wb") as fh:
        fh.write(b"a short first line\n")
        while fh.tell() < 100_000_000:
            fh.write(chunk)
    try:
        start = time.monotonic()
        with deadline(60):
            code, _, err = run_main(capsys, ["data", "prepare", f"data.train_files={f}", *TINY_DATA])
        elapsed = time.monotonic() - start
        assert_one_error(code, err, f"{f}:2", "data.max_line_bytes")
        assert elapsed < 30, elapsed
        no_temp_leftovers(cache_dir)
    finally:
        f.unlink()


def test_max_line_bytes_is_a_config_key(capsys, tmp_path, cache_dir):
    f = tmp_path / "lines.jsonl"
    f.write_text('{"text": "short"}\n{"text": "also short"}\n{"text": "' + "y" * 3000 + '"}\n')
    code, _, err = run_main(capsys, ["data", "prepare", f"data.train_files={f}", "data.max_line_bytes=1000", *TINY_DATA])
    assert_one_error(code, err, f"{f}:3", "data.max_line_bytes=1,000")
    code, _, err = run_main(capsys, ["train", "data.max_line_bytes=0"])
    assert_one_error(code, err, "data.max_line_bytes")


def test_long_line_without_spaces_prepares_in_seconds(capsys, tmp_path, cache_dir):
    """3 MB without whitespace (under the line limit): the BPE trainer is quadratic in the length
    of one word (200 KB took a minute, 5 MB did not finish in 5), so bigtrain trains on pieces."""
    f = tmp_path / "run.txt"
    f.write_text("header line\n" + "ab" * 1_500_000 + "\n")
    start = time.monotonic()
    with deadline(120):
        code, out, err = run_main(capsys, ["data", "prepare", f"data.train_files={f}", *TINY_DATA])
    assert code == 0, err
    assert time.monotonic() - start < 60
    assert documents_prepared(out) == 1


def test_long_documents_are_tokenized_in_pieces_with_the_same_ids(tmp_path, monkeypatch):
    import random

    import bigtrain.data as data_mod
    from bigtrain.tokenizer import load_tokenizer, train_bpe, train_wordpiece

    rnd = random.Random(0)
    words = ["def", "foo(x):", "  ", "\n", "return", "x+1", "é", "日本", "\t", "  \n\n", "a" * 50, "'s", "12345"]
    text = "".join(rnd.choice(words) + rnd.choice([" ", "", "\n", "  "]) for _ in range(6000))
    monkeypatch.setattr(data_mod, "DOC_PIECE_CHARS", 500)
    for trainer, name in ((train_bpe, "bpe"), (train_wordpiece, "wp")):
        tok = load_tokenizer(trainer([text], 400, tmp_path / name))
        whole = tok([text], add_special_tokens=False)["input_ids"][0]
        # `bigtrain data prepare` encodes with the `tokenizers` object itself, piece by piece.
        from bigtrain.prepare import encode_long

        assert [int(i) for part in encode_long(tok.backend_tokenizer, text) for i in part] == whole, name


def test_symlink_loop_in_data_directory(capsys, tmp_path, cache_dir):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("the only document in here, repeated enough to pack. " * 20)
    (d / "loop").symlink_to(d)
    (d / "self.txt").symlink_to(d / "self.txt")  # a link to itself: ELOOP on open
    with deadline(60):
        code, out, err = run_main(capsys, ["data", "prepare", f"data.train_files={d}", *TINY_DATA])
        assert code == 0, err
        assert documents_prepared(out) == 1
        # `**` follows symlinks: each file once, not once per level of d/loop/loop/...
        code, out, err = run_main(capsys, ["data", "prepare", f"data.train_files={d}/**/*.txt", *TINY_DATA])
        assert code == 0, err
        assert documents_prepared(out) == 1
        code, _, err = run_main(capsys, ["data", "prepare", f"data.train_files={d}/self.txt", *TINY_DATA])
        assert_one_error(code, err, "self.txt", "symbolic link")


def test_data_file_that_is_not_a_file(capsys, tmp_path, cache_dir):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    (tmp_path / "dir.txt").mkdir()
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    only_fifo = tmp_path / "fifodir"
    only_fifo.mkdir()
    os.mkfifo(only_fifo / "x.txt")
    cases = [
        (str(fifo), ["pipe.txt", "not a regular file"]),  # refused before opening (would block)
        (str(tmp_path / "dir.txt"), ["dir.txt", "holds no data files"]),
        (str(tmp_path / "dangling.txt"), ["dangling.txt", "leads nowhere"]),
        (str(only_fifo), ["fifodir", "holds no data files"]),
        (str(tmp_path / ("n" * 300)), ["data.train_files", "File name too long"]),  # was OSError from is_dir()
    ]
    if Path("/proc/self/mem").exists():  # root can read any chmod 000 file, not this one
        cases.append(("/proc/self/mem", ["data.train_files", "cannot read /proc/self/mem"]))
    with deadline(30):
        for spec, needles in cases:
            code, _, err = run_main(capsys, ["data", "prepare", f"data.train_files={spec}", *TINY_DATA])
            assert_one_error(code, err, *needles)
        code, _, err = run_main(capsys, ["data", "prepare", f"data.train_files={tmp_path}/pipe*", *TINY_DATA])
        assert_one_error(code, err, "no files match")


# --------------------------------------------------------------------------- 4. safe loading


def test_yaml_cannot_run_code(capsys, tmp_path):
    marker = tmp_path / "MARKER"
    cfg_file = tmp_path / "evil.yaml"
    cfg_file.write_text(f'train:\n  lr: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, _, err = run_main(capsys, ["train", str(cfg_file), f"output_dir={tmp_path}/o"])
    assert_one_error(code, err, str(cfg_file))
    code, _, err = run_main(capsys, ["train", f'train.lr=!!python/object/apply:os.system ["touch {marker}"]', f"output_dir={tmp_path}/o"])
    assert_one_error(code, err, "train.lr")
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def _evil_model_dir(root: Path, marker: Path) -> Path:
    """A model directory whose config.json (and tokenizer_config.json) map to its own Python file,
    which creates `marker` when imported."""
    d = root / "evil_model"
    d.mkdir()
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\nfrom transformers import PretrainedConfig, PreTrainedTokenizer\n" \
              "class EvilConfig(PretrainedConfig):\n    model_type = 'evilnet'\nclass EvilTokenizer(PreTrainedTokenizer):\n    pass\n"
    (d / "evil_code.py").write_text(payload)
    (d / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "architectures": ["EvilForSequenceClassification"], "num_labels": 2,
        "auto_map": {"AutoConfig": "evil_code.EvilConfig", "AutoModelForSequenceClassification": "evil_code.EvilModel"},
    }))
    tok = root / "evil_tokenizer"
    tok.mkdir()
    (tok / "evil_code.py").write_text(payload)
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}}))
    return d


def test_remote_code_is_never_run(capsys, tmp_path, monkeypatch):
    """transformers, when trust_remote_code is left unset, asks on the terminal whether to run a
    directory's code and runs it on "y": answer "y" here, so only trust_remote_code=False passes."""
    marker = tmp_path / "MARKER"
    model = _evil_model_dir(tmp_path, marker)
    train = tmp_path / "train.tsv"
    train.write_text("pos\tgood film\nneg\tbad film\npos\tnice one\nneg\tawful one\n")
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")
    needles = ["needs trust_remote_code", str(model)]
    out_dir = tmp_path / "run"
    code, _, err = run_main(capsys, ["train", "task=classify", f"model.from_pretrained={model}", f"data.train_files={train}", f"output_dir={out_dir}"])
    assert_one_error(code, err, "model.from_pretrained", *needles)
    assert not out_dir.exists()
    code, _, err = run_main(capsys, ["eval", str(model), f"data.train_files={train}"])
    assert_one_error(code, err, "MODEL_DIR", *needles)
    code, _, err = run_main(capsys, ["predict", str(model), "--input", str(train)])
    assert_one_error(code, err, *needles)
    code, _, err = run_main(capsys, ["data", "prepare", f"data.tokenizer={tmp_path / 'evil_tokenizer'}", f"data.train_files={train}"])
    assert_one_error(code, err, "data.tokenizer", "needs trust_remote_code", "tokenizer_config.json")
    assert not marker.exists()
    assert not (model / "eval_results.json").exists()


def test_generate_never_runs_remote_code(capsys, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    marker = tmp_path / "MARKER"
    model = _evil_model_dir(tmp_path, marker)
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # not ~/.cache
    try:
        code, _, err = run_main(capsys, ["generate", str(model), "--prompt", "x"])
    except Exception:  # noqa: BLE001 - a traceback is a failure of the rule too
        code, err = None, "traceback"
    assert not marker.exists()
    assert_one_error(code, err, "needs trust_remote_code")


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _manifest(ckpt: Path) -> None:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps({"files": files}))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_checkpoint_pickle_cannot_run_code(capsys, tmp_path, zipped):
    import torch

    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({
        "step": 1, "task": "clm", "samples_seen": 4, "tokens_seen": 256, "global_batch": 4, "world_size": 1,
        "zero_stage": 0, "precision": "fp32", "seed": 1,
    }))
    torch.save({"module": {}, "x": Evil(marker)}, ckpt / "mp_rank_00_model_states.pt", _use_new_zipfile_serialization=zipped)
    _manifest(ckpt)
    from bigtrain.checkpoint import check_checkpoint

    assert check_checkpoint(ckpt) is None  # a valid checkpoint by its manifest: only the pickle is evil
    out = tmp_path / "out"
    for src in (ckpt, tmp_path / "run"):
        code, _, err = run_main(capsys, ["export", str(src), str(out)])
        assert_one_error(code, err, "--trust-checkpoint", "mp_rank_00_model_states.pt")
    assert not marker.exists()
    assert not out.exists()
    assert not list(tmp_path.glob(".tmp-export-*"))


# --------------------------------------------------------------------------- 5. preflight

TRAIN_SMALL = ["data.vocab_size=512", "data.seq_len=64", "train.micro_batch_size=4", "train.progress=false",
               "train.sample_tokens=0", "train.max_steps=2"]


def test_not_enough_disk_for_two_checkpoints(cli, corpus, tmp_path):
    """~1 trillion parameters (20 layers of width 65536: ~16 TB per checkpoint at 16 bytes per
    parameter), more disk than any machine has. Building on the meta device costs time per layer
    (200 layers took ~60 s on 2 busy cores), so 20.""" 
    out = tmp_path / "huge"
    start = time.monotonic()
    r = cli(["train", f"data.train_files={corpus}", *TRAIN_SMALL, "model.config.n_layer=20", "model.config.n_embd=65536",
             "model.config.n_head=4", f"output_dir={out}"], timeout=300)
    line = assert_ends_in_one_error(r.returncode, r.stderr, "not enough free disk", str(out))
    assert "output_dir" in line
    assert time.monotonic() - start < 120
    assert not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists()


def test_tokenizer_larger_than_embedding(cli, corpus, tmp_path):
    out = tmp_path / "small_vocab"
    r = cli(["train", f"data.train_files={corpus}", *TRAIN_SMALL, "model.config.n_layer=1", "model.config.n_embd=32",
             "model.config.n_head=2", "model.config.vocab_size=100", f"output_dir={out}"], timeout=300)
    assert_ends_in_one_error(r.returncode, r.stderr, "model.config", "embedding holds 100")
    assert not (out / "checkpoints").exists()


def test_output_dir_below_a_regular_file(capsys, tmp_path, corpus):
    blocker = tmp_path / "FILE"
    blocker.write_text("i am a file\n")
    code, _, err = run_main(capsys, ["train", f"data.train_files={corpus}", *TRAIN_SMALL, f"output_dir={blocker}/sub", "--nproc", "1"])
    assert_one_error(code, err, "output_dir", str(blocker))
    assert blocker.read_text() == "i am a file\n"
    code, _, err = run_main(capsys, ["train", f"data.train_files={corpus}", *TRAIN_SMALL, f"output_dir={blocker}", "--nproc", "1"])
    assert_one_error(code, err, "output_dir", "not a directory")
