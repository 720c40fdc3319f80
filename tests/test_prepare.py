"""`bigtrain data prepare` (datatrove) and the shard reader: the same blocks as bigtrain's classic
packing, independent of the task count, resumable after a kill, and bad input refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from bigtrain.cli import main
from bigtrain.config import load_config

TOK = ["data.vocab_size=512"]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error: ") for ln in lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def prepare(out: Path, overrides: list[str], tasks: int = 1) -> Path:
    from bigtrain.prepare import prepare_dataset

    cfg = load_config(None, overrides)
    return prepare_dataset(cfg, out, workers=1, tasks=tasks, log=lambda *a: None)


def classic_blocks(tok_dir: Path, files: str, seq_len: int, sample_by: str, tmp: Path):
    """The blocks bigtrain made before datatrove: `datasets` text/JSON loading, `tokenize`, `pack`."""
    from bigtrain.data import resolve_sources
    from bigtrain.tokenizer import load_tokenizer, separator_id
    from reference_packing import classic_documents, classic_tokens, pack

    tok = load_tokenizer(tok_dir)
    docs = classic_documents([s.path for s in resolve_sources([files], "x")], sample_by, "text", tmp / "hf")
    flat, lengths = classic_tokens(docs, tok)
    return pack(flat, lengths, separator_id(tok), seq_len)


def shard_blocks(root: Path, name: str, seq_len: int):
    from bigtrain.shards import ShardBlocks, open_prepared

    blocks = ShardBlocks([open_prepared(root, "test").sources[name]], seq_len)
    got = blocks.take(np.arange(len(blocks)))
    return got["input_ids"], got["segment_ids"]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, corpus) -> Path:
    """The corpus as JSON lines, one record per paragraph, with some empty and blank records."""
    f = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    with f.open("w") as out:
        for p in sorted(corpus.iterdir()):
            for para in p.read_text().split("\n\n"):
                out.write(json.dumps({"text": para, "n": len(para)}) + "\n")
            out.write(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    return f


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus) -> Path:
    return prepare(tmp_path_factory.mktemp("prep") / "p", [f"data.train_files={corpus}", *TOK], tasks=3)


@pytest.mark.parametrize("sample_by", ["document", "line"])
def test_shards_give_the_classic_blocks_and_boundaries(tmp_path, corpus, prepared, sample_by):
    """Same tokens, same EOS placement, same per-document segment ids as the classic packing, for
    two block lengths (one that cuts documents anywhere); 3 tasks or 1 give the same stream."""
    tok = ["data.tokenizer=" + str(prepared / "tokenizer")]
    one = prepared if sample_by == "document" else prepare(tmp_path / "one", [f"data.train_files={corpus}", f"data.sample_by={sample_by}", *tok], tasks=1)
    three = prepared if sample_by == "document" else prepare(tmp_path / "three", [f"data.train_files={corpus}", f"data.sample_by={sample_by}", *tok], tasks=3)
    assert len(json.loads((three / "manifest.json").read_text())["sources"]["train"]["files"]) == 3
    for seq_len in (64, 37):
        ids, segments = classic_blocks(prepared / "tokenizer", str(corpus), seq_len, sample_by, tmp_path)
        for root in (one, three):
            got_ids, got_segments = shard_blocks(root, "train", seq_len)
            assert got_ids.shape == ids.shape and len(ids) > 100
            np.testing.assert_array_equal(got_ids, ids)
            np.testing.assert_array_equal(got_segments, segments)


def test_jsonl_shards_match_and_are_compact(tmp_path, jsonl, prepared):
    out = prepare(tmp_path / "j", [f"data.train_files={jsonl}", "data.tokenizer=" + str(prepared / "tokenizer")], tasks=2)
    ids, segments = classic_blocks(prepared / "tokenizer", str(jsonl), 50, "document", tmp_path)
    got_ids, got_segments = shard_blocks(out, "train", 50)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_segments, segments)
    manifest = json.loads((out / "manifest.json").read_text())
    src = manifest["sources"]["train"]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["eos_id"] == 0
    on_disk = sum((out / f["path"]).stat().st_size + (out / (f["path"] + ".index")).stat().st_size for f in src["files"])
    # 2 bytes a token plus 8 per document: the ~2.1 bytes/token target holds for documents of 80+ tokens.
    assert on_disk == 2 * src["tokens"] + 8 * src["documents"]
    blank = sum(1 for line in jsonl.read_text().splitlines() if not json.loads(line)["text"])
    assert src["documents"] < len(jsonl.read_text().splitlines()) - blank + 1  # empty records are no documents


def test_killed_prepare_reruns_only_the_unfinished_tasks(tmp_path, corpus, prepared, cache_dir):
    """A prepare killed in task 2 of 4 leaves tasks 0-1 complete; the rerun runs only 2-3 and the
    result is byte-identical to an uninterrupted preparation."""
    args = [sys.executable, "-m", "bigtrain", "data", "prepare", f"data.train_files={corpus}", "data.tokenizer=" + str(prepared / "tokenizer"),
            "--tasks", "4", "--workers", "1"]
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache_dir))
    out = tmp_path / "killed"
    # The whole process group goes, as on a lost node (datatrove's manager process would outlive the main one).
    p = subprocess.Popen([*args, "--out", str(out)], env=dict(env, BIGTRAIN_FAULT="kill_in_prepare@2"), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert p.wait(timeout=300) == -9
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    done = out / "logs" / "train" / "train" / "completions"
    assert sorted(p.name for p in done.iterdir()) == ["00000", "00001"] and not (out / "manifest.json").exists()
    summaries = out / "logs" / "train" / "train" / "bigtrain"
    before = {p.name: p.stat().st_mtime_ns for p in summaries.glob("0000[01].json")}
    r = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert {p.name: p.stat().st_mtime_ns for p in summaries.glob("0000[01].json")} == before  # not run again
    assert "task 3/4" in r.stderr and "task 1/4" not in r.stderr
    fresh = tmp_path / "fresh"
    assert subprocess.run([*args, "--out", str(fresh)], env=env, capture_output=True, timeout=300).returncode == 0
    for t in range(4):
        for suffix in (".ds", ".ds.index"):
            name = f"train/train/{t:05d}_unshuffled{suffix}"
            assert (out / name).read_bytes() == (fresh / name).read_bytes(), name


def test_plan_shares_are_exact(capsys, tmp_path, corpus, prepared):
    from common import mixture

    code, out, err = run_main(capsys, ["data", "plan", mixture(corpus), *TOK, "data.seq_len=64", "data.tokenizer=" + str(prepared / "tokenizer"),
                                       "train.micro_batch_size=4", "--steps", "37", "--json"])
    assert code == 0, err
    plan = json.loads(out)["sources"]
    weights = {"json": Fraction(1, 2), "email": Fraction(3, 10), "weblog": Fraction(1, 5)}
    assert set(plan) == set(weights) and sum(p["samples"] for p in plan.values()) == 37 * 4
    for name, w in weights.items():
        assert abs(plan[name]["samples"] - w * 37 * 4) < 1
        assert plan[name]["blocks"] == plan[name]["tokens"] // 64 > 0
        assert abs(plan[name]["share"] - plan[name]["samples"] / (37 * 4)) < 1e-9


def test_training_never_imports_datatrove():
    code = "import sys, bigtrain.trainer, bigtrain.corpus, bigtrain.shards, bigtrain.mixture, bigtrain.tasks; print('datatrove' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


# --------------------------------------------------------------------------- bad input


def test_bad_sources_are_refused(capsys, tmp_path, corpus):
    base = ["data", "plan", *TOK, "--steps", "1"]
    cases = [
        ("[{name: a, files: [X], weight: 0}]", ["data.sources[0].weight", "'a'", "positive"]),
        ("[{name: a, files: [X], weight: -1}]", ["positive"]),
        ("[{name: a, files: [X], weight: .nan}]", ["positive"]),
        ("[{name: a, files: [X], weight: .inf}]", ["positive"]),
        ("[{name: a, files: [X]}, {name: a, files: [X]}]", ["'a'", "more than once"]),
        ("[{name: a, file: [X]}]", ["unknown key 'file'"]),
        ("[{name: 'a/b', files: [X]}]", ["data.sources[0].name"]),
        ("[]", ["data.sources"]),
    ]
    for value, needles in cases:
        code, _, err = run_main(capsys, [*base, "data.sources=" + value.replace("X", str(corpus))])
        assert_one_error(code, err, *needles)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n\n")
    code, _, err = run_main(capsys, [*base, f"data.sources=[{{name: web, files: [{corpus}]}}, {{name: blank, files: [{empty}]}}]"])
    assert_one_error(code, err, "data.sources[1]", "'blank'", "no text")


def test_broken_prepared_dirs_are_refused(capsys, tmp_path, corpus, prepared):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    base = ["data", "plan", *TOK, f"data.prepared={copy}", "--steps", "1"]
    code, _, err = run_main(capsys, [*base, "data.sources=[{name: web, files: [x]}]"])
    assert_one_error(code, err, "'web'", "not in the prepared dataset")
    code, _, err = run_main(capsys, [*base, "data.seq_len=1000000"])
    assert_one_error(code, err, "fewer than one block", "data.seq_len=1000000")
    other = tmp_path / "other-tok"
    from bigtrain.tokenizer import train_bpe

    train_bpe(["some other text to learn from " * 50], 300, other)
    code, _, err = run_main(capsys, [*base, f"data.tokenizer={other}"])
    assert_one_error(code, err, "another tokenizer")
    shard = copy / "train" / "train" / "00001_unshuffled.ds"
    shard.write_bytes(shard.read_bytes()[:-2])
    code, _, err = run_main(capsys, base)
    assert_one_error(code, err, str(shard), "truncated")
    shard.unlink()
    code, _, err = run_main(capsys, base)
    assert_one_error(code, err, str(shard), "missing")
    (copy / "manifest.json").unlink()
    code, _, err = run_main(capsys, base)
    assert_one_error(code, err, str(copy), "rerun the same `bigtrain data prepare`")


def test_unfinished_tasks_are_named(tmp_path, corpus, prepared):
    """datatrove can return with tasks incomplete (its issue #338): the manifest is written only
    when every task left its completion mark and summary."""
    from bigtrain.corpus import source_jobs
    from bigtrain.errors import UserError
    from bigtrain.prepare import collect

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    (copy / "logs" / "train" / "train" / "completions" / "00001").unlink()
    job = source_jobs(load_config(None, [f"data.train_files={corpus}"]))[0]
    with pytest.raises(UserError, match=r"1 of 3 tokenization tasks did not finish \(tasks 1;"):
        collect(copy, job, 3, 2)


def test_out_dir_of_something_else_is_not_touched(capsys, tmp_path, corpus, prepared):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, _, err = run_main(capsys, ["data", "prepare", f"data.train_files={corpus}", *TOK, "--out", str(mine)])
    assert_one_error(code, err, str(mine), "not a bigtrain preparation")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    code, _, err = run_main(capsys, ["data", "prepare", f"data.train_files={corpus}/json_*", "data.tokenizer=" + str(prepared / "tokenizer"),
                                     "--out", str(prepared)])
    assert_one_error(code, err, "holds a preparation of other inputs")


def test_large_corpus_asks_for_bigtrain_data_prepare(capsys, tmp_path, corpus):
    """Over data.auto_prepare_max_bytes, training (here `data plan`, which reads what training
    reads) does not tokenize by itself: it prints the command, which then makes it work."""
    args = [f"data.train_files={corpus}", *TOK, "data.auto_prepare_max_bytes=1000", f"data.cache_dir={tmp_path / 'cache'}"]
    code, _, err = run_main(capsys, ["data", "plan", *args, "--steps", "1"])
    assert_one_error(code, err, "data.auto_prepare_max_bytes=1,000", "bigtrain data prepare " + " ".join(args))
    assert not (tmp_path / "cache" / "prepared").exists()
    code, out, err = run_main(capsys, ["data", "prepare", *args])
    assert code == 0, err
    code, out, err = run_main(capsys, ["data", "plan", *args, "--steps", "1", "--json"])
    assert code == 0, err
    assert json.loads(out)["sources"]["train"]["samples"] == 16
