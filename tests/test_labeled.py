"""Readers of labeled fine-tuning files (bigtrain.labeled) and the metrics (bigtrain.scores).

Fast unit tests, no training. Expected metric values are worked out by hand in the comments.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bigtrain.errors import UserError
from bigtrain.labeled import (
    TextExample, TokenExample, check_known_labels, guess_format, label_list, read_classification,
    read_token_classification,
)
from bigtrain.scores import accuracy, bio_entities, classification_report, entity_prf, macro_f1, per_class


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    p = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    p.write_bytes(content)
    return str(p)


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    return str(info.value)


def rows(examples: list[TextExample]) -> list[tuple]:
    return [(e.label, e.text_a, e.text_b) for e in examples]


# --------------------------------------------------------------------------- formats


def test_guess_format():
    assert guess_format("a/train.TSV") == "tsv"
    assert guess_format("x.tab") == "tsv"
    assert guess_format("x.csv") == "csv"
    assert guess_format("x.json") == "jsonl"
    assert guess_format("x.jsonl") == "jsonl"
    assert guess_format("x.iob") == "conll"
    assert guess_format("x.txt") == "conll"
    assert guess_format("x.data", "csv") == "csv"  # an explicit format wins over the extension
    assert "data.format" in error_of(guess_format, "x.data")
    assert "'xml'" in error_of(guess_format, "x.tsv", "xml")


# --------------------------------------------------------------------------- TSV


def test_tsv_two_and_three_columns_integer_labels(tmp_path):
    p = write(tmp_path, "train.tsv", "0\tgood movie\n1\tbad one\n\n10\t  spaced  \n")
    ex = read_classification(p)
    assert rows(ex) == [("0", "good movie", None), ("1", "bad one", None), ("10", "spaced", None)]
    # A blank line (3) is skipped but still counted in the line numbers.
    assert [e.where for e in ex] == [f"{p}:1", f"{p}:2", f"{p}:4"]
    p = write(tmp_path, "pairs.tsv", "1\ta premise\ta hypothesis\n0\tx\ty\n")
    assert rows(read_classification(p)) == [("1", "a premise", "a hypothesis"), ("0", "x", "y")]
    # A file is single texts or pairs; a row of the other kind has lost (or gained) a field.
    p = write(tmp_path, "mixed.tsv", "1\ta premise\ta hypothesis\n0\tno hypothesis\n")
    assert error_of(read_classification, p) == f"{p}:2: expected 3 tab-separated fields like line 1, found 2"


def test_tsv_glue_header(tmp_path):
    p = write(tmp_path, "sst2.tsv", "sentence\tlabel\nhide new secretions \t0\nit 's a charming journey\t1\n")
    assert rows(read_classification(p)) == [("0", "hide new secretions", None), ("1", "it 's a charming journey", None)]
    p = write(tmp_path, "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA man.\tA person.\tentailment\n")
    assert rows(read_classification(p)) == [("entailment", "A man.", "A person.")]
    p = write(tmp_path, "plain.tsv", "label\ttext\npos\tok\n")
    ex = read_classification(p)
    assert rows(ex) == [("pos", "ok", None)] and ex[0].where == f"{p}:2"


def test_tsv_header_extra_column_is_logged(tmp_path):
    p = write(tmp_path, "qnli.tsv", "index\tquestion\tsentence\tlabel\n0\tWhat?\tThis.\tentailment\n")
    logged: list[str] = []
    assert rows(read_classification(p, log=logged.append)) == [("entailment", "This.", None)]
    assert len(logged) == 1 and f"{p}:1: ignoring column(s) question (" in logged[0]


def test_tsv_header_row_with_wrong_count(tmp_path):
    p = write(tmp_path, "h.tsv", "sentence\tlabel\nfine\t1\nno label here\n")
    assert error_of(read_classification, p).startswith(f"{p}:3: expected 2 tab-separated fields as in the header (line 1), found 1")


def test_tsv_quoted_fields(tmp_path):
    p = write(tmp_path, "q.tsv", '1\t"a ""quoted"" text"\n0\t"tab\tinside"\n1\t"Great" movie\n0\t"unbalanced\n1\tnext line\n')
    assert rows(read_classification(p)) == [
        ("1", 'a "quoted" text', None),
        ("0", "tab\tinside", None),
        ("1", '"Great" movie', None),  # not well-formed quoting: kept verbatim, not mangled
        ("0", '"unbalanced', None),     # and a lone quote does not swallow the next line
        ("1", "next line", None),
    ]


def test_bom_and_crlf(tmp_path):
    p = write(tmp_path, "w.tsv", b"\xef\xbb\xbflabel\ttext\r\npos\tfirst\r\n\r\nneg\tsecond\r\n")
    ex = read_classification(p)
    assert rows(ex) == [("pos", "first", None), ("neg", "second", None)]
    assert ex[1].where == f"{p}:4"
    p = write(tmp_path, "w.csv", b"\xef\xbb\xbftext,label\r\nhello,1\r\n")
    assert rows(read_classification(p)) == [("1", "hello", None)]
    p = write(tmp_path, "crlf.tsv", b"0\ta\r\n0\tb\tc\td\r\n")
    assert error_of(read_classification, p).startswith(f"{p}:2: expected 2 or 3 tab-separated fields")


def test_tsv_bad_rows_name_their_line(tmp_path):
    p = write(tmp_path, "train.tsv", "0\ta\n\n0\ta\tb\tc\n")
    assert error_of(read_classification, p) == (
        f"{p}:3: expected 2 or 3 tab-separated fields (label, text[, text_b]), found 4")
    p = write(tmp_path, "t2.tsv", "0\ta\n1\t   \n")
    assert error_of(read_classification, p) == f"{p}:2: empty text"
    p = write(tmp_path, "t3.tsv", "0\ta\n0\tb\n\tc\n")
    assert error_of(read_classification, p) == f"{p}:3: empty label"
    p = write(tmp_path, "t4.tsv", "0\ta\tb\n1\tc\t \n")
    assert error_of(read_classification, p) == f"{p}:2: empty text_b"
    p = write(tmp_path, "t5.tsv", "just text\n")
    assert error_of(read_classification, p).startswith(f"{p}:1: expected 2 or 3 tab-separated fields")


def test_skip_bad_rows_counts_and_logs_once(tmp_path):
    p = write(tmp_path, "train.tsv", "0\tgood\n1\n0\tfine\n\tno label\n1\tlast\n")
    logged: list[str] = []
    ex = read_classification(p, on_bad_rows="skip", log=logged.append)
    assert rows(ex) == [("0", "good", None), ("0", "fine", None), ("1", "last", None)]
    assert logged == [f"{p}: skipped 2 bad rows (first: {p}:2: expected 2 or 3 tab-separated fields "
                      "(label, text[, text_b]), found 1)"]
    logged.clear()
    read_classification(write(tmp_path, "ok.tsv", "0\tgood\n"), on_bad_rows="skip", log=logged.append)
    assert logged == []  # nothing to report
    assert "on_bad_rows" in error_of(read_classification, p, on_bad_rows="ignore")


def test_skip_on_stderr_when_no_log(tmp_path, capsys):
    p = write(tmp_path, "train.tsv", "0\tgood\n1\t\n")
    assert len(read_classification(p, on_bad_rows="skip")) == 1
    assert f"{p}: skipped 1 bad rows (first: {p}:2: empty text)" in capsys.readouterr().err


def test_empty_file(tmp_path):
    p = write(tmp_path, "empty.tsv", "")
    assert error_of(read_classification, p) == f"{p}: no examples"
    p = write(tmp_path, "blank.jsonl", "\n  \n\r\n")
    assert error_of(read_classification, p) == f"{p}: no examples"
    p = write(tmp_path, "header_only.csv", "text,label\n")
    assert error_of(read_classification, p) == f"{p}: no examples"
    p = write(tmp_path, "all_bad.tsv", "0\t\n")
    assert error_of(read_classification, p, on_bad_rows="skip", log=lambda m: None).startswith(
        f"{p}: no examples (1 bad rows skipped; first: {p}:1: empty text)")
    assert error_of(read_classification, str(tmp_path / "missing.tsv")).endswith("missing.tsv: file not found")


def test_invalid_utf8_names_its_line(tmp_path):
    p = write(tmp_path, "latin1.tsv", "0\tfine\n1\tok\n".encode() + b"1\tcaf\xe9\n")
    msg = error_of(read_classification, p)
    assert msg.startswith(f"{p}:3: not valid UTF-8") and "0xe9" in msg
    p = write(tmp_path, "latin1.conll", b"EU B-ORG\n\nM\xfcller B-PER\n")
    assert error_of(read_token_classification, p).startswith(f"{p}:3: not valid UTF-8")


def test_require_label_false(tmp_path):
    p = write(tmp_path, "predict.tsv", "just a text\n0\tlabeled text\n\tempty label\n")
    assert rows(read_classification(p, require_label=False)) == [
        (None, "just a text", None), ("0", "labeled text", None), (None, "empty label", None)]
    p = write(tmp_path, "predict_pairs.tsv", "\ta\tb\n")
    assert rows(read_classification(p, require_label=False)) == [(None, "a", "b")]
    p = write(tmp_path, "glue_test.tsv", "index\tsentence\n0\tuneasy mishmash\n")
    assert rows(read_classification(p, require_label=False)) == [(None, "uneasy mishmash", None)]
    p = write(tmp_path, "predict.jsonl", '{"text": "x"}\n{"text": "y", "label": null}\n')
    assert rows(read_classification(p, require_label=False)) == [(None, "x", None), (None, "y", None)]
    p = write(tmp_path, "predict.csv", "text\nhello\n")
    assert rows(read_classification(p, require_label=False)) == [(None, "hello", None)]
    assert error_of(read_classification, p).startswith(f"{p}:1: the header names no 'label' column")


# --------------------------------------------------------------------------- CSV


def test_csv_header_quotes_and_multiline(tmp_path):
    p = write(tmp_path, "train.csv",
              'label,text\npos,"Hello, world"\nneg,"line one\nline two"\n\npos,"say ""hi"""\nneg,a,b\n')
    with pytest.raises(UserError) as info:
        read_classification(p)
    # Line 1 header, 2 row, 3-4 one quoted row, 5 blank, 6 row, 7 the bad row.
    assert str(info.value) == f"{p}:7: expected 2 comma-separated fields as in the header (line 1), found 3"
    logged: list[str] = []
    ex = read_classification(p, on_bad_rows="skip", log=logged.append)
    assert rows(ex) == [("pos", "Hello, world", None), ("neg", "line one\nline two", None), ("pos", 'say "hi"', None)]
    assert [e.where for e in ex] == [f"{p}:2", f"{p}:3", f"{p}:6"]
    assert len(logged) == 1 and "skipped 1 bad rows" in logged[0]


def test_csv_pair_columns_any_order(tmp_path):
    p = write(tmp_path, "pairs.csv", "sentence2,Label,sentence1\nhyp,1,prem\n")
    assert rows(read_classification(p)) == [("1", "prem", "hyp")]
    # pandas' to_csv writes its index as an unnamed first column: ignored, and said so.
    logged: list[str] = []
    p = write(tmp_path, "pandas.csv", ",text,label\n0,hi,1\n")
    assert rows(read_classification(p, log=logged.append)) == [("1", "hi", None)]
    assert logged == [f"{p}:1: ignoring column(s) (unnamed column 1) (bigtrain reads text, text_a, sentence, "
                      "sentence1, text_b, sentence2, label)"]


def test_csv_header_problems(tmp_path):
    p = write(tmp_path, "nolabel.csv", "text,category\nhi,a\n")
    assert error_of(read_classification, p) == f"{p}:1: the header names no 'label' column; found: text, category"
    p = write(tmp_path, "notext.csv", "\nlabel,body\n1,hi\n")
    assert error_of(read_classification, p).startswith(f"{p}:2: the header names no text column")
    p = write(tmp_path, "noheader.csv", "0,some text\n")
    assert error_of(read_classification, p).startswith(f"{p}:1: the header names no text column")
    p = write(tmp_path, "quote.csv", 'text,label\n"Great" movie,1\nfine,0\n')
    assert error_of(read_classification, p).startswith(f"{p}:2: bad CSV quoting")


# --------------------------------------------------------------------------- JSONL


def test_jsonl(tmp_path):
    p = write(tmp_path, "train.jsonl",
              '{"text": "good", "label": 1}\n\n{"text": "a", "text_b": "b", "label": "entail", "id": 7}\n'
              '{"sentence": "s", "label": 0}\n')
    ex = read_classification(p)
    assert rows(ex) == [("1", "good", None), ("entail", "a", "b"), ("0", "s", None)]
    assert ex[2].where == f"{p}:4"


def test_jsonl_bad_rows(tmp_path):
    p = write(tmp_path, "bad.jsonl", '{"text": "ok", "label": 1}\n{"text": "oops", "label": 1\n')
    assert error_of(read_classification, p).startswith(f"{p}:2: invalid JSON: ")
    p = write(tmp_path, "nolabel.jsonl", '{"text": "ok", "label": 1}\n{"text": "no label"}\n')
    assert error_of(read_classification, p) == f"{p}:2: empty label"
    p = write(tmp_path, "notext.jsonl", '{"body": "ok", "label": 1}\n')
    assert error_of(read_classification, p).startswith(f"{p}:1: no text field")
    p = write(tmp_path, "float.jsonl", '{"text": "ok", "label": 1.5}\n')
    assert error_of(read_classification, p).startswith(f"{p}:1: label must be a string or an integer")
    p = write(tmp_path, "array.json", '[\n{"text": "ok", "label": 1}\n]\n')
    assert "JSON array" in error_of(read_classification, p)


# --------------------------------------------------------------------------- labels


def test_label_list():
    assert label_list(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_list(["neg", "pos", "neutral", "pos"]) == ["neg", "neutral", "pos"]
    assert label_list(["10", "2", "x"]) == ["10", "2", "x"]  # not all integers: text order
    assert label_list(["B-PER", "O", None, "I-PER"]) == ["B-PER", "I-PER", "O"]


def test_unknown_label_in_eval_file(tmp_path):
    train = read_classification(write(tmp_path, "train.tsv", "a\tx\nb\ty\nc\tz\n"))
    known = label_list(e.label for e in train)
    p = write(tmp_path, "dev.tsv", "a\tx\n\nd\ty\n")
    assert error_of(check_known_labels, read_classification(p), known, p) == (
        f"{p}:3: label 'd' is not in the training labels (a, b, c)")
    check_known_labels(read_classification(write(tmp_path, "ok.tsv", "b\tx\n")), known, p)  # no error

    toks = read_token_classification(write(tmp_path, "train.conll", "EU B-ORG\nrejects O\n"))
    known = label_list(label for s in toks for label in s.labels)
    p = write(tmp_path, "dev.conll", "x O\n\nPeter B-PER\nBlack I-PER\n")
    assert error_of(check_known_labels, read_token_classification(p), known, p) == (
        f"{p}:3: label 'B-PER' is not in the training labels (B-ORG, O)")
    p = write(tmp_path, "dev2.conll", "Peter B-ORG\nBlack I-PER\n")
    assert error_of(check_known_labels, read_token_classification(p), known, p).startswith(f"{p}:2: label 'I-PER'")


# --------------------------------------------------------------------------- CoNLL


def test_conll_two_columns(tmp_path):
    p = write(tmp_path, "train.conll", "EU B-ORG\nrejects O\n\n\nPeter B-PER\nBlack I-PER\n")
    ex = read_token_classification(p)
    assert ex == [TokenExample(["EU", "rejects"], ["B-ORG", "O"], f"{p}:1"),
                  TokenExample(["Peter", "Black"], ["B-PER", "I-PER"], f"{p}:5")]


def test_conll2003_four_columns_docstart_crlf(tmp_path):
    text = ("-DOCSTART- -X- -X- O\r\n\r\nEU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\r\n\r\n"
            "-DOCSTART- -X- -X- O\r\n\r\nPeter NNP B-NP B-PER\r\nBlack NNP I-NP I-PER\r\n")
    p = write(tmp_path, "train.bio", b"\xef\xbb\xbf" + text.encode())
    ex = read_token_classification(p)
    assert [(e.tokens, e.labels, e.where) for e in ex] == [
        (["EU", "rejects"], ["B-ORG", "O"], f"{p}:3"),
        (["Peter", "Black"], ["B-PER", "I-PER"], f"{p}:8"),
    ]


def test_conll_bad_lines(tmp_path):
    p = write(tmp_path, "bad.conll", "EU NNP B-NP B-ORG\nrejects B-VP O\n")
    assert error_of(read_token_classification, p) == (
        f"{p}:2: expected 4 whitespace-separated columns as on line 1, found 3")
    p = write(tmp_path, "nolabel.conll", "EU B-ORG\n\nrejects\n")
    assert error_of(read_token_classification, p).startswith(f"{p}:3: expected a token and a label")
    # Skipping drops the whole sentence (dropping one token would misalign the others).
    p = write(tmp_path, "skip.conll", "EU B-ORG\n\nbad\nsentence O\n\nPeter B-PER\n")
    logged: list[str] = []
    ex = read_token_classification(p, on_bad_rows="skip", log=logged.append)
    assert [e.tokens for e in ex] == [["EU"], ["Peter"]]
    assert len(logged) == 1 and logged[0].startswith(f"{p}: skipped 1 bad sentences (first: {p}:3: ")
    assert error_of(read_token_classification, write(tmp_path, "e.conll", "-DOCSTART- O\n\n")).endswith(": no examples")


def test_conll_without_labels(tmp_path):
    p = write(tmp_path, "predict.conll", "EU\nrejects\n\nPeter\n")
    ex = read_token_classification(p, require_label=False)
    assert [(e.tokens, e.labels) for e in ex] == [(["EU", "rejects"], None), (["Peter"], None)]


# --------------------------------------------------------------------------- scores


def test_accuracy_per_class_macro():
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a"]
    # Hits at positions 0, 2, 3: accuracy 3/5.
    assert accuracy(y_true, y_pred) == pytest.approx(0.6)
    s = per_class(y_true, y_pred, ["a", "b", "c"])
    # a: 1 hit, predicted twice (0, 4), true twice -> P 1/2, R 1/2, F1 1/2.
    assert s["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # b: 2 hits, predicted 3 times, true twice -> P 2/3, R 1, F1 = 2*(2/3)/(5/3) = 4/5.
    assert s["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    # c: never predicted -> P undefined -> 0; R 0/1 = 0; F1 0.
    assert s["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # Macro: (1/2 + 4/5 + 0) / 3 = 1.3 / 3; only a and b: (0.5 + 0.8) / 2 = 0.65.
    assert macro_f1(y_true, y_pred) == pytest.approx(1.3 / 3)
    assert macro_f1(y_true, y_pred, ["a", "b"]) == pytest.approx(0.65)
    # A label only predicted counts by default: x F1 = 2*1*(1/2)/(3/2) = 2/3, z F1 0 -> macro 1/3.
    assert macro_f1(["x", "x"], ["x", "z"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        accuracy([1, 2], [1])


def test_classification_report_lists_everything():
    report = classification_report(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"], ["a", "b", "c"])
    lines = report.splitlines()
    b_line = next(line for line in lines if line.startswith("b "))
    assert b_line.split() == ["b", "0.6667", "1.0000", "0.8000", "2"]
    assert next(line for line in lines if line.startswith("accuracy")).split() == ["accuracy", "0.6000", "5"]
    # macro: P (1/2 + 2/3 + 0)/3 = 7/18 = 0.3889, R (1/2 + 1 + 0)/3 = 0.5, F1 1.3/3 = 0.4333
    assert next(line for line in lines if line.startswith("macro avg")).split() == [
        "macro", "avg", "0.3889", "0.5000", "0.4333", "5"]


def test_bio_entities_edge_cases():
    assert bio_entities([]) == set()
    assert bio_entities(["O", "O"]) == set()
    assert bio_entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}  # LOC at the end
    assert bio_entities(["O", "I-PER", "I-PER"]) == {("PER", 1, 3)}       # I- after O starts one
    assert bio_entities(["I-PER"]) == {("PER", 0, 1)}                      # I- at the start too
    assert bio_entities(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3)}  # type change
    assert bio_entities(["B-PER", "B-PER", "I-PER"]) == {("PER", 0, 1), ("PER", 1, 3)}
    assert bio_entities(["B-ORG", "I-ORG", "O", "I-ORG"]) == {("ORG", 0, 2), ("ORG", 3, 4)}
    assert bio_entities(["S-X", "B-Y", "E-Y", "I-Y"]) == {("X", 0, 1), ("Y", 1, 3), ("Y", 3, 4)}


def test_entity_prf():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "I-ORG", "I-ORG"]]
    # True: PER(0,2) LOC(3,4) | ORG(1,3). Pred: PER(0,1) LOC(3,4) | ORG(1,3) (I- after O starts).
    # Hits LOC and ORG: P = 2/3, R = 2/3, F1 = 2/3. PER: predicted span wrong -> 0/1, 0/1.
    r = entity_prf(true, pred)
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert r["per_type"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["per_type"]["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    # One of two true entities found, nothing wrong predicted: P 1, R 1/2, F1 = 2*(1/2)/(3/2) = 2/3.
    r = entity_prf([["B-A", "O", "B-B"]], [["B-A", "O", "O"]])
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert r["per_type"]["B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # Nothing predicted and nothing true: all 0, no division error.
    assert entity_prf([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError):
        entity_prf([["O", "O"]], [["O"]])
