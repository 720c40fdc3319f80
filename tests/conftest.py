"""Shared fixtures: a small real-text corpus, a per-session data cache, and a CLI runner."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from common import REPO, STDLIB, run_cli  # noqa: E402,F401 - shared with the test modules


# Every process of the suite sees the environment's bin/ first, as after `source .venv/bin/activate`.
# Without it, a test that puts it on PATH (the README test does) and one that does not run
# different `ninja` binaries (pip's 1.13 in .venv, Debian's 1.11): their build logs hash commands
# differently, so each rebuilds DeepSpeed's CPU ops the other built (~45 s per multi-rank run).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# DeepSpeed's CPU ops (cpu_adam, shm) are built once per environment: .venv and .venv-latest hold
# different torch builds, and one shared ~/.cache/torch_extensions made each `make test` after a
# `make test-latest` rebuild them (~60-100 s). Each environment gets its own build directory.
_ENV_ID = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"{Path(sys.prefix).name}-{_ENV_ID}"))


def _job_alive(buffer: Path) -> bool:
    """A DeepSpeed all-reduce buffer is named ..._{MASTER_ADDR}_{MASTER_PORT}_{LOCAL_RANK}; its job
    lives while rank 0's rendezvous store still listens on that port."""
    import socket

    parts = buffer.name.rsplit("_", 3)
    try:
        with socket.create_connection((parts[1], int(parts[2])), timeout=0.2):
            return True
    except (OSError, ValueError, IndexError):
        return False


@pytest.fixture(autouse=True)
def _not_under_a_launcher(monkeypatch):
    """Tests that call bigtrain in this process start as a user's shell would: an earlier
    in-process run may have left RANK/WORLD_SIZE in the worker's environment (bigtrain.engine sets
    them for a one-process run), after which `--nproc` takes the worker for a rank."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _release_deepspeed_shm():
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (RAM) outlive killed ranks: after every test,
    remove those whose job is gone, or the suite runs out of memory. (A job still running, e.g. in
    another pytest-xdist worker, keeps its buffers.)"""
    yield
    for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        if not _job_alive(p):
            p.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _fork_server(tmp_path_factory):
    """One pre-imported fork server per pytest worker for the suite's bigtrain processes
    (tests/forkserver.py). BIGTRAIN_TEST_FORKSERVER=0 starts every process from scratch instead."""
    import forkserver

    if os.environ.get(forkserver.ENV) == "0":
        os.environ.pop(forkserver.ENV)
        yield
        return
    path = str(tmp_path_factory.mktemp("forkserver") / "sock")
    server = forkserver.start_server(path)
    os.environ[forkserver.ENV] = path
    yield
    os.environ.pop(forkserver.ENV, None)
    server.terminate()
    server.wait()


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


# The files that take longest start first, so that no long file is left for the end of the run
# while the other worker idles (pytest-xdist --dist loadfile hands out files in collection order).
LONGEST_FIRST = ["test_readme.py", "test_models.py", "test_slurm.py", "test_moe.py", "test_parallel.py", "test_zero.py", "test_tasks.py", "test_train.py", "test_chat.py",
                 "test_reliability.py"]


def pytest_collection_modifyitems(session, config, items):  # noqa: ARG001
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
