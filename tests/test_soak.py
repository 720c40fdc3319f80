"""`bigtrain bench soak`: a 300-step run on 2 ranks with a checkpoint (and a prune) every 6 steps
shows no leak of memory, file descriptors, threads or /dev/shm files, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

STEPS, EVERY = 300, 3
# A real leak of ~1 MB per step grows RSS by ~270 MB over the 270 steps after warm-up (more than
# half of a rank's ~500 MiB); even 0.1 MB per step (27 MB) fails this bound. Measured noise here:
# 1-4 MB over a whole run (allocator pools, the metrics file's buffers), so 20 MB does not flake.
RSS_GROWTH_MAX_MB = 20.0
KEYS = ("steps", "nproc", "device", "every", "warmup_steps", "schedule", "wall_s", "loop_s", "steps_per_s", "ranks", "shm_left", "targets", "series")
RANK_KEYS = ("rank", "samples", "first", "warm", "last", "growth", "met")
GROWTH_KEYS = ("rss_pct", "rss_mb", "fds", "threads", "shm", "rss_max_mb", "rss_slope_mb_per_1000_steps", "fds_peak", "threads_peak")


def soak(args: list[str], cache, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, BIGTRAIN_CACHE=str(cache), PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "bigtrain.bench.soak", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tempfile.gettempdir())


@pytest.mark.slow
def test_soak_300_steps_two_ranks_no_growth(cache_dir, corpus, tmp_path):
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    r = soak([f"data.train_files={corpus}", "--steps", str(STEPS), "--json", str(out), "--plot", str(png)], cache_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in KEYS:
        assert key in res, key
    assert res["steps"] == STEPS and res["nproc"] == 2 and res["every"] == EVERY and res["warmup_steps"] == STEPS // 10
    assert res["schedule"]["save_every"] == STEPS // 50 and res["schedule"]["keep_last"] == 2
    assert res["wall_s"] > 0 and res["steps_per_s"] > 0
    # Samples from both ranks, from the start to the last step, every EVERY steps.
    assert len(res["series"]) == len(res["ranks"]) == 2
    for rows in res["series"]:
        assert [s["step"] for s in rows] == list(range(0, STEPS + 1, EVERY))
    for rank in res["ranks"]:
        for key in RANK_KEYS:
            assert key in rank, key
        g = rank["growth"]
        for key in GROWTH_KEYS:
            assert key in g, key
        assert rank["first"]["step"] == 0 and rank["warm"]["step"] == STEPS // 10 and rank["last"]["step"] == STEPS
        assert g["rss_mb"] < RSS_GROWTH_MAX_MB, rank
        assert g["fds"] <= 0 and g["threads"] <= 0 and g["shm"] <= 0, rank
        if res["device"].startswith("cpu"):
            assert rank["last"]["shm"] >= 1  # the run's DeepSpeed all-reduce buffers were seen
    assert res["shm_left"] == [] and res["targets"]["met"]["shm_after_exit"]
    assert "targets:" in r.stdout and "growth after warm-up" in r.stdout
    assert png.stat().st_size > 0


def test_soak_bad_argument_is_one_error_line(cache_dir):
    r = soak(["--steps", "0"], cache_dir, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --steps"), r.stderr
