"""A local model directory, checked before anything loads it: bigtrain never downloads from a hub
and never runs code shipped in a model directory (`auto_map`, trust_remote_code). Used when the
config is loaded (config.py) and when a model or tokenizer is loaded (models.py, tokenizer.py)."""

from __future__ import annotations

from pathlib import Path

from bigtrain.errors import UserError


def remote_code_files(path: str | Path) -> list[str]:
    """The files of a model directory that map classes to custom Python code (`auto_map`)."""
    import json

    found = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            found.append(name)
    return found


def refuse_remote_code(path: str | Path, where: str, error: BaseException) -> None:
    """Raise the UserError for `error` (from loading `path` with trust_remote_code=False)."""
    text = str(error)
    first = text.splitlines()[0] if text else type(error).__name__
    custom = remote_code_files(path)
    if custom or "trust_remote_code" in text or "custom code" in text:
        raise UserError(
            f"{where}: {path} needs trust_remote_code: its {' and '.join(custom) or 'config'} maps classes to custom Python "
            "code in the directory (auto_map), and bigtrain never runs code from a model directory; use a model and "
            "tokenizer of classes that transformers ships"
        ) from None
    raise UserError(f"{where}: cannot load {path}: {first}") from None


def check_pretrained_dir(path: str, where: str) -> None:
    """Early check of model.from_pretrained when the config is loaded, before anything runs: a
    local directory whose config.json is a JSON object, of an architecture transformers ships
    (an `auto_map` to the directory's own code is refused: bigtrain never sets trust_remote_code)."""
    import json

    config = Path(path) / "config.json"
    try:
        text = config.read_text(encoding="utf-8") if config.is_file() else None
    except OSError:
        text = None
    except UnicodeDecodeError as e:
        raise UserError(f"{config}: not valid UTF-8 at byte {e.start}") from None
    if text is None:
        raise UserError(f"{where}: {path} is not a local model directory with a config.json (bigtrain never downloads from a hub)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{config}:{e.lineno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise UserError(f"{config}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"{config}:1: must hold a JSON object")
    if data.get("auto_map"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if data.get("model_type") not in CONFIG_MAPPING_NAMES:
            refuse_remote_code(path, where, ValueError("custom code"))
