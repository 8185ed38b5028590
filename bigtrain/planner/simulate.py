"""The planner's cross-check: a real training step under fake tensors (no memory allocated),
measured by MemTracker. Used by tests/test_plan.py and bench/plan.py."""

from __future__ import annotations

import torch

from bigtrain.job import Job
from bigtrain.model import build_model
from bigtrain.parallel.dims import ParallelDims
from bigtrain.recompute.policy import Span


def fake_peak(job: Job, spans: list[Span] | None = None, steps: int = 1) -> dict:
    """Peak memory (bytes by MemTracker category, and "Total") of `steps` real training steps of
    the single-process model (tp=1, plain AdamW) under FakeTensorMode: the real ops and
    allocations, no real memory, in the job's compute dtype (resolve it for device "cpu")."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from bigtrain.optim import build_optimizer
    from bigtrain.recompute.policy import apply_recompute

    cfg, t = job.cfg, job.cfg.train
    with FakeTensorMode():
        model = build_model(cfg.model, device="cpu")
        apply_recompute(model, ParallelDims.single(), cfg.recompute, spans=spans)
        optimizer = build_optimizer(model, cfg.optim)
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1))
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(steps):
                with job.autocast():
                    logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
                del logits
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        snap = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(snap.values()))
    return {str(getattr(k, "value", k)): v for k, v in per_device.items()}


def measured_peak(cfg, steps: int = 3) -> dict:
    """Peak memory (bytes by MemTracker category, and "Total") of `steps` real
    `Trainer.train_step()` calls of the single-process trainer on real CPU tensors: parameters,
    gradients, optimizer states, activations and every temporary, as allocated. `cfg` must
    train on the CPU (train.device=cpu) from a prepared data.path."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from bigtrain.trainer import Trainer

    trainer = Trainer(cfg)
    tracker = MemTracker()
    tracker.track_external(trainer.module, trainer.engine.optimizer)
    loss_on = trainer.loss_on

    def fresh_stats(batch):  # MemTracker's per-module stats allow one forward at a time
        tracker.reset_mod_stats()
        return loss_on(batch)

    trainer.loss_on = fresh_stats
    with tracker:
        for _ in range(steps):
            trainer.train_step()
    snap = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(snap.values()))
    return {str(getattr(k, "value", k)): v for k, v in per_device.items()}
