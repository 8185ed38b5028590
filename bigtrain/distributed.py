"""Process-group setup from torchrun or SLURM variables, with a single-device fallback.

Nothing here is stored in module globals: `init_process_groups` returns the `ParallelDims` that
the rest of the program passes around.
"""

from __future__ import annotations

import datetime
import os
import re
import time

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
    timeout = datetime.timedelta(seconds=job.cfg.parallel.timeout_s)
    backend = job.cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # Rank and size come from process_env (torchrun's or srun's variables); the rendezvous
        # from MASTER_ADDR/MASTER_PORT -- or, for one process (DeepSpeed wants a process group
        # even then), a free local port. Nothing is written to os.environ.
        init = f"tcp://127.0.0.1:{_free_port()}" if job.world == 1 else "env://"
        dist.init_process_group(backend=backend, init_method=init, rank=rank, world_size=job.world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return ParallelDims.create(job.world, rank, job.tp, job.dp, sequence_parallel=job.sp, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TIMEOUT_RE = re.compile(r"timed out|timeout", re.IGNORECASE)
_TIMEOUT_KEY = "bigtrain/timed_out/{}"


def is_collective_timeout(e: BaseException) -> bool:
    """Whether `e` is a collective (or its store) giving up on the other ranks: gloo raises a
    RuntimeError "Timed out waiting Nms for recv operation"; DDP re-raises it from backward.
    (NCCL's watchdog aborts the process instead: TORCH_NCCL_ASYNC_ERROR_HANDLING.)"""
    return isinstance(e, (RuntimeError, getattr(dist, "DistError", RuntimeError))) and bool(_TIMEOUT_RE.search(str(e)))


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API; the diagnosis is best effort
        return None


def stalled_ranks(timeout_s: float, grace_s: float | None = None) -> tuple[list[int] | None, list[int]]:
    """After a collective timed out on this rank: (ranks that did not time out too, ranks that did).

    Every rank whose collective times out records it in the rendezvous store (a TCP server apart
    from the collectives' transport, which may be wedged), then waits up to `grace_s` for the
    others to do the same. Ranks that were waiting time out within about the spread of their
    arrival; the ranks that never report did not reach the collective: they stopped answering.
    (None, []) when there is no store to ask."""
    store = _default_store()
    if store is None or not dist.is_initialized():
        return None, []
    rank, world = dist.get_rank(), dist.get_world_size()
    grace = min(timeout_s, 10.0) if grace_s is None else grace_s
    try:
        store.set(_TIMEOUT_KEY.format(rank), "1")
        deadline = time.monotonic() + grace
        while True:
            reported = [r for r in range(world) if store.check([_TIMEOUT_KEY.format(r)])]
            if len(reported) == world or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store itself is gone (its host died): no diagnosis
        return None, []
    return sorted(set(range(world)) - set(reported)), reported


def timeout_error(e: BaseException, timeout_s: float) -> UserError | None:
    """The one-line error for a timed-out collective `e` (None when `e` is something else), naming
    the ranks that stopped answering. Call it on every rank that caught the exception."""
    if not is_collective_timeout(e):
        return None
    if not dist.is_initialized() and not isinstance(e, getattr(dist, "DistError", ())):
        return None  # one process: not a collective
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    where = f"rank {rank}: a collective timed out after {timeout_s:g} s (parallel.timeout_s)"
    silent, reported = stalled_ranks(timeout_s)
    if silent is None:
        why = f"could not ask the other ranks which one stopped answering ({' '.join(str(e).split())[:200]})"
    elif silent:
        why = (f"rank(s) {', '.join(map(str, silent))} stopped answering (never reached it: hung, deadlocked or "
               f"far slower; see their logs), while rank(s) {', '.join(map(str, reported))} waited")
    else:
        why = ("every rank timed out waiting: they are in different collectives (a code path that differs "
               "between ranks?) or the network between them stalled")
    return UserError(f"{where}; {why}; raise parallel.timeout_s if a step legitimately takes longer")


_PEER_GONE_RE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|remote worker crash",
                           re.IGNORECASE)


def is_peer_gone(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank's process went away (gloo)."""
    return isinstance(e, RuntimeError) and bool(_PEER_GONE_RE.search(str(e)))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
