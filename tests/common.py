"""Constants and helpers shared by the tests (imported as `common`: tests/ is on sys.path).

tests/ has no __init__.py on purpose: as a package it would put the repository root on sys.path,
where kernels/ would shadow the `kernels` package that transformers probes for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import forkserver

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_path("stdlib"))

# A small model and corpus so multi-rank DeepSpeed runs take seconds on 2 CPU cores. Two defaults
# are off here, and only here: the progress bar (captured output is read by the tests; a bar of
# carriage returns in it helps no one) and the end-of-run sample (loading the export again on rank
# 0 costs seconds per run and asserts nothing the tests using SMALL look at). tests/test_readme.py
# runs the README's commands, multi-rank ones included, with every default on.
SMALL = [
    "data.vocab_size=512", "data.seq_len=64",
    "model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2",
    "train.micro_batch_size=4", "train.progress=false", "train.sample_tokens=0",
    "train.warmup_steps=2", "train.lr=1e-2",
]


def run_cli(args: list[str], cache: Path, timeout: int = 600, env_extra: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """`python -m bigtrain *args`, with one intra-op thread per process unless env_extra says otherwise.

    The suite runs two pytest-xdist workers on 2 cores, so a single-process run shares the cores
    with the other worker. With torch's default of one OpenMP thread per core, each small matmul's
    parallel region then waits at its barrier for a descheduled thread: two of test_chat's SFT runs
    side by side took 116 s each (0.3-0.6 s a step), 27 s each with one thread (0.09 s a step).
    Multi-rank runs get cores // ranks threads per rank from the launcher, 1 here, as before."""
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(env_extra or {})
    if forkserver.available():  # the same process, without paying for its imports again
        return forkserver.run(["-m", "bigtrain", *args], env, tempfile.gettempdir(), input, timeout)
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir(),
                          input=input if input is not None else "")




def spawn(args: list[str], env: dict, log: Path):
    """`python -m bigtrain *args` started and not waited for, its stdout and stderr into `log`: a
    process with poll/wait/send_signal/kill/pid. Through the fork server when there is one (a
    launcher forked there forks its ranks there too), else a new interpreter."""
    with open(log, "w") as out, open(os.devnull) as devnull:
        if forkserver.available():
            return forkserver.start(["-m", "bigtrain", *args], env, tempfile.gettempdir(), devnull.fileno(), out.fileno(), out.fileno())
        return subprocess.Popen([sys.executable, "-m", "bigtrain", *args], env=env, cwd=tempfile.gettempdir(), stdin=devnull, stdout=out, stderr=out)


def mixture(corpus: Path, weights: tuple = (0.5, 0.3, 0.2)) -> str:
    """A data.sources override: three sources cut from the test corpus (json, email, http+logging)."""
    globs = ([f"{corpus}/json_*"], [f"{corpus}/email_*"], [f"{corpus}/http_*", f"{corpus}/logging_*"])
    entries = [f"{{name: {n}, files: [{', '.join(g)}], weight: {w}}}" for n, g, w in zip(("json", "email", "weblog"), globs, weights)]
    return "data.sources=[" + ", ".join(entries) + "]"
