"""Checkpoint saves sealed by every rank in parallel, sizes-only manifests, and resume on one rank.

Two real gloo ranks (this file run as a script, not through the deepspeed launcher) build a tiny
GPT-2 under ZeRO-2, take one step and save four times: two verified saves into ckpts/ (steps 1
and 2), one with verify=False into sizes/, and one in the old scheme (hash_mode="rank0") into
old/. Each rank records every file `checkpoint._seal_file` was called on, in that process: the
evidence of which rank fsynced and hashed what. The tests then check those records, the manifests
against hashlib, and damage copies of the checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SAVES = (("ckpts", 1, True, "split"), ("ckpts", 2, True, "split"), ("sizes", 1, False, "split"), ("old", 1, True, "rank0"))


def worker(out: Path) -> int:
    """One rank: build the engine, record `_seal_file` calls, run SAVES, write rank{R}.json."""
    from bigtrain import checkpoint
    from bigtrain.process import init_distributed, release_shm_buffers, setup_accelerator

    init_distributed(setup_accelerator(), timeout_minutes=5)
    import torch.distributed as dist

    from bigtrain.bench.checkpoint import build_engine, tiny_tokenizer

    rank = dist.get_rank()
    engine, config = build_engine(layers=1, hidden=32, vocab=128)
    calls: list[list] = []
    real = checkpoint._seal_file

    def recording(path, verify):
        calls[-1].append(path.relative_to(current).as_posix())
        return real(path, verify)

    checkpoint._seal_file = recording
    for sub, step, verify, mode in SAVES:
        current = out / sub / (checkpoint.TMP_PREFIX + checkpoint.tag_for(step))
        calls.append([])
        state = {"step": step, "world_size": 2, "zero_stage": 2, "precision": "fp32"}
        checkpoint.save(engine, out / sub, state, rank, config, tiny_tokenizer(), 10, verify, hash_mode=mode)
    (out / f"rank{rank}.json").write_text(json.dumps(calls))
    dist.barrier()
    release_shm_buffers()
    dist.destroy_process_group()
    return 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[list[list[str]]]]:
    """The saves' directory and, per rank, per save, the files that rank sealed."""
    from bigtrain.process import free_port

    out = tmp_path_factory.mktemp("ckpt-scale")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_SIZE="2", CROSS_RANK="0", CROSS_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-3000:]}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def files_on_disk(ckpt: Path) -> dict[str, bytes]:
    return {p.relative_to(ckpt).as_posix(): p.read_bytes() for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"}


def manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "manifest.json").read_text())


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_each_rank_seals_a_disjoint_share_and_together_every_file(saved):
    out, calls = saved
    for i, (sub, step, _, mode) in enumerate(SAVES):
        ckpt = out / sub / f"step_{step:08d}"
        on_disk = set(files_on_disk(ckpt))
        assert set(manifest(ckpt)["files"]) == on_disk
        share0, share1 = calls[0][i], calls[1][i]
        assert len(share0) == len(set(share0)) and len(share1) == len(set(share1)), "a file sealed twice by one rank"
        if mode == "rank0":  # the old scheme the benchmark compares against: rank 0 alone
            assert set(share0) == on_disk and share1 == []
            continue
        assert share0 and share1, f"{sub}/step {step}: a rank sealed nothing: {share0} / {share1}"
        assert not set(share0) & set(share1), "a file sealed by both ranks"
        assert set(share0) | set(share1) == on_disk
        # The two ZeRO optimizer shards, the largest files with the model states, go to different ranks.
        shards = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
        assert sum(s in share0 for s in shards) == 1 and sum(s in share1 for s in shards) == 1


def test_manifest_digests_are_the_files_sha256(saved):
    out, _ = saved
    for sub, step, verify, _ in SAVES:
        if not verify:
            continue
        ckpt = out / sub / f"step_{step:08d}"
        m = manifest(ckpt)
        assert m["checksums"] is True
        expected = {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in files_on_disk(ckpt).items()}
        assert m["files"] == expected


def test_a_flipped_byte_at_the_same_size_is_caught(saved, tmp_path):
    from bigtrain.checkpoint import check_checkpoint

    out, calls = saved
    src = out / "ckpts" / "step_00000001"
    for rel in ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt", "hf/config.json"):
        ckpt = tmp_path / rel.replace("/", "_")
        shutil.copytree(src, ckpt)
        assert check_checkpoint(ckpt) is None
        size = (ckpt / rel).stat().st_size
        flip_byte(ckpt / rel)
        assert (ckpt / rel).stat().st_size == size
        assert check_checkpoint(ckpt) == f"{rel} does not match its SHA-256 in the manifest"
        assert check_checkpoint(ckpt, threads=1) == f"{rel} does not match its SHA-256 in the manifest"


def test_two_damaged_files_the_first_in_manifest_order_is_named(saved, tmp_path):
    from bigtrain.checkpoint import check_checkpoint

    out, _ = saved
    ckpt = tmp_path / "c"
    shutil.copytree(out / "ckpts" / "step_00000001", ckpt)
    flip_byte(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    flip_byte(ckpt / "rng_rank1.pt")
    for threads in (1, 4):
        assert check_checkpoint(ckpt, threads=threads) == "rng_rank1.pt does not match its SHA-256 in the manifest"


def test_verify_false_writes_sizes_only_and_sizes_are_still_checked(saved, tmp_path):
    from bigtrain.checkpoint import check_checkpoint, has_checksums

    out, _ = saved
    src = out / "sizes" / "step_00000001"
    m = manifest(src)
    assert m["checksums"] is False
    assert m["files"] == {rel: {"size": len(data), "sha256": None} for rel, data in files_on_disk(src).items()}
    assert not has_checksums(src) and has_checksums(out / "ckpts" / "step_00000001")
    ckpt = tmp_path / "c"
    shutil.copytree(src, ckpt)
    assert check_checkpoint(ckpt) is None
    flip_byte(ckpt / "mp_rank_00_model_states.pt")
    assert check_checkpoint(ckpt) is None  # no digest to compare: a size check cannot see this
    rel = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = (ckpt / rel).stat().st_size
    with open(ckpt / rel, "ab") as f:
        f.write(b"\0")
    assert check_checkpoint(ckpt) == f"{rel} has {size + 1} bytes, the manifest says {size}"
    os.truncate(ckpt / rel, size - 10)
    assert check_checkpoint(ckpt) == f"{rel} has {size - 10} bytes, the manifest says {size}"


def test_choose_resume_skips_a_damaged_newest_checkpoint_and_says_why(saved, tmp_path):
    from bigtrain.checkpoint import choose_resume
    from bigtrain.errors import UserError

    out, _ = saved
    run = tmp_path / "run"
    shutil.copytree(out / "ckpts", run / "checkpoints")
    root = run / "checkpoints"
    assert choose_resume("auto", root, print) == root / "step_00000002"
    flip_byte(root / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    log: list[str] = []
    assert choose_resume("auto", root, log.append) == root / "step_00000001"
    assert log == [f"checkpoint {root / 'step_00000002'} is damaged: zero_pp_rank_0_mp_rank_00_optim_states.pt "
                   "does not match its SHA-256 in the manifest; skipping it"]
    assert choose_resume(str(run), root, log.append) == root / "step_00000001"  # an output_dir
    assert choose_resume(None, root, log.append) is None
    with pytest.raises(UserError, match="step_00000002 is damaged: zero_pp_rank_0_mp_rank_00_optim_states.pt does not match"):
        choose_resume(str(root / "step_00000002"), root, log.append)
    (root / "step_00000001" / "rng_rank1.pt").unlink()
    log.clear()
    assert choose_resume("auto", root, log.append) is None
    assert len(log) == 2 and "rng_rank1.pt is missing" in log[1]


def test_choose_resume_says_a_sizes_only_checkpoint_was_not_hashed(saved):
    from bigtrain.checkpoint import choose_resume

    out, _ = saved
    log: list[str] = []
    assert choose_resume("auto", out / "sizes", log.append) == out / "sizes" / "step_00000001"
    assert log == [f"checkpoint {out / 'sizes' / 'step_00000001'} was saved without checksums (verify=False): "
                   "only its files' presence and sizes were checked"]


def test_split_deals_every_file_once_and_balances_bytes():
    from bigtrain.checkpoint import _split

    # A 7B-like ZeRO-2 layout on 8 ranks: 14 GB of model states on rank 0, 8 optimizer shards of 10.5 GB, small files.
    files = [("mp_rank_00_model_states.pt", 14_000)] + [(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", 10_500) for r in range(8)]
    files += [(f"rng_rank{r}.pt", 1) for r in range(8)] + [("hf/config.json", 1), ("trainer_state.json", 1)]
    shares = _split(files, 8)
    assert shares == _split(list(reversed(files)), 8)  # the same shares from any order of the listing
    assert sorted(f for s in shares for f in s) == sorted(f for f, _ in files)
    sizes = dict(files)
    loads = [sum(sizes[f] for f in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes.values())
    # 9 large files on 8 ranks: one rank takes two shards; the old scheme's rank 0 read all 98,010.
    assert max(loads) == 21_000
    assert _split(files, 1) == [[f for f, _ in sorted(files, key=lambda f: (-f[1], f[0]))]]


def test_bad_manifests_are_named_not_crashed_on(tmp_path):
    from bigtrain.checkpoint import check_checkpoint

    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / "a").write_bytes(b"x")
    for files, why in (([], "its files are not a mapping"), ({"a": {"sha256": None}}, "the entry of a"),
                       ({"a": {"size": 1, "sha256": 5}}, "the entry of a"), ({"a": 3}, "the entry of a")):
        (ckpt / "manifest.json").write_text(json.dumps({"files": files}))
        assert check_checkpoint(ckpt) == f"manifest.json is malformed ({why})"
    (ckpt / "manifest.json").write_text(json.dumps({"files": {"a": {"size": 1, "sha256": None}}}))
    assert check_checkpoint(ckpt) is None
    (ckpt / "manifest.json").write_text('{"files": {"a": {"size": 1,')  # cut short mid-write
    assert check_checkpoint(ckpt).startswith("manifest.json is unreadable (")
    (ckpt / "manifest.json").write_text(json.dumps({"written_at": 1.0}))
    assert check_checkpoint(ckpt) == "manifest.json is unreadable ('files')"
    (ckpt / "manifest.json").unlink()
    assert check_checkpoint(ckpt) == "no manifest.json (the save did not finish)"


def test_resume_passes_over_checkpoints_with_a_missing_or_corrupt_manifest(saved, tmp_path):
    """--resume auto: the newest checkpoint has no manifest, the next a corrupt one; both are named
    with the reason and the oldest, whole one is chosen. Named explicitly, a bad one is an error."""
    from bigtrain.checkpoint import choose_resume
    from bigtrain.errors import UserError

    out, _ = saved
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        shutil.copytree(out / "ckpts" / "step_00000001", root / f"step_{step:08d}")
    (root / "step_00000003" / "manifest.json").unlink()
    (root / "step_00000002" / "manifest.json").write_bytes(b"\x00" * 64)
    log: list[str] = []
    assert choose_resume("auto", root, log.append) == root / "step_00000001"
    assert log[0] == f"checkpoint {root / 'step_00000003'} is damaged: no manifest.json (the save did not finish); skipping it"
    assert log[1].startswith(f"checkpoint {root / 'step_00000002'} is damaged: manifest.json is unreadable (") and len(log) == 2
    with pytest.raises(UserError, match="step_00000002 is damaged: manifest.json is unreadable"):
        choose_resume(str(root / "step_00000002"), root, log.append)


def test_bench_checkpoint_runs_every_mode_and_writes_json(cli, tmp_path):
    out = tmp_path / "bench.json"
    r = cli(["bench", "checkpoint", "--layers", "1", "--hidden", "64", "--vocab", "128", "--rounds", "1", "--warmup", "0",
             "--dir", str(tmp_path), "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [rec["mode"] for rec in res["records"]] == ["split", "noverify", "rank0"]
    assert set(res["ratios"]) == {"save_old_over_split", "seal_old_over_split", "save_split_over_noverify", "seal_split_over_noverify"}
    assert [s["share_files"] > 0 for s in res["split_shares"]] == [True, True]
    assert sum(s["share_bytes"] for s in res["split_shares"]) == res["checkpoint_bytes"] == sum(res["files"].values())
    assert "old / per-rank hashing" in r.stdout
    assert list(tmp_path.iterdir()) == [out]  # the checkpoints' directory is gone


def test_bench_checkpoint_async_measures_blocking_and_total_side_by_side(cli, tmp_path):
    """--async: synchronous and background saves alternate; each background save's blocking part
    is at most its total, and the snapshot buffers hold about the checkpoint (both ranks' shares:
    every tensor storage the two ranks' files hold, copied once)."""
    out = tmp_path / "bench.json"
    r = cli(["bench", "checkpoint", "--async", "--layers", "1", "--hidden", "64", "--vocab", "128", "--rounds", "1", "--warmup", "0",
             "--dir", str(tmp_path), "--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [rec["mode"] for rec in res["records"]] == ["split", "async"]
    background = res["records"][1]
    assert 0 < background["blocking_s"] <= background["save_s"]
    buffers = sum(rank["buffer_bytes"] for rank in res["snapshot"])
    tensors = sum(size for rel, size in res["files"].items() if rel.endswith("_states.pt"))
    assert 0.5 * tensors < buffers <= tensors, (buffers, tensors)
    assert set(res["ratios"]) == {"blocking_async_over_sync", "total_async_over_sync"} and "training stands still" in r.stdout
    assert list(tmp_path.iterdir()) == [out]


def test_pruning_keeps_the_best_checkpoint(tmp_path):
    """keep_last=2 deletes older checkpoints, but never the one best.json points at."""
    from bigtrain.checkpoint import prune, write_best

    for step in range(1, 7):
        (tmp_path / f"step_{step:08d}").mkdir()
    write_best(tmp_path, {"tag": "step_00000002", "metric": "eval_loss", "value": 1.0, "step": 2})
    prune(tmp_path, keep_last=2, upto=6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000002", "step_00000005", "step_00000006"]
    write_best(tmp_path, {"tag": "step_00000006", "metric": "eval_loss", "value": 0.5, "step": 6})
    (tmp_path / "step_00000007").mkdir()
    prune(tmp_path, keep_last=2, upto=7)  # the former best is now an old checkpoint like any other
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000006", "step_00000007"]


if __name__ == "__main__":
    from bigtrain.process import leave

    leave(worker(Path(sys.argv[1])))

