"""Process-group setup from torchrun or SLURM variables, with a single-device fallback.

Nothing here is stored in module globals: `init_process_groups` returns the `ParallelDims` that
the rest of the program passes around.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from bigtrain.config import Config
from bigtrain.errors import UserError
from bigtrain.job import Job
from bigtrain.parallel.dims import ParallelDims


def env_ranks() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's variables, or from srun's when a job runs one
    task per GPU without torchrun (then MASTER_ADDR/MASTER_PORT must be exported by the script)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        world, rank = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_PROCID"])
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
        return world, rank, int(os.environ.get("SLURM_LOCALID", 0))
    return 1, 0, 0


def select_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible "
                        f"(launch at most that many processes per node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def process_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) of this process: from an existing default process group
    (a test, a notebook), else from the launcher's variables. No collective."""
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    return env_ranks()


def init_process_groups(job: Job, rank: int, device: torch.device) -> ParallelDims:
    """The default process group (unless the caller made one) and the job's tp/dp groups.
    Collective; call it only after resolve() has validated the layout, so a bad layout fails
    on every rank alike before any rank waits for another."""
    if job.world == 1 and job.cfg.parallel.engine != "deepspeed":
        return ParallelDims.single()
    backend = job.cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if job.world == 1:  # DeepSpeed wants a process group even for one process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return ParallelDims.build(job.world, rank, job.tp, job.dp, sequence_parallel=job.sp)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
