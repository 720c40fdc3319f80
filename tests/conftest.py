"""Shared fixtures: a small real-text corpus, a per-session data cache, and a CLI runner."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from common import REPO, STDLIB, run_cli  # noqa: E402,F401 - shared with the test modules


@pytest.fixture(autouse=True)
def _release_deepspeed_shm():
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (RAM) outlive killed ranks: remove them after
    every test (no rank of a finished test is still running), or the suite runs out of memory."""
    yield
    for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        p.unlink(missing_ok=True)


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


@pytest.fixture(scope="session")
def cli(cache_dir):
    return lambda args, **kw: run_cli(args, cache_dir, **kw)
