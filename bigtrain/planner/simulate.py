"""The planner's cross-check: a real training step under fake tensors (no memory allocated),
measured by MemTracker. Used by tests/test_plan.py and bench/plan.py."""

from __future__ import annotations

import torch

from bigtrain.errors import UserError
from bigtrain.job import Job
from bigtrain.model import build_model
from bigtrain.parallel.dims import ParallelDims
from bigtrain.recompute.policy import Span


def peak_tracker():
    """A MemTracker that keeps only what the planner reads: the step's peak by category.

    MemTracker also updates every module's own peak after every op, a loop over all the modules
    seen so far: quadratic in the model's depth (a 32-block 7B dry run spent 120 of its 130 s
    there). This one skips that loop (its private `_update_peak_stats`, torch 2.13; a torch
    without it gets the plain, slower MemTracker): the totals are the same."""
    from torch.distributed._tools import mem_tracker

    base = mem_tracker.MemTracker
    if not hasattr(base, "_update_peak_stats") or not hasattr(mem_tracker, "_TOTAL_KEY"):
        return base()

    class PeakTracker(base):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mem_tracker._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mem_tracker._TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)  # category -> bytes

    return PeakTracker()


def fake_peak(job: Job, spans: list[Span] | None = None, steps: int = 1) -> dict:
    """Peak memory (bytes by MemTracker category, and "Total") of `steps` real training steps of
    the single-process model (tp=1, plain AdamW) under FakeTensorMode: the real ops and
    allocations, no real memory, in the job's compute dtype (resolve it for device "cpu")."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bigtrain.optim import build_optimizer
    from bigtrain.parallel.loss import step_loss
    from bigtrain.recompute.policy import apply_recompute

    cfg, t = job.cfg, job.cfg.train
    with FakeTensorMode():
        model = build_model(cfg.model, device="cpu")
        apply_recompute(model, ParallelDims.single(), cfg.recompute, spans=spans)
        optimizer = build_optimizer(model, cfg.optim)
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1))
        tracker = peak_tracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(steps):
                loss = step_loss(model, tokens, job, ParallelDims.single())  # the trainer's (Trainer.loss_on)
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        snap = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(snap.values()))
    return {str(getattr(k, "value", k)): v for k, v in per_device.items()}


def simulated_peak(job: Job, spans: list[Span] | None = None, steps: int = 2) -> dict:
    """Rank 0's peak (bytes by MemTracker category, and "Total") over `steps` real training steps
    of the job's exact layout -- tensor parallelism, sequence parallelism, partition, the engine
    -- under FakeTensorMode with torch's fake process-group backend: every op, collective and
    allocation of the real code runs for one rank, no memory is used and no other process
    exists. A dry run of `bigtrain train` (the CPU code path: resolve the job for "cpu").

    Initialises the default process group (backend "fake", world job.world) when there is none,
    and destroys it afterwards."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from bigtrain.engines import build_engine
    from bigtrain.parallel.parallelize import parallelize
    from bigtrain.parallel.random import seed_rng
    from bigtrain.recompute.policy import apply_recompute

    cfg, t = job.cfg, job.cfg.train
    if job.cfg.parallel.engine != "ddp":
        raise UserError("bigtrain plan --simulate runs parallel.engine=ddp only: DeepSpeed cannot run on fake "
                        "tensors (its engine moves the module with .to() and its step reads the gradient norm's "
                        "value); its ZeRO figures stay the analytical ones")
    if dist.is_initialized():
        raise RuntimeError("simulated_peak needs to own the (fake) default process group")
    import unittest.mock

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    import bigtrain.parallel.random as rng_module

    def real_copy(state, _copy=rng_module._copy):  # RNG states stay real tensors (a fake one cannot be set)
        with unset_fake_temporarily():
            return _copy(state)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=job.world)
    try:
        with unittest.mock.patch.object(rng_module, "_copy", real_copy):
            dims = ParallelDims.create(job.world, 0, job.tp, job.dp, sequence_parallel=job.sp)
            rng = seed_rng(t.seed, dims)
            device = torch.device("cpu")
            with FakeTensorMode(allow_non_fake_inputs=True):  # the RNG states a replay restores are real
                # built on the (fake) CPU directly: the values do not matter, and init_weights'
                # to_empty cannot swap fake parameters
                model = parallelize(build_model(cfg.model, device=device), dims, rng)
                apply_recompute(model, dims, cfg.recompute, spans, rng)
                engine = build_engine(model, dims, job, device)
                tracker = peak_tracker()
                tracker.track_external(model, engine.optimizer)
                with tracker:
                    _fake_steps(job, model, engine, dims, steps, tracker)
                snap = tracker.get_tracker_snapshot("peak")
    finally:
        dist.destroy_process_group()
    per_device = next(iter(snap.values()))
    return {str(getattr(k, "value", k)): v for k, v in per_device.items()}


def _fake_steps(job: Job, model, engine, dims: ParallelDims, steps: int, tracker) -> None:
    """`steps` training steps of rank 0 as the trainer runs them, on fake tensors."""
    from bigtrain.parallel.loss import step_loss
    from bigtrain.parallel.parallelize import clip_grad_norm, grad_norm, sync_sequence_parallel_grads

    cfg, t = job.cfg, job.cfg.train
    tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1))
    for _ in range(steps):
        # Two micro-batches stand for all of them: from the second on, every one meets the same
        # memory (gradients exist); 1024 would take 512 times longer.
        micro = min(job.accum, 2)
        for i in range(micro):
            tracker.reset_mod_stats()
            with engine.accumulate(last=i == micro - 1):
                loss = step_loss(engine.model, tokens, job, dims)  # the trainer's (Trainer.loss_on)
                engine.backward(loss)
                del loss
        # TorchEngine.step, less reading the norm back (a fake tensor has no value)
        sync_sequence_parallel_grads(model, dims)
        if cfg.optim.grad_clip > 0:
            clip_grad_norm(model, cfg.optim.grad_clip, dims)
        else:
            grad_norm(model, dims)
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)


def simulate_configured(job: Job) -> dict:
    """`bigtrain plan --simulate`: the configured policy's planned peak next to rank 0's simulated
    one (simulated_peak, 2 steps), for the job resolved on the CPU; seconds and the process's
    peak RSS so far."""
    import resource
    import time

    from bigtrain.planner.memory import estimate
    from bigtrain.planner.search import choose_policy, mixed_name
    from bigtrain.config import parse_bytes
    from bigtrain.recompute.policy import spans_of

    r = job.cfg.recompute
    if r.granularity == "auto":
        spans = choose_policy(job, parse_bytes(r.memory_budget)).spans
    else:
        spans = spans_of(r, job.cfg.model.n_layers)
    est = estimate(job, spans, mixed_name(spans))
    t0 = time.perf_counter()
    sim = simulated_peak(job, spans, steps=2)
    seconds = time.perf_counter() - t0
    return {"device": "cpu", "policy": est.policy, "planned_peak_bytes": est.peak, "planned_phase": est.peak_phase,
            "simulated_peak_bytes": sim["Total"], "simulated_by_category": sim,
            "error": est.peak / sim["Total"] - 1, "seconds": seconds,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
