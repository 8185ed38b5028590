"""No per-step host syncs: losses and the gradient norm stay device tensors until a logging step,
the SIGTERM agreement runs only at logging steps and every train.stop_check_every steps, and the
logged values are the same floats as when every step is read."""

import os

import pytest
import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.trainer import StopRequest, Trainer
from tests.conftest import TINY
from tests.multiproc import run_ranks

pytestmark = pytest.mark.slow


def args(data, out, *extra):
    return [*TINY, f"data.path={data}", f"train.out_dir={out}", "train.steps=8", "train.save_every=0",
            "model.dropout=0.1", *extra]


def test_stop_is_agreed_only_at_check_steps():
    stop = StopRequest(check_every=5)
    try:
        stop.name = "SIGTERM"
        assert not stop.agreed(torch.device("cpu"), step=3, logging=False)
        assert stop.agreed(torch.device("cpu"), step=3, logging=True)  # logging steps sync anyway
        assert stop.agreed(torch.device("cpu"), step=10, logging=False)
    finally:
        stop.close()


def test_sparse_logging_logs_the_same_floats(tiny_data, tmp_path):
    """log.every=4 logs at step 4 exactly the mean log.every=1 gives of steps 1-4 (same
    summation order), and the same grad_norm and lr."""
    every = {}
    for n in (1, 4):
        records = Trainer(load_config("configs/debug.yaml", args(tiny_data, tmp_path / f"e{n}", f"log.every={n}"))).train()
        every[n] = {r["step"]: r for r in records}
    assert sorted(every[4]) == [4, 8]
    for step in (4, 8):
        window = [every[1][s]["loss"] for s in range(step - 3, step + 1)]
        assert every[4][step]["loss"] == sum(window) / 4
        for key in ("grad_norm", "lr", "val_loss"):
            assert every[4][step].get(key) == every[1][step].get(key), key


def test_train_step_returns_unread_tensors(tiny_data, tmp_path):
    trainer = Trainer(load_config("configs/debug.yaml", args(tiny_data, tmp_path / "run")))
    m = trainer.train_step()
    assert torch.is_tensor(m["loss"]) and torch.is_tensor(m["grad_norm"])


def _count_reduces(rank, world, overrides):
    """Python-level all-reduces (DDP's own bucket reduction is C++ and not counted) by the step
    after which they ran; train_step itself must make none at dp=2."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    events, real_reduce, real_step = [], dist.all_reduce, Trainer.train_step

    def all_reduce(*a, **k):
        events.append("reduce")
        return real_reduce(*a, **k)

    def train_step(self):
        events.append("start")
        m = real_step(self)
        events.append(self.step)
        return m

    dist.all_reduce, Trainer.train_step = all_reduce, train_step
    Trainer(load_config("configs/debug.yaml", overrides)).train()
    per_step, step = {}, None
    for e in events:
        if e == "start":
            step = None  # inside a step until it returns
        elif e == "reduce":
            per_step[step] = per_step.get(step, 0) + 1
        else:
            step = e
    return per_step


def test_no_collective_per_step(tiny_data, tmp_path):
    counts = run_ranks(_count_reduces, 2, args(tiny_data, tmp_path / "run", "parallel.dp=2", "log.every=4",
                                               "train.stop_check_every=4"), timeout=240)
    for per_step in counts:
        assert None not in per_step, per_step  # nothing inside train_step
        assert set(per_step) == {4, 8}, per_step  # the loss window, the stop check, val loss
