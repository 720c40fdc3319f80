"""`bigtrain report RUN_DIR [-o FILE.html]`: one self-contained page about a run, and a summary.

The page holds everything a run directory tells, read from its plain files (nothing is loaded
into a model): config.yaml and ds_config.json, metrics.jsonl (loss and evaluation curves,
throughput and MFU, memory, gradient norm and learning rate, the skipped steps with their
sample ids), checkpoints/ (step, size, which is best), eval_report.txt (the per-class report of
labeled tasks) and profile/. The charts are inline SVG drawn by matplotlib and the page has no
script and no external file, so it opens anywhere, offline, and can be mailed or attached.

It works on a finished run, a running one (the run lock names a live process) and one that
crashed (a lock left behind, a last metrics line cut short): the page says which.
"""

from __future__ import annotations

import html
import io
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bigtrain.errors import UserError

# Charts: (title, y label, [(metrics key, legend label)], log scale)
CHARTS = [
    ("Loss", "cross-entropy (nats/token)", [("loss", "train loss"), ("eval_loss", "validation loss")], False),
    ("Throughput", "tokens/s", [("tokens_per_s", "tokens/s")], False),
    ("Model FLOPs utilisation", "MFU (%)", [("mfu", "MFU")], False),
    ("Memory", "GB (peak)", [("mem_allocated_gb", "allocated"), ("mem_reserved_gb", "reserved"), ("mem_rss_gb", "resident (RSS)")], False),
    ("Gradient norm", "global L2 norm", [("grad_norm", "grad norm")], True),
    ("Learning rate", "lr", [("lr", "lr")], False),
    ("Evaluation", "score", [("eval_accuracy", "accuracy"), ("eval_f1", "F1"), ("eval_exact_match", "exact match")], False),
    ("Waiting for data", "fraction of wall time", [("data_wait", "data wait")], False),
    ("Router (mixture of experts)", "aux loss; busiest expert / mean", [("aux_loss", "load-balancing loss"),
                                                                        ("expert_load_max", "busiest expert / mean")], False),
]


@dataclass
class Run:
    path: Path
    config_text: str = ""
    config: dict = field(default_factory=dict)
    ds_config_text: str = ""
    records: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)  # dicts: name, step, bytes, best
    eval_report: str = ""
    status: str = ""
    profile: list = field(default_factory=list)


def load_run(path: Path) -> Run:
    from bigtrain.metrics import read_metrics

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"bigtrain report: {path} is not a directory")
    if not (path / "config.yaml").is_file() and not (path / "metrics.jsonl").is_file():
        raise UserError(f"bigtrain report: {path} holds no bigtrain run (no config.yaml or metrics.jsonl)")
    run = Run(path)
    if (path / "config.yaml").is_file():
        import yaml

        run.config_text = (path / "config.yaml").read_text(errors="replace")
        try:
            run.config = yaml.safe_load(run.config_text) or {}
        except yaml.YAMLError:
            run.config = {}
    if (path / "ds_config.json").is_file():
        run.ds_config_text = (path / "ds_config.json").read_text(errors="replace")
    if (path / "metrics.jsonl").is_file():
        run.records = read_metrics(path / "metrics.jsonl")
    if (path / "eval_report.txt").is_file():
        run.eval_report = (path / "eval_report.txt").read_text(errors="replace")
    run.checkpoints = _checkpoints(path / "checkpoints")
    run.profile = sorted(p.name for p in (path / "profile").glob("*")) if (path / "profile").is_dir() else []
    run.status = run_status(path, run)
    return run


def _checkpoints(root: Path) -> list[dict]:
    from bigtrain.checkpoint import list_checkpoints, read_best

    if not root.is_dir():
        return []
    best = read_best(root) or {}
    out = []
    for ckpt in list_checkpoints(root):
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        try:
            step = json.loads((ckpt / "trainer_state.json").read_text()).get("step")
        except (OSError, ValueError):
            step = None
        out.append({"name": ckpt.name, "step": step, "bytes": size, "best": best.get("tag") == ckpt.name})
    return out


def run_status(path: Path, run: Run) -> str:
    """finished, running (pid ... on host), or stopped: how, as far as the files tell."""
    from bigtrain.runlock import lock_owner

    held = lock_owner(path)
    if held is not None:
        owner, alive = held
        if alive:
            return f"running (pid {owner.get('pid')} on {owner.get('host')})"
        return (f"crashed or killed: its process (pid {owner.get('pid')} on {owner.get('host')}) is gone and left its lock; "
                "continue it with --resume auto")
    max_steps = (run.config.get("train") or {}).get("max_steps")
    last = max((r.get("step", 0) for r in run.records), default=0)
    if (path / "model").is_dir() and (max_steps is None or last >= max_steps):
        return "finished"
    return f"stopped at step {last} of {max_steps} (preempted, diverged or stopped; see its log); continue it with --resume auto"


# --------------------------------------------------------------------------- numbers


def series(records: list, key: str) -> list[tuple]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r]


def skipped(records: list) -> list[dict]:
    return [r for r in records if r.get("skipped_step")]


def summary(run: Run) -> list[tuple[str, str]]:
    """(label, value) rows: the page's first table and the terminal's summary."""
    cfg = run.config
    model = (cfg.get("model") or {})
    rows = [("run", str(run.path.resolve())), ("status", run.status)]
    if cfg:
        rows.append(("task / model", f"{cfg.get('task')} / {model.get('from_pretrained') or model.get('preset')}"))
    loss = series(run.records, "loss")
    if loss:
        max_steps = (cfg.get("train") or {}).get("max_steps")
        rows.append(("last step", f"{loss[-1][0]}" + (f" of {max_steps}" if max_steps else "")))
        rows.append(("train loss", f"{loss[0][1]:.4f} (step {loss[0][0]}) -> {loss[-1][1]:.4f} (step {loss[-1][0]})"))
    evals = series(run.records, "eval_loss")
    if evals:
        best = min(evals, key=lambda p: p[1])
        rows.append(("validation loss", f"last {evals[-1][1]:.4f} (step {evals[-1][0]}), best {best[1]:.4f} (step {best[0]})"))
    tokens = series(run.records, "tokens")
    if tokens:
        rows.append(("tokens seen", f"{tokens[-1][1]:,}"))
    for key, label, fmt in (("tokens_per_s", "tokens/s (median)", "{:,.0f}"), ("mfu", "MFU (median)", "{:.1%}"),
                            ("step_time", "step time (median)", "{:.3f} s"), ("data_wait", "waiting for data (median)", "{:.1%}")):
        values = [v for _, v in series(run.records, key)]
        if values:
            rows.append((label, fmt.format(statistics.median(values))))
    for key, label in (("mem_allocated_gb", "peak memory allocated"), ("mem_reserved_gb", "peak memory reserved"), ("mem_rss_gb", "peak resident memory")):
        values = [v for _, v in series(run.records, key)]
        if values:
            rows.append((label, f"{max(values):.2f} GB"))
    fallback = next((r for r in run.records if r.get("attn_fallback")), None)
    if fallback:
        rows.append(("attention", f"{fallback['attn_implementation']} (fallback: {fallback['attn_fallback']})"))
    rows.append(("skipped steps", str(len(skipped(run.records)))))
    if run.checkpoints:
        rows.append(("checkpoints", ", ".join(c["name"] + (" (best)" if c["best"] else "") for c in run.checkpoints)))
    return rows


# --------------------------------------------------------------------------- the page


def _svg(title: str, ylabel: str, lines: list, log: bool, marks: list) -> Optional[str]:
    """One chart as inline SVG (None when none of its series has a point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(points for _, points in lines):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    for label, points in lines:
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-" if len(points) < 30 else "-", ms=3, lw=1.4, label=label)
    for step in marks:
        ax.axvline(step, color="tab:red", alpha=0.35, lw=1)
    if log and all(v > 0 for _, pts in lines for _, v in pts):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len([1 for _, p in lines if p]) > 1 or marks:
        ax.legend(fontsize=8, title="red lines: skipped steps" if marks else None, title_fontsize=7)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def charts(run: Run) -> list[str]:
    marks = [r["step"] for r in skipped(run.records)]
    out = []
    for title, ylabel, keys, log in CHARTS:
        lines = []
        for key, label in keys:
            points = series(run.records, key)
            if key == "mfu":
                points = [(s, 100 * v) for s, v in points]
            lines.append((label, points))
        svg = _svg(title, ylabel, lines, log, marks if title == "Loss" else [])
        if svg:
            out.append(svg)
    return out + downstream_charts(run)


def downstream_charts(run: Run) -> list[str]:
    """One chart per lm-evaluation-harness task (eval.downstream): each of its metrics over the steps."""
    tasks: dict[str, list] = {}
    for key in dict.fromkeys(k for r in run.records for k in r if k.startswith("downstream/") and k.count("/") == 2):
        _, task, metric = key.split("/")
        tasks.setdefault(task, []).append((metric, series(run.records, key)))
    out = []
    for task, lines in tasks.items():
        perplexity = any("perplexity" in m for m, _ in lines)
        svg = _svg(f"Downstream: {task}", "score", lines, perplexity, [])
        if svg:
            out.append(svg)
    return out


def _table(rows: list, header: Optional[list] = None) -> str:
    esc = html.escape
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1340px; color: #1d2330; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #dde; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #dde; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f3f4f8; } .charts { display: flex; flex-wrap: wrap; gap: 8px; } .charts svg { width: 640px; height: auto; }
pre { background: #f6f7fa; padding: 10px; overflow-x: auto; font-size: 12px; } .status { font-weight: 600; }
"""


def checkpoint_rows(run: Run) -> list[tuple]:
    """Per checkpoint: name, step, size, how long training stood still for it (the save, or its
    snapshot and any wait for the save before it), how it was written, best or not."""
    saved = {x["checkpoint"]: x for x in run.records if "checkpoint_blocking_s" in x}
    total = {x["checkpoint"]: x["checkpoint_total_s"] for x in run.records if "checkpoint_total_s" in x}
    rows = []
    for c in run.checkpoints:
        x = saved.get(c["name"], {})
        still = f"{x['checkpoint_blocking_s'] + x.get('checkpoint_wait_s', 0):.2f} s" if x else ""
        written = f"in the background, {total[c['name']]:.2f} s" if c["name"] in total else ("synchronously" if x else "")
        rows.append((c["name"], c["step"], f"{c['bytes'] / 1e6:,.1f} MB", still, written, "best" if c["best"] else ""))
    return rows


def render_html(run: Run) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>bigtrain report: {esc(run.path.name)}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>bigtrain run {esc(run.path.name)}</h1><p class='status'>{esc(run.status)}</p>",
             _table(summary(run)),
             "<h2>Curves</h2><div class='charts'>" + "".join(charts(run)) + "</div>"]
    skips = skipped(run.records)
    parts.append("<h2>Skipped steps</h2>" + (_table([(r["step"], _why(r), r.get("sample_ids", "")) for r in skips], ["step", "why", "sample ids"])
                                              if skips else "<p>none</p>"))
    if run.checkpoints:
        parts.append("<h2>Checkpoints</h2>" + _table(checkpoint_rows(run), ["checkpoint", "step", "size", "training stood still", "written", ""]))
    if run.eval_report:
        parts.append(f"<h2>Evaluation report (best checkpoint)</h2><pre>{esc(run.eval_report)}</pre>")
    if run.profile:
        parts.append("<h2>Profiler traces</h2><p>in profile/ (open the .json files in https://ui.perfetto.dev):</p>"
                     + _table([(n,) for n in run.profile]))
    parts.append(f"<h2>Configuration</h2><pre>{esc(run.config_text)}</pre>")
    if run.ds_config_text:
        parts.append(f"<details><summary>DeepSpeed config</summary><pre>{esc(run.ds_config_text)}</pre></details>")
    parts.append(f"<p><small>written by bigtrain report at {time.strftime('%Y-%m-%d %H:%M:%S')}</small></p></body></html>")
    return "\n".join(parts)


def _why(record: dict) -> str:
    if record.get("reason"):
        return record["reason"]
    return "non-finite loss" if record.get("nonfinite_loss") else "non-finite gradients"


def write_report(run_dir: str, out: Optional[str]) -> Path:
    run = load_run(Path(run_dir))
    target = Path(out) if out else run.path / "report.html"
    if target.is_dir():
        raise UserError(f"bigtrain report: -o {target} is a directory; give a file name such as report.html")
    if not target.parent.is_dir():
        raise UserError(f"bigtrain report: -o {target}: directory {target.parent} does not exist")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(render_html(run), encoding="utf-8")
    os.replace(tmp, target)
    width = max(len(label) for label, _ in summary(run))
    for label, value in summary(run):
        print(f"{label:<{width}}  {value}")
    print(f"report: {target}")
    return target
