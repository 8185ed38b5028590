"""train.async_save: checkpoints written in a background thread while training continues, with
the same bytes, the same atomic rename, and failures reported in one line at the next save."""

import threading

import pytest
import torch

from bigtrain import checkpoint as ckpt
from bigtrain.config import load_config
from bigtrain.errors import ConfigError
from bigtrain.trainer import Trainer
from tests.multiproc import run_ranks
from tests.test_checkpoint_failures import args, enospc_at_step, leftovers, logged, reference, train  # noqa: F401

pytestmark = pytest.mark.slow
ASYNC = "train.async_save=true"


def _tensors(step_dir, rank=0):
    return ckpt.read_rank_file(step_dir, rank)


def test_async_checkpoints_match_and_resume_exactly(tiny_data, tmp_path, reference):  # noqa: F811
    sync_out, async_out = tmp_path / "sync", tmp_path / "async"
    assert train(0, 1, args(tiny_data, async_out, ASYNC)) == list(reference["single"].values())
    train(0, 1, args(tiny_data, sync_out))
    names = [p.name for p in ckpt.list_checkpoints(async_out)]
    assert names == [p.name for p in ckpt.list_checkpoints(sync_out)] == ["step_00000003", "step_00000006",
                                                                         "step_00000008"]
    for name in names:
        a, s = _tensors(ckpt.checkpoint_root(async_out) / name), _tensors(ckpt.checkpoint_root(sync_out) / name)
        for part in ("model",):
            for k in s[part]:
                assert torch.equal(a[part][k], s[part][k]), (name, k)
        for k, entry in s["optim"]["state"].items():
            for key, v in entry.items():
                assert torch.equal(a["optim"]["state"][k][key], v), (name, k, key)  # a snapshot, not live state
    resumed = tmp_path / "resumed"
    step6 = ckpt.checkpoint_root(async_out) / "step_00000006"
    losses = train(0, 1, args(tiny_data, resumed, ASYNC, f"train.resume={step6}"))
    assert losses == [reference["single"][7], reference["single"][8]]


def test_training_continues_while_the_checkpoint_is_written(tiny_data, tmp_path, monkeypatch):
    """The step-3 rank file is written only after step 4 has started: save() did not wait."""
    order, step4 = [], threading.Event()
    real_write, real_step = ckpt.write_file, Trainer.train_step

    def write_file(path, obj):
        if path.parent.name == ".tmp_step_00000003":
            step4.wait(timeout=20)
            order.append("write step 3")
        real_write(path, obj)

    def train_step(self):
        if self.step == 3:
            order.append("step 4")
            step4.set()
        return real_step(self)

    monkeypatch.setattr(ckpt, "write_file", write_file)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    train(0, 1, args(tiny_data, tmp_path / "run", ASYNC))
    assert order == ["step 4", "write step 3"]
    assert "step_00000003" in [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]


def test_background_failure_on_rank1_stops_every_rank(tiny_data, tmp_path, reference):  # noqa: F811
    """dp=2, rank 1's background write of step 6 fails: both ranks end with the same line at the
    next save (the last step's), nothing partial is left, and resume continues bitwise."""
    out = tmp_path / "run"
    extra = ["parallel.dp=2", ASYNC]
    results = run_ranks(train, 2, args(tiny_data, out, *extra), enospc_at_step(6, ranks=(1,)), timeout=240)
    assert results[0] == results[1] and "step 6: rank 1: No space left on device" in results[0], results
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003"] and leftovers(out) == []
    run_ranks(train, 2, args(tiny_data, out, *extra, "train.resume=auto"), timeout=240)
    assert logged(out) == reference["dp2"]


def test_async_save_needs_ddp(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="train.async_save=true needs parallel.engine=ddp"):
        load_config("configs/debug.yaml", args(tiny_data, tmp_path, ASYNC, "parallel.engine=deepspeed"))


def test_async_save_auto_is_on_with_ddp_on_cuda_when_the_copy_fits(monkeypatch):
    """train.async_save=auto: background saves with DDP on CUDA when the host copy of a save (12
    bytes per parameter of this rank) fits the host budget beside offload's; never on the CPU
    or under DeepSpeed; true/false as written (YAML booleans too)."""
    import bigtrain.planner as planner
    from bigtrain import state
    from bigtrain.job import resolve
    from bigtrain.recompute.policy import spans_of

    def decide(*extra, device="cuda", budget=None):
        cfg = load_config("configs/llama-1b.yaml", list(extra))
        job = resolve(cfg, 8, device)
        if budget is not None:  # (the node's RAM share otherwise)
            monkeypatch.setattr(planner, "host_budget", lambda j: budget)
        return state.use_async_save(job, spans_of(cfg.recompute, cfg.model.n_layers)), job

    _, job = decide(budget=0)
    need = 12 * planner.rank_params(job).total
    assert decide(budget=need)[0] is True
    assert decide(budget=need - 1)[0] is False
    assert decide("parallel.engine=deepspeed", budget=10 * need)[0] is False
    assert decide(device="cpu")[0] is False
    assert decide("train.async_save=true", device="cpu")[0] is True
    assert decide("train.async_save=false", budget=10 * need)[0] is False
    assert decide("train.save_every=0", budget=10 * need)[0] is False  # nothing to write in the background
    assert load_config("configs/debug.yaml", ["train.async_save=on"]).train.async_save == "true"
    with pytest.raises(ConfigError, match="train.async_save='sometimes' is not allowed; choose one of auto, true, false"):
        load_config("configs/debug.yaml", ["train.async_save=sometimes"])
