"""One rule for numbers: every override or YAML value that Python's float() reads is a number where a
number is expected (bigtrain's float keys, and `model.config.*` keys whose default is a float).

YAML 1.1 (PyYAML) reads `1e20`, `1.0e20` and `1E-3` as strings: its floats need a dot and a signed
exponent. An int key still needs an integer, and a string key keeps the text.
"""

from __future__ import annotations

import pytest

from bigtrain.cli import main
from bigtrain.config import as_number, load_config
from bigtrain.errors import UserError

# Each is a string to PyYAML, a float to float().
FORMS = {"1e20": 1e20, "1.0e20": 1e20, "1E-3": 1e-3}


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def _model_config(raw: dict):
    """The transformers config that the trainer builds from `model.config` (tiny preset)."""
    from bigtrain.models import preset_config

    return preset_config("tiny", raw, 512)


def _assert_one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_pyyaml_reads_these_forms_as_strings():
    """The premise: without the rule these would reach the type checks as str."""
    import yaml

    for text in FORMS:
        assert isinstance(yaml.safe_load(text), str), text


@pytest.mark.parametrize("text", FORMS)
def test_as_number(text):
    assert as_number(text) == FORMS[text] and isinstance(as_number(text), float)
    assert as_number(f" {text} ") == FORMS[text]


def test_as_number_leaves_other_values_alone():
    for value in ("abc", "runs/1e3x", "", "0x10", None, True, 3, [1]):
        assert as_number(value) is value


# ----------------------------------------------------------------- bigtrain's own float keys


@pytest.mark.parametrize("text", FORMS)
def test_float_key_override(text):
    # watchdog_min_seconds accepts [0, 1e7]: 1e-3 loads; 1e20 is read as a number and refused by range.
    key = "train.watchdog_min_seconds"
    if FORMS[text] <= 1e7:
        assert load_config(None, [f"{key}={text}"]).train.watchdog_min_seconds == FORMS[text]
    else:
        with pytest.raises(UserError, match=r"'train.watchdog_min_seconds' must be in \[0.0, 10000000.0\], got 1e\+20"):
            load_config(None, [f"{key}={text}"])


@pytest.mark.parametrize("text", FORMS)
def test_float_key_yaml(tmp_path, text):
    path = _yaml(tmp_path, f"train:\n  watchdog_min_seconds: {text}\n")
    if FORMS[text] <= 1e7:
        assert load_config(path, []).train.watchdog_min_seconds == FORMS[text]
    else:
        with pytest.raises(UserError, match=rf"{path}:2: 'train.watchdog_min_seconds' must be in .*got 1e\+20"):
            load_config(path, [])


def test_float_key_in_range_forms_reach_the_config(tmp_path):
    cfg = load_config(None, ["train.lr=1E-3", "train.watchdog_factor=1.0e5", "deepspeed.timeout_minutes=1e2"])
    assert (cfg.train.lr, cfg.train.watchdog_factor, cfg.deepspeed.timeout_minutes) == (1e-3, 1e5, 100.0)
    assert all(isinstance(v, float) for v in (cfg.train.lr, cfg.train.watchdog_factor, cfg.deepspeed.timeout_minutes))
    path = _yaml(tmp_path, "train:\n  lr: 1E-3\n  watchdog_factor: 1.0e5\ndeepspeed:\n  timeout_minutes: 1e2\n")
    cfg = load_config(path, [])
    assert (cfg.train.lr, cfg.train.watchdog_factor, cfg.deepspeed.timeout_minutes) == (1e-3, 1e5, 100.0)


def test_int_key_given_exponent_is_refused(capsys, tmp_path):
    for text in ("1e3", "1.0e3", "1E3"):
        _assert_one_error(main(["train", f"train.max_steps={text}"]), capsys.readouterr().err,
                          f"train.max_steps={text}", "'train.max_steps' must be int, got str")
        path = _yaml(tmp_path, f"train:\n  max_steps: {text}\n")
        _assert_one_error(main(["train", path]), capsys.readouterr().err, f"{path}:2", "'train.max_steps' must be int, got str")
    # Optional[int] too.
    with pytest.raises(UserError, match="'train.global_batch_size' must be int or null, got str '1e3'"):
        load_config(None, ["train.global_batch_size=1e3"])


def test_really_bad_float_value_keeps_its_error(capsys):
    _assert_one_error(main(["train", "train.lr=abc"]), capsys.readouterr().err, "train.lr=abc", "'train.lr' must be float, got str 'abc'")
    _assert_one_error(main(["train", "train.lr=nan"]), capsys.readouterr().err, "'train.lr' must be a finite number")


def test_string_keys_keep_number_like_text(tmp_path):
    cfg = load_config(None, ["train.sample_prompt=1e20", f"output_dir={tmp_path}/1E-3", "data.train_files=1.0e20", "train.best_metric=eval_loss"])
    assert cfg.train.sample_prompt == "1e20" and cfg.output_dir == f"{tmp_path}/1E-3" and cfg.data.train_files == ["1.0e20"]
    path = _yaml(tmp_path, "train:\n  sample_prompt: 1e20\ndata:\n  tokenizer: 1E-3\n")
    cfg = load_config(path, [])
    assert cfg.train.sample_prompt == "1e20" and cfg.data.tokenizer == "1E-3"


# ----------------------------------------------------------------- model.config.* (transformers config fields)


@pytest.mark.parametrize("text", FORMS)
def test_model_config_float_override_reaches_built_config(text):
    cfg = load_config(None, [f"model.config.initializer_range={text}"])
    hf = _model_config(cfg.model.config)
    assert hf.initializer_range == FORMS[text] and isinstance(hf.initializer_range, float)


@pytest.mark.parametrize("text", FORMS)
def test_model_config_float_yaml_reaches_built_config(tmp_path, text):
    path = _yaml(tmp_path, f"model:\n  config:\n    initializer_range: {text}\n    layer_norm_epsilon: {text}\n")
    hf = _model_config(load_config(path, []).model.config)
    assert hf.initializer_range == FORMS[text] and hf.layer_norm_epsilon == FORMS[text]
    assert isinstance(hf.initializer_range, float) and isinstance(hf.layer_norm_epsilon, float)


def test_model_config_inline_mapping_override():
    cfg = load_config(None, ["model.config={initializer_range: 1e20, resid_pdrop: 1E-3}"])
    hf = _model_config(cfg.model.config)
    assert (hf.initializer_range, hf.resid_pdrop) == (1e20, 1e-3)


def test_model_config_pretrained_path_uses_the_same_rule():
    """apply_overrides is also what a from_pretrained config goes through."""
    from transformers import GPT2Config

    from bigtrain.models import apply_overrides

    hf = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=512)
    apply_overrides(hf, {"initializer_range": "1.0e20"})
    assert hf.initializer_range == 1e20


def test_model_config_int_key_given_exponent_is_refused():
    for text in ("1e3", "1.0e3"):
        raw = load_config(None, [f"model.config.n_layer={text}"]).model.config
        with pytest.raises(UserError, match=rf"model.config.n_layer: must be int like the default 4, got str '{text}'"):
            _model_config(raw)


def test_model_config_bad_float_keeps_its_error():
    with pytest.raises(UserError, match="model.config.initializer_range: must be float like the default 0.02, got str 'abc'"):
        _model_config({"initializer_range": "abc"})
    with pytest.raises(UserError, match="model.config.initializer_range: must be a finite number, got 'inf'"):
        _model_config({"initializer_range": "inf"})


def test_model_config_string_key_keeps_number_like_text():
    hf = _model_config(load_config(None, ["model.config.summary_type=1e20"]).model.config)
    assert hf.summary_type == "1e20"
