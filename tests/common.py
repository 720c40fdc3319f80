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

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_path("stdlib"))

# A small model and corpus so multi-rank DeepSpeed runs take seconds on 2 CPU cores.
SMALL = [
    "data.vocab_size=512", "data.seq_len=64",
    "model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2",
    "train.micro_batch_size=4", "train.progress=false", "train.sample_tokens=0",
    "train.warmup_steps=2", "train.lr=1e-2",
]


def run_cli(args: list[str], cache: Path, timeout: int = 600, env_extra: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache), PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir(),
                          input=input if input is not None else "")




def mixture(corpus: Path, weights: tuple = (0.5, 0.3, 0.2)) -> str:
    """A data.sources override: three sources cut from the test corpus (json, email, http+logging)."""
    globs = ([f"{corpus}/json_*"], [f"{corpus}/email_*"], [f"{corpus}/http_*", f"{corpus}/logging_*"])
    entries = [f"{{name: {n}, files: [{', '.join(g)}], weight: {w}}}" for n, g, w in zip(("json", "email", "weblog"), globs, weights)]
    return "data.sources=[" + ", ".join(entries) + "]"
