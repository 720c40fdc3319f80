"""Smoke test of `bigtrain bench attention` (tiny configuration; interpreter on CPU)."""

import argparse
import json

from bigtrain.bench import attention as bench


def test_bench_attention_smoke(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out_json, out_png = tmp_path / "attn.json", tmp_path / "attn.png"
    args = parser.parse_args(["--smoke", "--docs", "1", "4", "--json", str(out_json), "--plot", str(out_png)])
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    assert "4*batch*heads*seq_q*seq_k*head_dim" in printed and "2.5 x fwd" in printed
    data = json.loads(out_json.read_text())
    for backend in ("bigtrain_triton", "bigtrain_triton_det"):  # both backward variants, 1 and 4 documents
        rows = [r for r in data["results"] if r["backend"] == backend]
        assert {r["docs"] for r in rows} == {1, 4}
        assert all(r[m] is not None and r[m] > 0 for r in rows for m in bench.MODES)
    # packed rows only for the kernels with a document mask
    assert {r["backend"] for r in data["results"] if r["docs"] == 4} == {"bigtrain_triton", "bigtrain_triton_det"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_attention_check_prints_every_case_and_exits_by_the_verdict(cli):
    grid = ["bench", "attention", "--check", "--dtypes", "fp32", "--head-dims", "16", "--gqa", "2"]
    r = cli(grid, env_extra={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if "head_dim" in line and not line.startswith("#")]
    assert [line.split()[5] for line in lines] == ["causal", "packed", "bidirectional"], r.stdout
    assert all(line.endswith("pass") for line in lines) and "every case passed" in r.stdout
    r = cli(grid, env_extra={"TRITON_INTERPRET": "1", "BIGTRAIN_FAULT": "attn_check_fail"})
    assert r.returncode == 1 and "causal" in r.stdout and "FAIL: mismatch forced by BIGTRAIN_FAULT" in r.stdout, r.stdout
    assert "1 case(s) FAILED" in r.stdout
