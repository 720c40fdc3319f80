"""End-to-end training on CPU with the real DeepSpeed engine: ranks are real processes on gloo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import torch

from common import REPO, SMALL, mixture, spawn

pytestmark = pytest.mark.slow


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


@pytest.fixture(scope="module")
def zero2_run(cli, corpus, tmp_path_factory):
    """One 2-rank ZeRO-2 run of 30 steps with a checkpoint at step 15, on a 3-source mixture."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    args = ["train", mixture(corpus), *SMALL, "deepspeed.zero_stage=2", "train.max_steps=30",
            "train.log_every=1", "train.eval_every=15", "train.save_every=15", "train.keep_last=3", f"output_dir={out}"]
    r = cli([*args, "--nproc", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, args, r


def test_two_rank_zero2_loss_falls(zero2_run):
    out, _, r = zero2_run
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.6, (first, last)  # from ln(512) = 6.24 nats: a clear fall in 30 steps
    evals = [r_["eval_loss"] for r_ in metrics(out) if "eval_loss" in r_]
    assert len(evals) == 2 and evals[1] < evals[0]
    state = json.loads((out / "checkpoints" / "step_00000030" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 2 and state["samples_seen"] == 30 * 8
    # ZeRO-2 shards the optimizer state: one partition file per rank.
    assert len(list((out / "checkpoints" / "step_00000030").glob("*optim_states.pt"))) == 2
    assert "perplexity" in r.stderr
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "model" / "model.safetensors").is_file()
    # Linear warmup to train.lr, then cosine decay towards lr x min_lr_ratio.
    lrs = [r_["lr"] for r_ in metrics(out) if "lr" in r_]
    peak = max(lrs)
    assert abs(peak - 1e-2) < 1e-4 and lrs.index(peak) <= 3 and lrs[0] < 0.5 * peak
    after = lrs[lrs.index(peak):]
    assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] < 0.2 * peak
    assert after[-1] >= 0.1 * peak - 1e-9
    resolved = json.loads((out / "ds_config.json").read_text())
    assert resolved["zero_optimization"]["stage"] == 2 and resolved["train_batch_size"] == 8


def test_mixture_gives_each_source_its_share(zero2_run):
    """Every training record carries the cumulative samples per source: after every step each
    source is within one sample of its weight's share (weights 0.5/0.3/0.2, 8 samples a step)."""
    from fractions import Fraction

    out, _, r = zero2_run
    weights = {"json": Fraction(1, 2), "email": Fraction(3, 10), "weblog": Fraction(1, 5)}
    records = [r_ for r_ in metrics(out) if "loss" in r_]
    assert len(records) == 30
    for rec in records:
        counts = rec["source_samples"]
        assert set(counts) == set(weights) and sum(counts.values()) == rec["step"] * 8
        for name, w in weights.items():
            assert abs(counts[name] - w * rec["step"] * 8) < 1, (rec["step"], counts)
    assert "json" in r.stderr and "x0.5" in r.stderr  # the start line lists the sources and weights


def test_resume_auto_gives_identical_losses(zero2_run, cli, tmp_path):
    """A run that died after its step-15 checkpoint, resumed with --resume auto, repeats the same losses."""
    out, args, _ = zero2_run
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_00000030")
    shutil.rmtree(crashed / "model")
    (crashed / "checkpoints" / "latest").write_text("step_00000015")
    # What the dead attempt logged past its checkpoint (steps 16-22, values no real run gives).
    kept = [r_ for r_ in metrics(out) if r_["step"] <= 15]
    dead = [{"step": s, "loss": 1000.0 + s, "lr": 0.0} for s in range(16, 23)]
    (crashed / "metrics.jsonl").write_text("".join(json.dumps(r_) + "\n" for r_ in kept + dead))
    args = [a if not a.startswith("output_dir=") else f"output_dir={crashed}" for a in args]
    r = cli([*args, "--nproc", "2", "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    # Every step has exactly one loss record: the dead attempt's were dropped, not kept beside the new ones.
    steps = [r_["step"] for r_ in metrics(crashed) if "loss" in r_]
    assert steps == list(range(1, 31)), steps
    straight, resumed = train_losses(out), train_losses(crashed)
    for step in range(16, 31):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


def test_resume_from_path_under_the_deepspeed_launcher(zero2_run, cache_dir, tmp_path):
    """`deepspeed --num_gpus 2 --module bigtrain train ...` (it appends --local_rank=N) into a new output_dir."""
    out, args, _ = zero2_run
    args = [a if not a.startswith("output_dir=") else f"output_dir={tmp_path / 'b'}" for a in args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(BIGTRAIN_CACHE=str(cache_dir), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    from bigtrain.process import free_port

    r = subprocess.run([str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "bigtrain", *args, "train.max_steps=20",
                        "--resume", str(out / "checkpoints" / "step_00000015")], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=600)
    # The LR schedule depends on max_steps, so a different max_steps is a different run: only check it ran.
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(train_losses(tmp_path / "b")) == [16, 17, 18, 19, 20]


def test_export_round_trip_matches_engine_logits(cli, corpus, tmp_path):
    out = tmp_path / "run"
    overrides = [f"data.train_files={corpus}", *SMALL, "deepspeed.zero_stage=2", "train.max_steps=4", "train.save_every=2", "train.keep_last=1"]
    r = cli(["train", *overrides, f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_00000004"]  # keep_last=1
    # The engine's logits, with the checkpoint loaded by DeepSpeed.
    probe = tmp_path / "probe.pt"
    p = subprocess.run([sys.executable, str(REPO / "tests/helpers/engine_logits.py"), str(out / "checkpoints" / "step_00000004"), str(probe),
                        *overrides, f"output_dir={tmp_path / 'probe_run'}"], capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert p.returncode == 0, p.stderr[-3000:]
    exported = tmp_path / "hf"
    r = cli(["export", str(out), str(exported)])
    assert r.returncode == 0, r.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    tok = AutoTokenizer.from_pretrained(str(exported))
    assert tok.eos_token == "<|endoftext|>" and len(tok) <= model.config.vocab_size
    ref = torch.load(probe)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
    # The model the run exported itself is the same weights.
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Exporting again into a non-empty directory is refused.
    r = cli(["export", str(out), str(exported)])
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "--overwrite" in r.stderr
    # generate uses it.
    r = cli(["generate", str(exported), "--prompt", "import os", "--max-new-tokens", "8", "--temperature", "0"])
    assert r.returncode == 0, r.stderr[-2000:]
    # New text after the prompt (after 4 steps it may well be whitespace: tokens all the same).
    assert r.stdout.startswith("import os") and len(r.stdout.rstrip("\n")) > len("import os")


# The default job (`bigtrain train`, no arguments) is tests/test_readme.py's first command.


def preempt(zero2_run, cache_dir, tmp_path, sig, extra: tuple = (), fault: str = "", ready=lambda run: len(train_losses(run)) >= 4) -> tuple:
    """Start the zero2 run's job under `bigtrain train --nproc 2` (with `extra` arguments and
    BIGTRAIN_FAULT=`fault`), send `sig` to the launcher once `ready(output_dir)` (default: 4 steps
    are logged); returns (output_dir, args, the step it stopped and saved at, its log)."""
    import time

    out, args, _ = zero2_run
    run = tmp_path / "pre"
    args = [*(a if not a.startswith("output_dir=") else f"output_dir={run}" for a in args), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(BIGTRAIN_CACHE=str(cache_dir), BIGTRAIN_FAULT=fault)
    log_path = tmp_path / "log.txt"
    p = spawn([*args, "--nproc", "2"], env, log_path)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (run / "metrics.jsonl").is_file() and ready(run):
            break
        time.sleep(0.2)
    assert p.poll() is None, log_path.read_text()[-3000:]
    p.send_signal(sig)
    assert p.wait(timeout=300) == 75, log_path.read_text()[-3000:]
    saved = sorted(int(d.name.split("_")[1]) for d in (run / "checkpoints").iterdir() if d.name.startswith("step_"))
    stopped_at = saved[-1]
    assert 4 <= stopped_at < 30
    assert json.loads((run / "checkpoints" / f"step_{stopped_at:08d}" / "trainer_state.json").read_text())["samples_seen"] == stopped_at * 8
    assert not (run / "model").exists()  # no export from an interrupted run
    return run, args, stopped_at, log_path.read_text()


def test_sigusr1_saves_exits_75_and_resume_auto_matches(zero2_run, cli, cache_dir, tmp_path):
    """Preemption: SIGUSR1 to `bigtrain train --nproc 2` -> every rank finishes its step, saves,
    exits with code 75; `--resume auto` then repeats the uninterrupted run's losses exactly.
    With train.async_save, and the signal sent while step 15's checkpoint is still being written
    in the background (its writer sleeps 6 s): the stop waits for that write, commits it, and
    saves its own step (synchronously) after it. (The SIGTERM test below preempts a synchronous run.)"""
    import signal

    from bigtrain.checkpoint import check_checkpoint

    def writing_15(run: Path) -> bool:
        return any(r.get("checkpoint") == "step_00000015" and r.get("checkpoint_background") for r in metrics(run))

    run, args, stopped_at, _ = preempt(zero2_run, cache_dir, tmp_path, signal.SIGUSR1, ("train.async_save=true",),
                                       "slow_save@15:6,slow_data@100", ready=writing_15)
    records = metrics(run)
    stop_save = next(r for r in records if r.get("checkpoint") == f"step_{stopped_at:08d}" and "checkpoint_blocking_s" in r)
    assert stopped_at > 15 and "checkpoint_background" not in stop_save and stop_save["checkpoint_wait_s"] > 2, stop_save
    assert [r["checkpoint_total_s"] for r in records if "checkpoint_total_s" in r][0] >= 6
    assert check_checkpoint(run / "checkpoints" / "step_00000015") is None
    r = cli([*args, "--nproc", "2", "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    straight, resumed = train_losses(zero2_run[0]), train_losses(run)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])


@pytest.fixture(scope="module")
def async_run(zero2_run, cli, tmp_path_factory):
    """zero2_run's job with train.async_save=true: step 15's checkpoint is written in the
    background, its writer first sleeping 3 s (slow storage); step 30's, the last, is not."""
    _, args, _ = zero2_run
    out = tmp_path_factory.mktemp("async") / "run"
    args = [a if not a.startswith("output_dir=") else f"output_dir={out}" for a in args]
    r = cli([*args, "train.async_save=true", "--nproc", "2"], env_extra={"BIGTRAIN_FAULT": "slow_save@15:3"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def same_checkpoint_files(a: Path, b: Path) -> None:
    """Every file of checkpoint a equals b's: DeepSpeed's .pt archives entry by entry (torch gives
    each save a serialization id of its own), the RNG files' torch generator state (numpy's and
    Python's generators are not seeded, so they differ between any two runs), the rest byte by byte."""
    import zipfile

    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.startswith("rng_rank"):
            assert torch.equal(torch.load(a / rel)["torch"], torch.load(b / rel)["torch"]), rel
        elif rel.endswith(".pt"):
            za, zb = zipfile.ZipFile(a / rel), zipfile.ZipFile(b / rel)
            assert za.namelist() == zb.namelist(), rel
            assert all(za.read(n) == zb.read(n) for n in za.namelist() if not n.endswith("serialization_id")), rel
        elif rel != "manifest.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_a_background_save_writes_what_a_synchronous_one_does(zero2_run, async_run):
    """The same losses, and checkpoints equal file by file (step 15 written in the background)."""
    from bigtrain.checkpoint import check_checkpoint

    assert train_losses(async_run) == train_losses(zero2_run[0])
    for tag in ("step_00000015", "step_00000030"):
        assert check_checkpoint(async_run / "checkpoints" / tag) is None
        same_checkpoint_files(zero2_run[0] / "checkpoints" / tag, async_run / "checkpoints" / tag)


def test_the_step_loop_does_not_wait_for_a_background_write(async_run):
    """The step loop stood still for step 15's snapshot only; steps 16.. trained while its writer
    slept 3 s, and the checkpoint was committed after them (checkpoint_total_s >= 3)."""
    records = metrics(async_run)
    start = next(i for i, r in enumerate(records) if r.get("checkpoint") == "step_00000015" and "checkpoint_blocking_s" in r)
    done = next(i for i, r in enumerate(records) if r.get("checkpoint") == "step_00000015" and "checkpoint_total_s" in r)
    assert records[start]["checkpoint_background"] and records[start]["checkpoint_blocking_s"] < 1.5, records[start]
    assert records[done]["checkpoint_total_s"] >= 3, records[done]
    trained_meanwhile = [r["step"] for r in records[start:done] if "loss" in r]
    assert trained_meanwhile[:2] == [16, 17], trained_meanwhile
    last = next(r for r in records if r.get("checkpoint") == "step_00000030")
    assert "checkpoint_background" not in last  # the run's last checkpoint is written before it ends
    # `bigtrain report`'s checkpoint table says how each was written and how long training stood still.
    from bigtrain.report import checkpoint_rows, load_run

    rows = {row[0]: row for row in checkpoint_rows(load_run(async_run))}
    assert rows["step_00000015"][3] == f"{records[start]['checkpoint_blocking_s']:.2f} s"
    assert rows["step_00000015"][4] == f"in the background, {records[done]['checkpoint_total_s']:.2f} s"
    assert rows["step_00000030"][4] == "synchronously"


def test_a_kill_during_a_background_write_keeps_the_last_committed_checkpoint(zero2_run, cli, tmp_path):
    """Rank 0 is killed at step 12 while its writer of step 10's checkpoint still sleeps (rank 1's
    is done): step 10 stays a .tmp- directory, never taken for a checkpoint; step 5 is the latest,
    and `--resume auto` continues from it with the uninterrupted run's losses, exactly. (At another
    world size a background save's checkpoint converts as a synchronous one does: their files are
    the same, test_a_background_save_writes_what_a_synchronous_one_does.)"""
    _, args, _ = zero2_run
    out = tmp_path / "killed"
    args = [a if not a.startswith("output_dir=") else f"output_dir={out}" for a in args] + ["train.save_every=5", "train.async_save=true"]
    r = cli([*args, "--nproc", "2"], env_extra={"BIGTRAIN_FAULT": "slow_save@10:8:0,kill@12:0"})
    assert r.returncode == 4, r.stderr[-3000:]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [".tmp-step_00000010", "step_00000005"]
    assert (root / "latest").read_text() == "step_00000005"
    r = cli([*args, "--nproc", "2", "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {root / 'step_00000005'} at step 5" in r.stderr
    straight, resumed = train_losses(zero2_run[0]), train_losses(out)
    assert all(resumed[step] == straight[step] for step in range(1, 31)), (resumed, straight)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # the next save removed it


def test_sigterm_to_the_launcher_reaches_every_rank_as_a_preemption(zero2_run, cache_dir, tmp_path):
    """SIGTERM (what `kill`, systemd and most schedulers send) to `bigtrain train --nproc 2` is
    forwarded to both ranks: they save at the same step and the job exits 75, not killed mid-step.
    (Resuming from such a checkpoint is the SIGUSR1 test's.)"""
    import signal

    run, _, stopped_at, log = preempt(zero2_run, cache_dir, tmp_path, signal.SIGTERM)
    assert "bigtrain: received SIGTERM: asking every rank to finish its step, save and stop" in log
    stops = re.findall(r"stopping at step (\d+)", log)
    assert stops and {int(s) for s in stops} == {stopped_at}, log[-3000:]
    from bigtrain.checkpoint import check_checkpoint

    assert check_checkpoint(run / "checkpoints" / f"step_{stopped_at:08d}") is None
    assert not (run / ".bigtrain.lock.json").exists()  # an orderly end releases the output directory


def test_ranks_still_running_after_the_stop_grace_are_killed_and_named(zero2_run, cache_dir, tmp_path):
    """A rank that cannot act on the forwarded stop (stuck in a 600 s sleep at step 3, its peer
    waiting for it in a collective) must not hold the machine until a scheduler's time limit:
    the launcher kills every rank still running --stop-grace seconds after the signal, by name."""
    import signal
    import time

    _, args, _ = zero2_run
    run = tmp_path / "stuck"
    args = [a if not a.startswith("output_dir=") else f"output_dir={run}" for a in args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(BIGTRAIN_CACHE=str(cache_dir), BIGTRAIN_FAULT="hang@3:1:600")
    log_path = tmp_path / "log.txt"
    p = spawn([*args, "--nproc", "2", "--stop-grace", "5"], env, log_path)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not ((run / "metrics.jsonl").is_file() and len(train_losses(run)) >= 2):
        time.sleep(0.2)
    time.sleep(1)  # rank 1 is now in its sleep at step 3
    assert p.poll() is None, log_path.read_text()[-3000:]
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    code = p.wait(timeout=120)
    elapsed = time.monotonic() - t0
    text = log_path.read_text()
    killed = dict(re.findall(r"bigtrain: rank (\d) \(pid (\d+)\) still running 5s after the stop signal: killing it", text))
    assert "1" in killed, text[-3000:]
    assert code not in (0, 75), code  # not reported as a clean stop
    assert 5 <= elapsed < 30, elapsed
    for pid in killed.values():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
