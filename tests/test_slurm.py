"""bigtrain on Slurm: rendered job scripts, their quoting, and real jobs on a two-node cluster.

The cluster (tests/slurm_cluster.sh: Debian's slurm-wlm + munge, one slurmctld and two slurmd
daemons as nodes n1 and n2 on this machine) is started by a fixture and stopped afterwards; the
packages are installed with apt-get when missing. Where that is impossible (not root, no apt-get)
the cluster tests skip with the reason, except under CI (the environment variable CI set), where
they fail with it: a CI run must not stay green without them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import REPO, SMALL

CLUSTER_SCRIPT = REPO / "tests" / "slurm_cluster.sh"
HOSTILE = 'x"; touch {marker}; echo "'


def slurm_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`bigtrain slurm ARGS` through bigtrain.slurm's own entry point (independent of the CLI wiring)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "bigtrain.slurm", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def slurm_here(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`bigtrain slurm ARGS` in this process (importing bigtrain in a new one takes seconds): (exit code, stdout, stderr)."""
    import contextlib
    import io

    from bigtrain.slurm import _main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = _main(args)
    finally:
        os.chdir(previous)
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- rendering, no cluster


FAKE_SLURM = {
    # srun: drop srun's own options, run the command as task 0 on node 1 of 2.
    "srun": '#!/bin/bash\nwhile [[ "${1:-}" == -* ]]; do shift; done\nSLURM_NODEID=1 SLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n',
    "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$FAKE_CALLS"\n'
                'case "$1 ${2:-}" in "show hostnames") printf "n1\\nn2\\n";; "show job") echo "   EndTime=$(date -d "+1 hour" +%Y-%m-%dT%H:%M:%S)";; esac\n',
    "squeue": '#!/bin/bash\ndate -d "+1 hour" +%Y-%m-%dT%H:%M:%S\n',
    # The command the job runs: records its arguments (NUL-separated) and exits $FAKE_RC.
    "fake-cmd": '#!/bin/bash\nprintf "%s\\0" "$@" > "$FAKE_ARGV"\nprintenv > "$FAKE_ENV"\nexit "${FAKE_RC:-0}"\n',
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(script: Path, fake_bin: Path, tmp_path: Path, rc: int = 0) -> tuple[subprocess.CompletedProcess, list[str], dict, str]:
    """Run a rendered job script under bash with fake srun/scontrol/squeue, as job 42 on n[1-2]."""
    env = {
        "PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path),
        "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2",
        "FAKE_ARGV": str(tmp_path / "argv"), "FAKE_ENV": str(tmp_path / "env"), "FAKE_CALLS": str(tmp_path / "calls"), "FAKE_RC": str(rc),
    }
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    argv_file = tmp_path / "argv"
    argv = argv_file.read_bytes().decode().split("\0")[:-1] if argv_file.exists() else []
    job_env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line) if (tmp_path / "env").exists() else {}
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    return r, argv, job_env, calls


def test_hostile_values_stay_literal(tmp_path, fake_slurm):
    """Every user value is shell-quoted: the rendered script passes bash -n and runs no injected command."""
    marker = tmp_path / "pwned"
    name = HOSTILE.format(marker=marker)
    overrides = [f"output_dir={tmp_path}/out $(touch {marker})", f"train.sample_prompt='; touch {marker}; `touch {marker}` \\"]
    script = tmp_path / "job.sbatch"
    r = slurm_here(["render", *overrides, "--nodes", "2", "--gpus-per-node", "0", "--job-name", name, "--partition", f"p;touch {marker}",
                   "--account", f"$(touch {marker})", "--bigtrain", str(fake_slurm / "fake-cmd"), "--time", "1:00:00", "--grace", "60", "-o", str(script)], tmp_path)
    assert r[0] == 0, r[2]
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert re.search(r"^#SBATCH --job-name='x\"; touch .*; echo \"'$", text, re.M), text
    assert "#SBATCH --signal=B:USR1@60" in text and "#SBATCH --requeue" in text and "#SBATCH --time=1:00:00" in text
    res, argv, job_env, calls = run_script(script, fake_slurm, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not marker.exists()
    # The command received each argument exactly as given.
    assert argv == ["train", *overrides, "--resume", "auto"]
    assert job_env["MASTER_ADDR"] == "n1" and job_env["MASTER_PORT"] == str(20000 + 42)
    assert job_env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    stop_at = int(job_env["BIGTRAIN_STOP_AT"])
    assert abs(stop_at - (time.time() + 3600 - 60)) < 30
    assert "RANK" not in job_env and "WORLD_SIZE" not in job_env
    assert (tmp_path / "out $(touch {})".format(marker) / "slurm" / "42").is_dir()  # the per-job log directory


def test_render_passes_the_parallel_layout_and_warns_when_tensor_parallelism_leaves_a_node(tmp_path):
    layout = ["model.preset=llama-tiny", "deepspeed.zero_stage=1", f"output_dir={tmp_path}/out"]
    rc, text, err = slurm_here(["render", *layout, "deepspeed.tensor_parallel=8", "--nodes", "2", "--gpus-per-node", "8"], tmp_path)
    assert rc == 0 and "deepspeed.tensor_parallel=8" in text and "warning" not in err, err
    rc, text, err = slurm_here(["render", *layout, "deepspeed.tensor_parallel=8", "--nodes", "2", "--gpus-per-node", "4"], tmp_path)
    assert rc == 0 and "deepspeed.tensor_parallel=8" in text
    assert "warning: deepspeed.tensor_parallel=8 is more than the 4 rank(s) of one node" in err
    rc, _, err = slurm_here(["render", *layout, "deepspeed.sequence_parallel=4", "--nodes", "1", "--gpus-per-node", "6"], tmp_path)
    assert rc == 2 and "world size 6 does not divide into groups of 4" in err, err


def test_exit_75_requeues(tmp_path, fake_slurm):
    script = tmp_path / "job.sbatch"
    r = slurm_here(["render", f"output_dir={tmp_path}/out", "--nodes", "2", "--gpus-per-node", "8", "--bigtrain", str(fake_slurm / "fake-cmd"), "-o", str(script)], tmp_path)
    assert r[0] == 0, r[2]
    text = script.read_text()
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --ntasks-per-node=8" in text and "--partition" not in text.split("set -uo")[0]
    res, _, _, calls = run_script(script, fake_slurm, tmp_path, rc=75)
    assert "scontrol requeue 42" in calls, res.stdout + res.stderr
    assert "requeueing job 42" in res.stdout
    res, _, _, _ = run_script(script, fake_slurm, tmp_path, rc=3)
    assert res.returncode == 3 and "bigtrain exited with code 3" in res.stdout


def test_deepspeed_template_hostfile_and_node_rank(tmp_path, fake_slurm):
    script = tmp_path / "ds.sbatch"
    r = slurm_here(["render", f"output_dir={tmp_path}/out", "train.lr=1e-3", "--nodes", "2", "--gpus-per-node", "4", "--template", "deepspeed",
                   "--python", str(fake_slurm / "fake-cmd"), "--cpus-per-task", "32", "-o", str(script)], tmp_path)
    assert r[0] == 0, r[2]
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=4" in text and "#SBATCH --cpus-per-task=32" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    res, argv, _, _ = run_script(script, fake_slurm, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    hostfile = tmp_path / "out" / "slurm" / "42" / "hostfile"
    assert hostfile.read_text() == "n1 slots=4\nn2 slots=4\n"
    assert argv[:3] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert "--no_ssh" in argv and "--node_rank=1" in argv and argv[argv.index("--hostfile") + 1] == str(hostfile)
    assert argv[argv.index("--module"):] == ["--module", "bigtrain", "train", f"output_dir={tmp_path}/out", "train.lr=1e-3", "--resume", "auto"]


def test_single_node_template(tmp_path, fake_slurm):
    script = tmp_path / "one.sbatch"
    r = slurm_here(["render", f"output_dir={tmp_path}/out", "--gpus-per-node", "0", "--ntasks-per-node", "2", "--bigtrain", f"{fake_slurm / 'fake-cmd'} --flag",
                   "-o", str(script)], tmp_path)
    assert r[0] == 0, r[2]
    text = script.read_text()
    assert "#SBATCH --nodes=1" in text and "#SBATCH --ntasks=1" in text and "gpus-per-node" not in text.split("set -uo")[0]
    res, argv, _, _ = run_script(script, fake_slurm, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert argv == ["--flag", "train", f"output_dir={tmp_path}/out", "--nproc", "2", "--resume", "auto"]


@pytest.mark.parametrize("args, message", [
    (["train.max_stepz=3"], "did you mean"),
    (["--job-name", "a\nb"], "control characters"),
    (["--time", "1:00", "--grace", "300"], "leaves no time"),
    (["--time", "soon"], "is not a Slurm time"),
    (["train.global_batch_size=7"], "global"),
    (["--template", "nope"], "no template"),
    (["--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "2", "--ntasks-per-node", "4"], "own GPU"),
    (["missing.yaml"], "not found"),
])
def test_bad_input_is_one_error_line(tmp_path, args, message):
    extra = ([] if "--gpus-per-node" in args else ["--gpus-per-node", "0"]) + ([] if "--nodes" in args else ["--nodes", "2"])
    r = slurm_here(["render", *args, *extra], tmp_path)
    rc, out, err = r
    assert rc == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert out == ""


def test_templates_are_package_data():
    from importlib import resources

    names = {p.name for p in resources.files("bigtrain.slurm_templates").iterdir()}
    assert {"multinode.sbatch", "deepspeed.sbatch", "single-node.sbatch"} <= names
    for n in ("multinode.sbatch", "deepspeed.sbatch", "single-node.sbatch"):
        text = (REPO / "slurm" / n).read_text()
        assert "--signal=B:USR1@{{grace}}" in text and "#SBATCH --requeue" in text and "--resume auto" in text
        assert "scontrol requeue" in text and "BIGTRAIN_STOP_AT" in text


def test_cli_wiring(cli, tmp_path):
    """`bigtrain slurm render` once cli.py dispatches to bigtrain.slurm."""
    from bigtrain.cli import build_parser

    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    assert "slurm" in verbs
    r = cli(["slurm", "render", "--gpus-per-node", "0", "--nodes", "2", f"output_dir={tmp_path}/o"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in r.stdout
    r = cli(["slurm", "render", "--gpus-per-node", "0", "train.nope=1"])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- a real cluster


def in_ci() -> bool:
    """CI runs set CI (GitHub Actions, GitLab, ...: CI=true); "", "0" and "false" count as unset."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


@pytest.fixture(scope="module")
def cluster():
    r = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=1200)
    if r.returncode == 3:
        reason = (r.stdout.strip().splitlines() or [f"{CLUSTER_SCRIPT.name} start exited 3 without a reason"])[-1]
        if in_ci():
            # In CI a skip would leave the suite green without the cluster tests having run.
            pytest.fail(f"CI={os.environ['CI']} is set, so the Slurm cluster tests may not skip: {reason}", pytrace=False)
        pytest.skip(reason=reason)
    assert r.returncode == 0, r.stdout + r.stderr
    conf = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    info = {k: v for k, v in re.findall(r"\b(JobState|Restarts|Reason|ExitCode|NodeList|TimeLimit)=(\S+)", out)}
    m = re.search(r"JobName=(.*)$", out.splitlines()[0]) if out else None
    info["JobName"] = m.group(1) if m else None
    return info


def wait_for(what: str, pred, timeout: float, every: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def logs(log_dir: Path, job: str) -> tuple[str, dict[str, str]]:
    batch = (log_dir / f"slurm-{job}.out").read_text() if (log_dir / f"slurm-{job}.out").exists() else ""
    tasks = {p.name: p.read_text(errors="replace") for p in sorted((log_dir / job).glob("*.log"))}
    return batch, tasks


def controller_log(job: str) -> str:
    """slurmctld's lines about this job (why a launch was refused, e.g. "Job credential revoked")."""
    path = Path(os.environ.get("BIGTRAIN_SLURM_DIR", "/tmp/bigtrain-slurm")) / "log" / "slurmctld.log"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join([line for line in lines if re.search(rf"\bJobId={job}\b", line)][-20:])


def diagnose(log_dir: Path, job: str) -> str:
    batch, tasks = logs(log_dir, job)
    return (f"job {job}: {job_info(job)}\n--- slurmctld\n{controller_log(job)}\n--- batch log\n{batch[-3000:]}\n"
            + "".join(f"--- {n}\n{t[-2000:]}\n" for n, t in tasks.items()))


MAX_STEPS = 40


@pytest.fixture(scope="module")
def job_args(cluster, cli, corpus, tmp_path_factory):
    """The training arguments of the cluster jobs; the data is tokenized once, before any job."""
    args = [f"data.train_files={corpus}", *SMALL, "deepspeed.zero_stage=3", f"train.max_steps={MAX_STEPS}",
            "train.log_every=1", "train.eval_every=1000", "train.save_every=1000"]
    r = cli(["data", "prepare", *args])
    assert r.returncode == 0, r.stderr[-3000:]
    return args


def submit(args: list[str], out: Path, *extra: str, env_extra: dict | None = None) -> str:
    r = slurm_cli(["submit", *args, f"output_dir={out}", "--nodes", "2", "--gpus-per-node", "0", *extra], out.parent, env_extra=env_extra)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip()
    assert job.isdigit(), r.stdout
    return job


def release_requeued(job: str) -> None:
    """Start a requeued job now rather than after Slurm's hold on it (about two minutes, Reason=BeginTime).

    The hold has a purpose: the requeue revoked the job's credential on its nodes as of that second,
    and slurmd refuses to launch a job whose new credential is from the same second ("Job credential
    revoked": the job ends FAILED with exit code 1 and Restarts=1, its next attempt never started).
    So release the job only once it is pending again (its nodes done with the old attempt), and
    only two seconds after that.
    """
    done_with_attempt = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    info = wait_for(f"job {job} to be pending again", lambda: (lambda i: i if i.get("JobState") in done_with_attempt else None)(job_info(job)), 120)
    if info["JobState"] != "PENDING":
        return  # it already started (or ended): nothing to release
    time.sleep(2)
    r = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, text=True)
    assert r.returncode == 0 or job_info(job).get("JobState") != "PENDING", f"scontrol update StartTime=now: {r.stderr.strip()}"


def wait_done(job: str, log_dir: Path, timeout: float = 240) -> dict:
    info = wait_for(f"job {job} to finish", lambda: (lambda i: i if i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None)(job_info(job)), timeout)
    return info


@pytest.fixture(scope="module")
def time_limit_job(job_args, tmp_path_factory):
    """A 2-minute job with more training than fits (test_time_limit_saves_before_the_kill), submitted
    before the other jobs and left to run beside them (each node has a CPU for each): it spends its
    time limit nearly idle, so the suite need not wait for it alone. Each batch arrives a second
    late (a fault that sleeps in the loader) instead of training two ranks flat out."""
    out = tmp_path_factory.mktemp("slurm-time-limit") / "run"
    args = [a for a in job_args if not a.startswith("train.max_steps=")] + ["train.max_steps=100000"]
    job = submit(args, out, "--time", "2:00", "--grace", "30", env_extra={"BIGTRAIN_FAULT": "slow_data@1000"})
    yield job, out
    subprocess.run(["scancel", job])


@pytest.fixture(scope="module")
def straight_job(job_args, time_limit_job, tmp_path_factory):
    """One uninterrupted two-node ZeRO-3 job (with a hostile job name)."""
    base = tmp_path_factory.mktemp("slurm-straight")
    out = base / "run"
    marker = base / "pwned"
    job = submit(job_args, out, "--job-name", HOSTILE.format(marker=marker), "--time", "10:00", "--grace", "60")
    try:
        info = wait_done(job, out / "slurm")
    except AssertionError:
        subprocess.run(["scancel", job])
        raise AssertionError(diagnose(out / "slurm", job))
    return job, out, marker, info


@pytest.mark.slow
def test_two_node_zero3_job(straight_job):
    job, out, marker, info = straight_job
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", diagnose(out / "slurm", job)
    assert info["JobName"] == HOSTILE.format(marker=marker) and not marker.exists()
    assert info["NodeList"] == "n[1-2]"
    got = losses(out)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    first, last = sum(got[s] for s in (1, 2, 3)) / 3, sum(got[s] for s in range(MAX_STEPS - 2, MAX_STEPS + 1)) / 3
    assert last < first - 0.6, (first, last)
    state = json.loads((out / "checkpoints" / f"step_{MAX_STEPS:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 3 and state["step"] == MAX_STEPS
    batch, tasks = logs(out / "slurm", job)
    assert "attempt 0 on n[1-2] (2 tasks), rendezvous n1:" in batch and "bigtrain exited with code 0" in batch
    assert "saves and stops before" in batch  # BIGTRAIN_STOP_AT from the job's end time
    assert set(tasks) == {"attempt-0.task-0.log", "attempt-0.task-1.log"}


@pytest.mark.slow
@pytest.mark.parametrize("template", ["multinode", "deepspeed"])
def test_preempted_job_requeues_and_resumes_exactly(straight_job, job_args, tmp_path, template):
    """USR1 to the batch step mid-run: the ranks save, the job requeues itself and resumes, with the
    same losses as the straight job (which ran under srun: the DeepSpeed launcher gives the same ranks)."""
    _, straight_out, _, _ = straight_job
    out = tmp_path / "run"
    job = submit(job_args, out, "--time", "10:00", "--grace", "60", "--template", template)
    rank0 = "task-0" if template == "multinode" else "node-0"  # srun's task 0 / the first node's launcher
    log_dir = out / "slurm"
    try:
        wait_for("step 5", lambda: len(losses(out)) >= 5 or job_info(job).get("JobState") not in ("PENDING", "RUNNING"), 180, every=0.1)
        assert job_info(job)["JobState"] == "RUNNING", diagnose(log_dir, job)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        wait_for("the requeue", lambda: int(job_info(job).get("Restarts", 0)) >= 1, 120)
        release_requeued(job)
        info = wait_done(job, log_dir)
    except AssertionError as e:
        subprocess.run(["scancel", job])
        raise AssertionError(f"{e}\n{diagnose(log_dir, job)}")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", diagnose(log_dir, job)
    batch, tasks = logs(log_dir, job)
    assert "received USR1" in batch and f"requeueing job {job}" in batch and "attempt 1 on" in batch, batch
    # Rank 0 may see the stop flag from another rank first (the signal reaches the nodes' launchers
    # one after the other): both mean the agreed stop.
    m = re.search(r"stopping at step (\d+) \(received (?:SIGUSR1|a signal on another rank)\)", tasks[f"attempt-0.{rank0}.log"])
    assert m, tasks[f"attempt-0.{rank0}.log"][-3000:]
    stopped = int(m.group(1))
    assert 5 <= stopped < MAX_STEPS
    assert f"resumed from {out}/checkpoints/step_{stopped:08d} at step {stopped}" in tasks[f"attempt-1.{rank0}.log"]
    assert losses(out) == losses(straight_out)  # bigtrain's resume is exact
    state = json.loads((out / "checkpoints" / f"step_{MAX_STEPS:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == MAX_STEPS


@pytest.mark.slow
def test_time_limit_saves_before_the_kill(time_limit_job):
    """bigtrain saves and stops before the job's time limit, then requeues. (Slurm may send the
    signal up to 60 s early, so the grace leaves room for that.)"""
    job, out = time_limit_job
    log_dir = out / "slurm"
    try:
        wait_for("the job to stop and requeue", lambda: "requeueing job" in logs(log_dir, job)[0] or job_info(job).get("JobState") in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"), 300)
    finally:
        subprocess.run(["scancel", job])
    batch, tasks = logs(log_dir, job)
    assert "saves and stops before" in batch and f"requeueing job {job}" in batch, diagnose(log_dir, job)
    m = re.search(r"stopping at step (\d+) \((the job's time limit is near|received SIGUSR1)\): checkpoint", tasks.get("attempt-0.task-0.log", ""))
    assert m, diagnose(log_dir, job)
    step = int(m.group(1))
    assert 0 < step < 100000
    state = json.loads((out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"


def test_prepare_on_slurm_writes_the_shards_a_local_prepare_writes(job_args, cli, corpus, tmp_path):
    """`bigtrain data prepare --slurm --wait` (a datatrove job array on the two nodes) and a local
    prepare with the same task count write byte-identical shards and the same manifest entries."""
    r = cli(["data", "prepare", *job_args])  # the cluster jobs' preparation: reuse its tokenizer
    assert r.returncode == 0, r.stderr[-3000:]
    common = ["data", "prepare", f"data.train_files={corpus}", f"data.tokenizer={Path(r.stdout.strip()) / 'tokenizer'}", "--tasks", "2"]
    local, on_slurm = tmp_path / "local", tmp_path / "slurm"
    r = cli([*common, "--workers", "1", "--out", str(local)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli([*common, "--out", str(on_slurm), "--slurm", "--wait", "--time", "00:10:00"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in (on_slurm / "logs").rglob("*.out"))
    assert r.stdout.strip() == str(on_slurm)
    logs_dir = on_slurm / "logs" / "train" / "train"
    assert "#SBATCH --array=0-1" in (logs_dir / "launch_script.slurm").read_text()  # one array task per datatrove task
    assert sorted(p.name for p in (logs_dir / "completions").iterdir()) == ["00000", "00001"]
    entries = [json.loads((d / "manifest.json").read_text())["sources"]["train"] for d in (local, on_slurm)]
    assert entries[0]["files"] == entries[1]["files"] and len(entries[0]["files"]) == 2
    for f in entries[0]["files"]:
        for suffix in ("", ".index"):
            assert (local / (f["path"] + suffix)).read_bytes() == (on_slurm / (f["path"] + suffix)).read_bytes()
