"""User code named in a config: `module.path:Name` or `path/to/file.py:Name`.

A task (`task: my_package.tasks:ReverseTask`) or a callback (`train.callbacks`) is found the way
Python finds anything: a dotted module on sys.path (an installed package, or the working
directory), or a file, loaded as a module of its own. What goes wrong (no such module, file or
name, an error while importing it) is one `error:` line naming the config key and where it was set.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from bigtrain.errors import UserError


def is_reference(text: Any) -> bool:
    """Whether a config value names user code (`something:Name`) rather than a built-in."""
    return isinstance(text, str) and ":" in text and not text.startswith(":")


def load_object(reference: str, where: str) -> Any:
    """The object `reference` names; `where` is the config key and its file:line, for errors."""
    if not is_reference(reference):
        raise UserError(f"{where}: {reference!r} is not 'module:Name' or 'path/to/file.py:Name'")
    source, _, name = reference.rpartition(":")
    module = _load_file(source, where) if source.endswith(".py") else _import(source, where)
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{where}: {source} has no {name!r}")
        obj = getattr(obj, part)
    return obj


def _import(dotted: str, where: str):
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        if e.name and dotted.startswith(e.name):
            raise UserError(f"{where}: no module named {dotted!r} (is its package installed, or the directory on PYTHONPATH?)") from None
        raise UserError(f"{where}: importing {dotted} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - any error inside the user's module is reported as one line
        raise UserError(f"{where}: importing {dotted} failed: {type(e).__name__}: {e}") from None


def _load_file(path: str, where: str):
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise UserError(f"{where}: {path} does not exist")
    # One module per file, loaded once per process, under a name that is the same in every process.
    name = "bigtrain_user_" + hashlib.sha256(str(p).encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise UserError(f"{where}: loading {path} failed: {type(e).__name__}: {e}") from None
    return module
