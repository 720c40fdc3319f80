"""Nothing in the repository root may shadow an installed package.

Users run bigtrain from the repository root, where `python -c`, `python -m`, scripts saved there
and every rank started by `--nproc` have that directory first on sys.path. A top-level folder with
an `__init__.py` (or a top-level .py file) named like a dependency's import name wins over the
installed package: transformers 5.25 imports Hugging Face's `kernels` library from nearly every
model module, and our old `kernels/__init__.py` broke every rank with an ImportError.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common import REPO


def test_no_top_level_folder_or_file_shadows_an_installed_package():
    # Only bigtrain/ and the two template folders that install inside it (ds_configs/ ->
    # bigtrain.ds_configs, slurm/ -> bigtrain.slurm_templates: setuptools' editable finder needs
    # their __init__.py) are regular packages; kernels/, tests/, bench/ ... are at most namespace
    # portions, which any installed package of the same name outranks.
    regular = sorted(p.name.removesuffix(".py") for p in REPO.iterdir()
                     if not p.name.startswith(".") and ((p / "__init__.py").exists() or p.suffix == ".py"))
    assert regular == ["bigtrain", "ds_configs", "slurm"], regular
    assert not (REPO / "kernels" / "__init__.py").exists()
    # ... and none of the three is the import name of anything installed in this environment.
    installed = md.packages_distributions()
    clashes = {name: installed[name] for name in regular if name in installed and installed[name] != ["bigtrain"]}
    assert not clashes, clashes


_PROBE = r"""
import importlib.metadata as md, importlib.util, json, sys
import transformers.models.gpt2.modeling_gpt2, transformers.models.llama.modeling_llama  # import transformers' `kernels` if it uses it
import bigtrain, bigtrain.kernels
try:
    dist = md.distribution("kernels")
except md.PackageNotFoundError:
    dist = None
try:
    import kernels
    where = list(getattr(kernels, "__path__", [])) + [getattr(kernels, "__file__", None) or ""]
except ImportError:
    where = None
from transformers.utils import is_kernels_available
print(json.dumps({"sys_path0": sys.path[0], "installed": str(dist.locate_file("")) if dist else None,
                  "kernels_at": where, "transformers_sees_kernels": is_kernels_available(),
                  "bigtrain_kernels": bigtrain.kernels.__file__}))
"""


def test_import_kernels_from_the_repository_root_never_finds_the_repository():
    # `python -c` puts the current directory first on sys.path: stand where a user stands.
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["sys_path0"] == "", seen  # the repository root (cwd) really was first on sys.path
    assert seen["bigtrain_kernels"].startswith(str(REPO / "bigtrain" / "kernels")), seen
    if seen["installed"] is not None:
        # The installed distribution is what `import kernels` gives, from site-packages.
        assert seen["kernels_at"] and all(p.startswith(seen["installed"]) for p in seen["kernels_at"] if p), seen
        assert not any(p.startswith(str(REPO / "kernels")) for p in seen["kernels_at"]), seen
    else:
        # No distribution: at most the repository's empty namespace portion, which transformers
        # must not take for the library.
        assert seen["transformers_sees_kernels"] is False, seen


def test_a_pinned_environment_has_exactly_the_pinned_versions():
    # make demo / make test install constraints.txt; scripts/setup_env.sh records which set it
    # installed. (make test-latest's environment is meant to differ.)
    mode = Path(sys.prefix, ".bigtrain-deps")
    if not mode.exists() or mode.read_text().strip() != "pinned":
        pytest.skip(reason=f"not an environment installed from constraints.txt ({mode})")
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    assert {"torch", "deepspeed", "transformers", "kernels", "datasets", "datatrove", "peft", "tokenizers", "triton", "pytest"} <= set(pins)
    wrong = {}
    for name, version in pins.items():
        try:
            got = md.version(name)
        except md.PackageNotFoundError:
            got = None
        if name == "torch":  # the torch that was there stays (a GPU user's own build)
            continue
        if got != version:
            wrong[name] = (version, got)
    assert not wrong, f"installed versions differ from constraints.txt (name: (pinned, installed)): {wrong}"
