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
