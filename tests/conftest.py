"""Shared fixtures: a small real-text corpus, a per-session data cache, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_path("stdlib"))

# A small model and corpus so multi-rank DeepSpeed runs take seconds on 2 CPU cores.
SMALL = [
    "data.vocab_size=512", "data.seq_len=64",
    "model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2",
    "train.micro_batch_size=4", "train.progress=false", "train.sample_tokens=0",
    "train.warmup_steps=2", "train.lr=1e-2",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bigtrain-cache")
    os.environ["BIGTRAIN_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~400 KB of real Python source: a few standard-library packages."""
    d = tmp_path_factory.mktemp("corpus")
    for pkg in ("json", "email", "http", "logging"):
        for f in sorted((STDLIB / pkg).glob("*.py")):
            shutil.copy(f, d / f"{pkg}_{f.name}")
    return d


def run_cli(args: list[str], cache: Path, timeout: int = 600, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))


@pytest.fixture(scope="session")
def cli(cache_dir):
    return lambda args, **kw: run_cli(args, cache_dir, **kw)
