"""The process around training: this rank's place (rank, local rank, world size, from the deepspeed
or torchrun launcher, srun, or a single process), the accelerator choice before DeepSpeed is
imported, the process group and its timeouts, and an orderly exit (DeepSpeed's shared-memory
buffers released, exit handlers run, no C++ teardown)."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

from bigtrain.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def setup_accelerator() -> bool:
    """Choose DeepSpeed's accelerator before deepspeed is imported. Returns True when on CPU."""
    on_cpu = not has_cuda()
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # bigtrain works offline: never let transformers or datasets reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return on_cpu


def free_port() -> int:
    """A free TCP port for a rendezvous, below Linux's ephemeral range (32768-60999): a port the
    kernel handed out would be free now but could go to any outgoing connection (gloo opens many)
    before rank 0 listens on it."""
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> DistEnv:
    """Rank, local rank and world size from deepspeed/torchrun (RANK...) or srun (SLURM_*)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    else:
        rank, world, local = 0, 1, 0
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
    if world == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise UserError("MASTER_ADDR and MASTER_PORT must be set for a multi-rank run (the deepspeed/torchrun launchers and bigtrain's SLURM templates set them)")
    return DistEnv(rank, local, world)


def init_distributed(on_cpu: bool, timeout_minutes: float) -> None:
    import deepspeed
    import torch

    from torch.distributed import distributed_c10d

    if not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(minutes=timeout_minutes)
    # DeepSpeed makes its own process groups (data parallel, ...) without a timeout, so they
    # would get torch's default (30 minutes, 10 for NCCL) and a lost peer would hang the job
    # that long: make deepspeed.timeout_minutes the default of every group made from here on.
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", timeout=timeout)
    # Whatever way the process ends, tear the groups down while the interpreter is still whole:
    # gloo's worker threads can hold async work whose destruction at interpreter exit aborts
    # the process (SIGABRT, "terminate called without an active exception").
    import atexit

    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def leave(code: int):
    """End a rank's process after an orderly close without the interpreter's teardown.

    With the process group already destroyed and every file of ours closed, C++ destructors run
    at interpreter exit still aborted a rank now and then ("terminate called without an active
    exception", exit -6: about one test-suite run in three, in different tests, after the work had
    ended correctly). Nothing of ours needs them: run the Python exit handlers (atexit: ours and a
    caller's), flush, and go without the C++ teardown.
    """
    import atexit
    import logging

    release_shm_buffers()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def release_shm_buffers() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffers in /dev/shm (RAM): DeepSpeed leaves
    them behind (tens of MB per rank and run), and they add up until the machine runs out of memory."""
    import glob

    env = os.environ
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_*_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env.get('LOCAL_RANK', '0')}"
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except OSError:
            pass
