"""`bigtrain slurm render|submit`: fill one of the sbatch templates in slurm/ and (submit) sbatch it.

The templates are plain bash with `{{field}}` placeholders; rendering replaces each field by a
shell-quoted value (`shlex.quote`), and drops an `#SBATCH` line whose field has no value (no
--partition: no `#SBATCH --partition` line). The CONFIG and overrides are validated with
`load_config` first, so a job never waits in the queue only to fail on a typo.

Templates (slurm/*.sbatch, installed as `bigtrain.slurm_templates`):
  multinode      srun starts one bigtrain task per GPU (per task on CPU); ranks from SLURM_* vars
  deepspeed      srun starts one DeepSpeed launcher per node (hostfile from SLURM_JOB_NODELIST,
                 `--no_ssh`), which starts one rank per GPU
  single-node    one node: `bigtrain train --nproc N` inside the batch step
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from bigtrain.config import split_config_args
from bigtrain.errors import UserError

TEMPLATES = {
    "multinode": "multinode.sbatch",
    "deepspeed": "deepspeed.sbatch",
    "single-node": "single-node.sbatch",
}
DEFAULT_GRACE = 300
DEFAULT_MAX_RESTARTS = 20
_FIELD = re.compile(r"\{\{(\w+)\}\}")
# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (or UNLIMITED/INFINITE).
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


# --------------------------------------------------------------------------- arguments


def add_arguments(subparsers) -> None:
    """Add the `render` and `submit` verbs to an argparse subparsers object."""
    r = subparsers.add_parser(
        "render", help="print (or -o: write) a Slurm job script for a training run",
        description="Write the sbatch script that trains CONFIG on Slurm: preemption-safe (saves and "
        "requeues on USR1/TERM and before the time limit) and always resuming from the latest checkpoint.",
    )
    _common(r)
    r.add_argument("-o", "--out", metavar="FILE", help="write the script to FILE instead of printing it")
    r.set_defaults(slurm_action="render")

    s = subparsers.add_parser(
        "submit", help="render the job script and sbatch it; prints the job id",
        description="Render the job script (saved in the log directory, or -o FILE) and submit it with sbatch.",
    )
    _common(s)
    s.add_argument("-o", "--out", metavar="FILE", help="where to keep the script (default: LOG_DIR/bigtrain-<time>.sbatch)")
    s.set_defaults(slurm_action="submit")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="the training config and overrides, as for `bigtrain train`")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="GPUs per node; 0 renders a CPU job (gloo)")
    p.add_argument("--ntasks-per-node", type=int, metavar="T", help="ranks per node (default: G, or 1 on a CPU job)")
    p.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per rank (per node launcher for --template deepspeed, per job for single-node)")
    p.add_argument("--mem", metavar="M", help="memory per node, as sbatch --mem (e.g. 200G)")
    p.add_argument("--time", metavar="HH:MM:SS", help="time limit, as sbatch --time")
    p.add_argument("--partition", metavar="P")
    p.add_argument("--account", metavar="A")
    p.add_argument("--qos", metavar="Q")
    p.add_argument("--constraint", metavar="C")
    p.add_argument("--job-name", default="bigtrain", metavar="NAME")
    p.add_argument("--template", metavar="NAME", help=f"{', '.join(TEMPLATES)} or a path to your own (default: single-node for one node, else multinode)")
    p.add_argument("--grace", type=int, default=DEFAULT_GRACE, metavar="SECONDS",
                   help=f"save this long before the time limit: Slurm sends USR1 then, and BIGTRAIN_STOP_AT is end - grace (default {DEFAULT_GRACE})")
    p.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, metavar="N", help=f"requeue the job at most N times (default {DEFAULT_MAX_RESTARTS})")
    p.add_argument("--log-dir", metavar="DIR", help="job logs (default: OUTPUT_DIR/slurm); each job writes DIR/slurm-JOBID.out and DIR/JOBID/")
    p.add_argument("--workdir", metavar="DIR", help="the job's working directory, where relative paths resolve (default: the current one)")
    p.add_argument("--bigtrain", metavar="CMD", help="the bigtrain command the job runs (default: the one next to this Python, or 'python -m bigtrain')")
    p.add_argument("--python", metavar="PATH", help="the Python that runs DeepSpeed's launcher (--template deepspeed; default: this one)")


# --------------------------------------------------------------------------- rendering


def _check_text(name: str, value: str) -> str:
    """A value that goes into the script: any character but control characters (a newline would end an #SBATCH comment)."""
    if value == "":
        raise UserError(f"{name} must not be empty")
    bad = [c for c in value if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise UserError(f"{name} must not contain control characters (found {bad[0]!r})")
    return value


def _time_seconds(value: str) -> Optional[int]:
    """Seconds in a Slurm --time value; None for UNLIMITED."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(value)
    if not m:
        raise UserError(f"--time {value!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    d, h, mi, s, m2, s2, s3 = m.groups()
    if d is not None:
        return int(d) * 86400 + int(h) * 3600 + int(mi or 0) * 60 + int(s or 0)
    parts = [int(x) for x in (m2, s2, s3) if x is not None]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def _default_bigtrain() -> list[str]:
    exe = os.path.abspath(sys.executable)  # not resolved: a venv's python is a symlink out of the venv
    script = Path(exe).parent / "bigtrain"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [exe, "-m", "bigtrain"]


def _template_text(name: str) -> tuple[str, str]:
    """(template name, its text) for a template name or a path to a template file."""
    if name in TEMPLATES:
        return name, resources.files("bigtrain.slurm_templates").joinpath(TEMPLATES[name]).read_text()
    stem = name[: -len(".sbatch")] if name.endswith(".sbatch") else None
    if stem in TEMPLATES:
        return stem, resources.files("bigtrain.slurm_templates").joinpath(TEMPLATES[stem]).read_text()
    p = Path(name)
    if p.is_file():
        try:
            return "file", p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--template: cannot read {name}: {e}") from None
    raise UserError(f"--template: no template {name!r} (choose {', '.join(TEMPLATES)}, or give the path of a template file)")


def fill(text: str, values: dict[str, Optional[str]]) -> str:
    """Replace each {{field}}; an #SBATCH line with a field whose value is None is left out."""
    out = []
    for line in text.splitlines(keepends=True):
        names = _FIELD.findall(line)
        for n in names:
            if n not in values:
                raise UserError(f"template field {{{{{n}}}}} is unknown (fields: {', '.join(sorted(values))})")
        if any(values[n] is None for n in names):
            if line.startswith("#SBATCH"):
                continue
            missing = [n for n in names if values[n] is None]
            raise UserError(f"template field {{{{{missing[0]}}}}} needs a value")
        out.append(_FIELD.sub(lambda m: str(values[m.group(1)]), line))
    return "".join(out)


def render(args: argparse.Namespace) -> tuple[str, Path]:
    """The job script for these arguments, and its log directory."""
    from bigtrain.config import check_batch, load_config, where_of

    config, overrides = split_config_args(list(args.args))
    cfg = load_config(config, overrides)

    ranks_per_node = _check_counts(args)
    template = args.template or ("single-node" if args.nodes == 1 else "multinode")
    kind, text = _template_text(template)
    if kind == "single-node" and args.nodes != 1:
        raise UserError(f"--template single-node runs on one node, but --nodes is {args.nodes} (use multinode or deepspeed)")
    world = args.nodes * ranks_per_node
    check_batch(cfg, world, lambda key: where_of(cfg, key))
    tp = cfg.deepspeed.tensor_parallel
    if tp > ranks_per_node:
        print(f"warning: deepspeed.tensor_parallel={tp} is more than the {ranks_per_node} rank(s) of one node: every layer's "
              "all-reduce would cross the network. Keep tensor parallelism inside a node (ZeRO or sequence parallelism across nodes)",
              file=sys.stderr)
    _check_time(args)

    workdir, log_dir = _job_dirs(args, Path(cfg.output_dir))
    bigtrain, python = _job_commands(args)
    train_args = _train_args(config, overrides)
    script = fill(text, _field_values(args, ranks_per_node, workdir, log_dir, bigtrain, python, train_args))
    header = f"# Rendered by `bigtrain slurm render` for {args.nodes} node(s) x {ranks_per_node} rank(s) ({'GPU' if args.gpus_per_node else 'CPU'})."
    lines = script.split("\n", 1)
    if lines[0].startswith("#!") and len(lines) == 2:
        script = f"{lines[0]}\n{header}\n{lines[1]}"
    return script, log_dir


def _check_counts(args: argparse.Namespace) -> int:
    """Check the node, rank, CPU and restart counts; returns the ranks per node."""
    if args.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    for opt in ("ntasks_per_node", "cpus_per_task"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be >= 1, got {v}")
    if args.grace < 0:
        raise UserError(f"--grace must be >= 0 seconds, got {args.grace}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    gpus = args.gpus_per_node
    ranks_per_node = args.ntasks_per_node or (gpus if gpus > 0 else 1)
    if gpus > 0 and ranks_per_node > gpus:
        raise UserError(f"--ntasks-per-node {ranks_per_node} is more than --gpus-per-node {gpus}: each rank needs its own GPU")
    return ranks_per_node


def _check_time(args: argparse.Namespace) -> None:
    """--time must be a Slurm time that leaves room for --grace."""
    if args.time is not None:
        limit = _time_seconds(_check_text("--time", args.time))
        if limit is not None and args.grace >= limit:
            raise UserError(f"--grace {args.grace}s leaves no time to train within --time {args.time} ({limit}s)")


def _job_dirs(args: argparse.Namespace, out_dir: Path) -> tuple[Path, Path]:
    """(working directory, log directory) of the job, both absolute."""
    workdir = Path(os.path.abspath(args.workdir)) if args.workdir else Path.cwd()
    if args.workdir and not workdir.is_dir():
        raise UserError(f"--workdir: {args.workdir} is not a directory")
    log_dir = Path(os.path.abspath(args.log_dir)) if args.log_dir else (out_dir if out_dir.is_absolute() else workdir / out_dir) / "slurm"
    return workdir, log_dir


def _job_commands(args: argparse.Namespace) -> tuple[list[str], str]:
    """(the bigtrain command as a list of words, the Python that runs DeepSpeed's launcher)."""
    if args.bigtrain is not None:
        try:
            bigtrain = shlex.split(_check_text("--bigtrain", args.bigtrain))
        except ValueError as e:
            raise UserError(f"--bigtrain: {e}") from None
        if not bigtrain:
            raise UserError("--bigtrain must name a command")
    else:
        bigtrain = _default_bigtrain()
    python = _check_text("--python", args.python) if args.python else os.path.abspath(sys.executable)
    return bigtrain, python


def _train_args(config: Optional[str], overrides: list[str]) -> list[str]:
    """The arguments of `bigtrain train` in the job: the config as an absolute path, then the overrides."""
    train_args = []
    if config is not None:
        train_args.append(os.path.abspath(config))
    train_args += overrides
    for a in train_args:
        _check_text("a training argument", a)
    return train_args


def _field_values(args: argparse.Namespace, ranks_per_node: int, workdir: Path, log_dir: Path, bigtrain: list[str],
                  python: str, train_args: list[str]) -> dict[str, Optional[str]]:
    """The value of each template field, shell-quoted; None drops the #SBATCH line."""
    gpus = args.gpus_per_node

    def q(name: str, value: Optional[str]) -> Optional[str]:
        return None if value is None else shlex.quote(_check_text(name, value))

    return {
        "job_name": q("--job-name", args.job_name),
        "nodes": str(args.nodes),
        "ntasks_per_node": str(ranks_per_node),
        "ranks_per_node": str(ranks_per_node),
        "gpus_per_node": str(gpus) if gpus > 0 else None,
        "cpus_per_task": str(args.cpus_per_task) if args.cpus_per_task else None,
        "mem": q("--mem", args.mem),
        "time": q("--time", args.time),
        "partition": q("--partition", args.partition),
        "account": q("--account", args.account),
        "qos": q("--qos", args.qos),
        "constraint": q("--constraint", args.constraint),
        "workdir": q("--workdir", str(workdir)),
        "log_dir": q("--log-dir", str(log_dir)),
        # In #SBATCH --output, % starts a Slurm pattern (%j): a literal % is %%.
        "log_dir_pattern": q("--log-dir", str(log_dir).replace("%", "%%")),
        "grace": str(args.grace),
        "max_restarts": str(args.max_restarts),
        "bigtrain": " ".join(shlex.quote(_check_text("--bigtrain", b)) for b in bigtrain),
        "python": shlex.quote(python),
        "train_args": " ".join(shlex.quote(a) for a in train_args),
    }


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_render(args: argparse.Namespace) -> int:
    script, _ = render(args)
    if args.out:
        _write(Path(args.out), script)
        print(args.out)
    else:
        sys.stdout.write(script)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    script, log_dir = render(args)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch not found: run this on a Slurm login node (or write the script with `bigtrain slurm render -o FILE`)")
    path = Path(args.out) if args.out else log_dir / f"bigtrain-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    _write(path, script)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch --output needs it
    except OSError as e:
        raise UserError(f"cannot create the log directory {log_dir}: {e.strerror or e}") from None
    r = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout).strip().splitlines()[-1:]) or f"exit code {r.returncode}"
        raise UserError(f"sbatch {path} failed: {msg}")
    job_id = r.stdout.strip().split(";")[0]
    print(job_id)
    print(f"script: {path}; logs: {log_dir}/slurm-{job_id}.out and {log_dir}/{job_id}/", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "slurm_action", None)
    if action == "render":
        return cmd_render(args)
    if action == "submit":
        return cmd_submit(args)
    raise UserError("bigtrain slurm: expected a verb: render or submit (see 'bigtrain slurm --help')")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _main(argv: Optional[list[str]] = None) -> int:
    """Stand-alone entry point (`python -m bigtrain.slurm render ...`), as `bigtrain slurm` is in the CLI."""
    p = _Parser(prog="bigtrain slurm")
    add_arguments(p.add_subparsers(dest="slurm_verb", metavar="VERB", parser_class=_Parser))
    try:
        ns, extra = p.parse_known_args(argv)
        stray = [a for a in extra if a.startswith("-")]
        if stray:
            raise UserError(f"unrecognized arguments: {' '.join(stray)}")
        if hasattr(ns, "args"):
            ns.args = list(ns.args) + extra
        return run(ns)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(_main())
