"""Bad input: one `error:` line on stderr naming the problem and where, exit code 2, nothing touched."""

from __future__ import annotations

import json

import pytest

from bigtrain.cli import main
from bigtrain.config import load_config
from bigtrain.errors import UserError


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_unknown_key_names_it_and_suggests_closest(capsys, tmp_path):
    code, err = run_main(capsys, ["train", "train.lrr=0.1", f"output_dir={tmp_path}/o"])
    assert_one_error(code, err, "train.lrr", "did you mean 'train.lr'")


def test_unknown_key_in_yaml_gives_file_and_line(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("task: clm\ntrain:\n  max_steps: 5\n  warmup_step: 2\n")
    code, err = run_main(capsys, ["train", str(cfg)])
    assert_one_error(code, err, f"{cfg}:4", "train.warmup_step", "train.warmup_steps")


def test_wrong_value_type(capsys):
    code, err = run_main(capsys, ["train", "train.max_steps=lots"])
    assert_one_error(code, err, "train.max_steps", "must be int")
    code, err = run_main(capsys, ["train", "deepspeed.activation_checkpointing=3"])
    assert_one_error(code, err, "deepspeed.activation_checkpointing", "bool")


def test_bad_choice_and_range(capsys):
    code, err = run_main(capsys, ["train", "deepspeed.zero_stage=4"])
    assert_one_error(code, err, "deepspeed.zero_stage")
    code, err = run_main(capsys, ["train", "train.lr=-1"])
    assert_one_error(code, err, "train.lr")
    code, err = run_main(capsys, ["train", "deepspeed.precision=bf61"])
    assert_one_error(code, err, "deepspeed.precision", "bf16")


def test_invalid_yaml_syntax(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr: [1, 2\n  max_steps: 3\n")
    code, err = run_main(capsys, ["train", str(cfg)])
    assert_one_error(code, err, str(cfg), "invalid YAML")


def test_global_batch_that_does_not_divide(capsys, tmp_path):
    code, err = run_main(capsys, ["train", "train.micro_batch_size=4", "train.global_batch_size=10", f"output_dir={tmp_path}/o", "--nproc", "2"])
    assert_one_error(code, err, "train.global_batch_size=10", "world_size=2")
    assert not (tmp_path / "o").exists()


def test_global_batch_hint_suggests_grad_accum():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=32"])
    from bigtrain.config import check_batch

    with pytest.raises(UserError, match="grad_accum=4"):
        check_batch(cfg, 2)
    assert check_batch(load_config(None, ["train.micro_batch_size=4", "train.grad_accum=4", "train.global_batch_size=32"]), 2) == 32


def test_fp16_and_bf16_together(capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    code, err = run_main(capsys, ["train", "deepspeed.precision=fp16", f"deepspeed.config={ds}"])
    assert_one_error(code, err, "fp16", "bf16")
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "fp16": {"enabled": True}}))
    code, err = run_main(capsys, ["train", f"deepspeed.config={ds}"])
    assert_one_error(code, err, "both fp16 and bf16")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 runs on this machine's GPU")
def test_fp16_on_cpu_is_refused_before_running(capsys, tmp_path, corpus):
    code, err = run_main(capsys, ["train", "deepspeed.precision=fp16", f"data.train_files={corpus}", f"output_dir={tmp_path}/o", "--nproc", "1"])
    assert_one_error(code, err, "deepspeed.precision=fp16", "GPU")


def test_missing_and_empty_data(capsys, tmp_path, cache_dir):
    code, err = run_main(capsys, ["train", f"data.train_files={tmp_path}/nope.txt", f"output_dir={tmp_path}/o"])
    assert_one_error(code, err, "data.train_files", "nope.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("\n\n   \n")
    code, err = run_main(capsys, ["data", "prepare", f"data.train_files={empty}"])
    assert_one_error(code, err, "data.train_files", "no text")
    code, err = run_main(capsys, ["data", "prepare", f"data.train_files={tmp_path}/nothing-*.txt"])
    assert_one_error(code, err, "no files match")


def test_non_utf8_names_file_and_offset(capsys, tmp_path, cache_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world\n" * 10 + b"caf\xe9 au lait\n")
    code, err = run_main(capsys, ["data", "prepare", f"data.train_files={bad}"])
    assert_one_error(code, err, str(bad), "byte offset 123", "data.on_decode_error=replace")


def test_non_utf8_replace_counts_bytes(capsys, tmp_path, cache_dir):
    bad = tmp_path / "bad2.txt"
    good = "the quick brown fox jumps over the lazy dog. " * 400
    bad.write_bytes(good.encode() + b"\xff\xfe tail " + good.encode())
    code = main(["data", "prepare", f"data.train_files={bad}", "data.on_decode_error=replace", "data.seq_len=16", "data.vocab_size=300"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "replaced 2 undecodable byte(s)" in out.err


def test_bad_jsonl_names_line(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"txt": "wrong field"}\n')
    code, err = run_main(capsys, ["data", "prepare", f"data.train_files={f}"])
    assert_one_error(code, err, f"{f}:3", "'text'")
    f.write_text('{"text": "ok"}\n{"text": broken\n')
    code, err = run_main(capsys, ["data", "prepare", f"data.train_files={f}"])
    assert_one_error(code, err, f"{f}:2", "invalid JSON")


def test_output_dir_with_another_run_is_refused_and_untouched(capsys, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, err = run_main(capsys, ["train", f"output_dir={out}", "--nproc", "1"])
    assert_one_error(code, err, str(out), "--resume auto", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'


def test_override_syntax_and_cli_usage(capsys):
    code, err = run_main(capsys, ["train", "a.yaml", "notanoverride"])
    assert_one_error(code, err, "notanoverride")
    code, err = run_main(capsys, ["train", "--nproc", "two"])
    assert_one_error(code, err, "--nproc")
    code, err = run_main(capsys, ["train", "--nrpoc", "2"])
    assert_one_error(code, err, "unrecognized arguments: --nrpoc")
    # Overrides after options are still overrides (and still checked).
    code, err = run_main(capsys, ["train", "--nproc", "2", "train.lrr=1"])
    assert_one_error(code, err, "train.lrr")
    code, err = run_main(capsys, ["train", "--overwrite", "--nproc", "two"])
    assert_one_error(code, err, "--nproc")
    code, err = run_main(capsys, ["export"])
    assert_one_error(code, err, "export")
    code, err = run_main(capsys, ["export", "run", "out", "--max-shard-size", "lots"])
    assert_one_error(code, err, "--max-shard-size")
    code, err = run_main(capsys, ["train", "missing.yaml"])
    assert_one_error(code, err, "missing.yaml")


def test_model_config_override_must_exist(capsys, tmp_path):
    from bigtrain.models import preset_config

    with pytest.raises(UserError, match="did you mean 'model.config.n_layer'"):
        preset_config("tiny", {"n_layers": 3}, 512)
    with pytest.raises(UserError, match="unknown model.preset 'gpt2-smal'.*gpt2-small"):
        preset_config("gpt2-smal", {}, 512)
    cfg = preset_config("tiny", {"n_layer": 3}, 512)
    assert cfg.n_layer == 3 and cfg.vocab_size == 512


def test_presets_have_the_advertised_sizes():
    """Parameter counts of the presets, from transformers' own models on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigtrain.models import preset_config

    expected = {"gpt2-small": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.56e9, "llama-1b": 1.24e9}
    for name, n in expected.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(preset_config(name, {}, None))
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - n) / n < 0.03, (name, count)


def test_exponent_without_dot_is_a_float(tmp_path):
    """YAML 1.1 reads 3e-4 as a string; bigtrain takes it as the number users meant."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 3e-4\n")
    assert load_config(str(cfg_file), ["train.min_lr_ratio=1e-1"]).train.lr == 3e-4
    with pytest.raises(UserError, match="train.lr"):
        load_config(None, ["train.lr=nan"])
