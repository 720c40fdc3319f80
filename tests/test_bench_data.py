"""`bigtrain bench data`: `bigtrain data prepare` vs the run_clm recipe, and the scale mode (--scale)."""

from __future__ import annotations

import json

import pytest
from common import run_cli

from bigtrain.cli import main


def test_bench_data_writes_json_and_both_sides_yield_the_same_tokens(tmp_path, cache_dir):
    out = tmp_path / "bench_data.json"
    r = run_cli(["bench", "data", "--mb", "0.5", "--rounds", "1", "--json", str(out)], cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical blocks" in r.stdout
    assert "child process" in r.stdout and "start-up included" in r.stdout  # the method is stated
    res = json.loads(out.read_text())
    for key in ("tokens_per_s", "classic_tokens_per_s", "ratio", "tokens", "classic_tokens", "mb", "num_proc",
                "rounds", "per_round", "ratio_target"):
        assert key in res, key
    # No speed assertion: this machine is shared and noisy; the target is for the printed ratio.
    assert res["mode"] == "compare"
    assert res["tokens"] == res["classic_tokens"] > 0
    assert res["tokens_per_s"] > 0 and res["classic_tokens_per_s"] > 0
    assert res["mb"] == 0.5 and res["rounds"] == 1 and len(res["per_round"]) == 1
    assert res["per_round"][0]["bigtrain_peak_rss_wait4_bytes"] > 0


def test_bench_data_scale_measures_rss_bytes_per_token_speed_and_random_batches(tmp_path, cache_dir):
    out, png, work = tmp_path / "scale.json", tmp_path / "scale.png", tmp_path / "work"
    r = run_cli(["bench", "data", "--scale", "--sizes", "1MB,2MB", "--mb", "0.5", "--batches", "20",
                 "--work-dir", str(work), "--json", str(out), "--plot", str(png)], cache_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "os.wait4" in r.stdout and "psutil" in r.stdout  # the RSS method is stated
    assert "# targets:" in r.stdout and "1.5 GB" in r.stdout and "2.1 bytes/token" in r.stdout
    res = json.loads(out.read_text())
    for key in ("sizes", "random_batch", "targets", "peak_rss_bytes", "peak_rss_psutil_bytes", "rss_spread",
                "bytes_per_token", "speedup", "worker_counts", "files_per_corpus", "method"):
        assert key in res, key
    assert res["mode"] == "scale" and res["worker_counts"] == [1, 2] and res["method"]["subreaper"]
    assert set(res["targets"]) == {"peak_rss", "rss_spread", "bytes_per_token", "speedup", "random_batch"}
    assert [s["size"] for s in res["sizes"]] == ["1MB", "2MB"]
    for s in res["sizes"]:
        for key in ("input_bytes", "tokens", "documents", "disk_bytes", "tokens_per_s_1", "tokens_per_s_2",
                    "speedup", "peak_rss_wait4_bytes", "peak_rss_psutil_bytes"):
            assert key in s, key
        assert s["input_files"] == 16 and s["tokens"] > 0
        assert 2.0 < s["bytes_per_token"] < 2.5  # uint16 tokens + 8 bytes per document
        # No speed assertion (a noisy machine): the ratio is reported.
        assert s["speedup"] == pytest.approx(s["tokens_per_s_2"] / s["tokens_per_s_1"])
        assert [run["workers"] for run in s["runs"]] == [1, 2]
        for run in s["runs"]:
            assert run["seconds"] > 0 and run["tokens_per_s"] > 0
            assert run["peak_rss_wait4_bytes"] > 0 and run["peak_rss_psutil_bytes"] > 0
            assert run["peak_rss_tree_bytes"] >= run["peak_rss_psutil_bytes"]
    assert res["sizes"][0]["tokens"] < res["sizes"][1]["tokens"]
    batch = res["random_batch"]
    assert batch["rows"] == 64 and batch["seq_len"] == 2048 and batch["batches"] == 20 and batch["blocks"] > 0
    assert 0 < batch["median_ms"] <= batch["p95_ms"]
    assert png.stat().st_size > 0
    # The corpora are cached in the work directory, 16 JSON-lines files each; the preparations are gone.
    corpora = sorted(p for p in work.glob("corpus-*") if p.is_dir())
    assert len(corpora) == 2 and all(len(list(c.glob("*.jsonl"))) == 16 for c in corpora)
    assert not (work / "prepared").exists()


def test_bench_data_rejects_bad_arguments(cache_dir):
    r = run_cli(["bench", "data", "--mb", "0"], cache_dir)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --mb must be > 0")
    r = run_cli(["bench", "data", "--scale", "--sizes", "0MB"], cache_dir)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --sizes '0MB'"), r.stderr


@pytest.mark.parametrize("args, message", [
    (["--scale", "--sizes", "1MB,lots"], "error: --sizes 'lots'"),
    (["--scale", "--sizes", ""], "error: --sizes ''"),
    (["--scale", "--workers", "0,2"], "error: --workers must be >= 1"),
    (["--scale", "--workers", "one"], "error: --workers 'one'"),
    (["--scale", "--files", "0"], "error: --files must be >= 1"),
    (["--scale", "--batches", "0"], "error: --batches must be >= 1"),
    (["--sizes", "1MB"], "error: --sizes: only with --scale"),
])
def test_bench_data_scale_rejects_bad_arguments(capsys, monkeypatch, args, message):
    import bigtrain.bench.data as bench

    for name in ("_run_scale", "_run_compare"):  # in this process: never start a benchmark
        monkeypatch.setattr(bench, name, lambda *a: pytest.fail("the arguments were accepted"))
    assert main(["bench", "data", *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err


def test_bench_data_help_documents_the_scale_mode(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "data", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("--scale", "--sizes", "--workers", "--work-dir", "--batches"):
        assert needle in out, needle
