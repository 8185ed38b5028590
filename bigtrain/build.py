"""From a config to the pieces a training run needs, in the order the data flows.

    c = build(cfg)      # c.job, c.dims, c.module, c.engine, c.train_loader, ...

Each step takes what the previous ones made, so the order is the code's, not a comment's:
the layout is validated (resolve) before any collective, tensor parallelism sees plain modules,
recompute wraps the tensor-parallel blocks (whose forward then holds the collectives and RNG
forks a replay repeats), weights are materialised (and a weights-only checkpoint loaded) before
the data-parallel engine copies or partitions them, and the loaders follow the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bigtrain import state
from bigtrain.config import Config
from bigtrain.data.dataset import BatchLoader, TokenDataset
from bigtrain.data.mixture import MixtureLoader, data_meta, open_sources
from bigtrain.distributed import init_process_groups, process_env, select_device
from bigtrain.engines import Engine, build_engine
from bigtrain.errors import check_writable_dir
from bigtrain.job import Job, resolve
from bigtrain.model import build_model, init_weights
from bigtrain.parallel.dims import ParallelDims
from bigtrain.parallel.parallelize import parallelize
from bigtrain.parallel.random import RNGTracker, seed_rng
from bigtrain.planner.memory import offload_reservation
from bigtrain.planner.search import choose_recompute
from bigtrain.recompute import apply_recompute
from bigtrain.recompute.policy import Span


@dataclass
class Components:
    job: Job
    dims: ParallelDims
    device: torch.device
    rng: RNGTracker  # the default generators are seeded too; this holds the per-TP-rank "tp" stream
    module: nn.Module  # the tensor-parallel, recompute-wrapped model (what checkpoints name)
    engine: Engine  # data parallelism and the optimizer; engine.model is what forward calls
    train_loader: BatchLoader | MixtureLoader  # MixtureLoader with data.mix
    val_data: TokenDataset  # data.path's validation split (with data.mix: its first source's)
    val_sets: dict[str, TokenDataset]  # with data.mix, each source's validation split by name ({} otherwise)
    recompute_spans: list[Span] | None  # what recompute.granularity=auto chose (None otherwise)
    recompute_note: str  # auto's table for the log ("" otherwise)
    resume_from: Path | None  # a full checkpoint to restore (state.restore) before training
    async_save: bool  # train.async_save resolved (auto: see state.use_async_save)


def build(cfg: Config) -> Components:
    world, rank, local_rank = process_env()
    device = select_device(cfg, local_rank)
    job = resolve(cfg, world, device.type, data_meta(cfg.data))  # every check, no collective yet
    check_writable_dir(job.cfg.train.out_dir, "train.out_dir")
    dims = init_process_groups(job, rank, device)
    source = state.find_resume(job.cfg)
    rng = seed_rng(job.cfg.train.seed, dims)  # dropout streams; weights have per-parameter seeds
    spans, note = choose_recompute(job)
    model = parallelize(build_model(job.cfg.model), dims, rng)  # on the meta device: no memory yet
    apply_recompute(model, dims, job.cfg.recompute, spans, rng)
    init_weights(model, job.cfg.train.seed, device=device)
    if device.type == "cuda":  # pin the offload pool now: pinning in step 1 would stall every stream
        model.block_runner.saved.reserve(device, *offload_reservation(job, model.block_runner.spans))
    if source is not None and state.is_weights_only(source):
        state.load_weights_only(model, job, source, announce=dims.rank == 0)
        source = None  # training starts at step 0 with a fresh optimizer
    engine = build_engine(model, dims, job, device)
    t = job.cfg.train
    if job.cfg.data.mix:
        sources = open_sources(job.cfg.data)
        train_loader = MixtureLoader(sources, t.seq_len, t.micro_batch_size, seed=t.seed,
                                     rank=dims.dp_rank, world=dims.dp)
        val_sets = {s.name: s.val for s in sources}
        val_data = sources[0].val
    else:
        train_loader = BatchLoader(TokenDataset(job.cfg.data.path, "train"), t.seq_len, t.micro_batch_size,
                                   seed=t.seed, rank=dims.dp_rank, world=dims.dp)
        val_data, val_sets = TokenDataset(job.cfg.data.path, "val"), {}
    return Components(job, dims, device, rng, model, engine, train_loader, val_data, val_sets, spans, note, source,
                      state.use_async_save(job, model.block_runner.spans))
