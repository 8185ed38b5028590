"""Whole-model training at every layout against the single-process run (gloo, CPU, fp32).

Tolerance: the layouts sum the same products in a different order (row-parallel partial sums,
DP gradient all-reduce, vocab-parallel softmax), so results agree to fp32 rounding, not bitwise:
losses to 1e-5 relative, parameters after 3 AdamW steps to 1e-4 relative / 1e-5 absolute (Adam
divides by sqrt(v), which magnifies rounding in near-zero gradient entries, hence the atol).
"""

import os

import pytest
import torch

from bigtrain import checkpoint as ckpt
from bigtrain.config import load_config
from bigtrain.trainer import Trainer
from tests.conftest import TINY
from tests.multiproc import run_ranks

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-5
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-5


def base(data, out, *extra):
    # mb 2, global 8: accumulation 4 steps at dp=1, 2 at dp=2. tie_embeddings covers the shared
    # vocab-parallel weight; vocab 400 is padded when tp does not divide it (it does for 2: see layers tests).
    return [*TINY, f"data.path={data}", f"train.out_dir={out}", "train.micro_batch_size=2",
            "train.global_batch_size=8", "train.steps=3", "train.save_every=0", "model.dropout=0.0",
            "model.tie_embeddings=true", *extra]


def train(rank, world, overrides):
    # what torchrun would export (DeepSpeed reads LOCAL_RANK itself)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.manual_seed(0)
    records = Trainer(load_config("configs/debug.yaml", overrides)).train()
    return [r["loss"] for r in records]


def final_params(out):
    path = ckpt.latest_checkpoint(out)
    return ckpt.full_model_state(path, ckpt.read_manifest(path))


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    losses = train(0, 1, base(tiny_data, out))
    return losses, final_params(out)


def assert_matches(reference, losses, params):
    ref_losses, ref_params = reference
    assert len(losses) == len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=0)
    assert ref_params.keys() == params.keys()
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=name)


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "dp2": (2, ["parallel.dp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.dp=2"]),
    "tp2_dp2_sp": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true"]),
    # the output layer and loss 12 positions at a time (of seq 32: a ragged last chunk)
    "single_loss_chunks": (1, ["train.loss_chunk=12"]),
    "dp2_loss_chunks": (2, ["parallel.dp=2", "train.loss_chunk=12"]),
    "tp2_sp_loss_chunks": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.loss_chunk=12"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, tiny_data, tmp_path, reference):
    world, extra = LAYOUTS[layout]
    out = tmp_path / "run"
    losses = run_ranks(train, world, base(tiny_data, out, *extra), timeout=240)
    assert all(r == losses[0] for r in losses)  # every rank reports the same (reduced) loss
    assert_matches(reference, losses[0], final_params(out))


BF16_LOSS_RTOL = 1e-4  # bf16 matmuls of other shapes (tp shards) round differently; measured 6e-6


def test_bf16_autocast_at_tp2_with_and_without_sequence_parallelism(tiny_data, tmp_path):
    """train.dtype=bf16 (the GPU default) at tp=2, with and without SP, against one process.
    With SP the norm output is cast to bf16 before the all-gather and kept as this rank's bf16
    slice (re-gathered in backward); at tp=2 every sum has two operands, so SP and plain TP give
    bitwise the same losses. (Before the cast-before-gather change SP under autocast failed in
    the output layer's backward: a bf16 gradient times its fp32 gathered input.)"""
    bf16 = ["train.dtype=bf16"]
    single = run_ranks(train, 1, base(tiny_data, tmp_path / "single", *bf16), timeout=240)[0]
    tp2 = run_ranks(train, 2, base(tiny_data, tmp_path / "tp2", *bf16, "parallel.tp=2"), timeout=240)[0]
    sp = run_ranks(train, 2, base(tiny_data, tmp_path / "sp", *bf16, "parallel.tp=2",
                                  "parallel.sequence_parallel=true"), timeout=240)[0]
    assert sp == tp2
    torch.testing.assert_close(torch.tensor(tp2), torch.tensor(single), rtol=BF16_LOSS_RTOL, atol=0)


def _resume(rank, world, overrides):
    return train(rank, world, overrides)


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_resharded_resume(layout, tiny_data, tmp_path, reference):
    """Save at a 2-rank layout after 3 of 5 steps, resume in one process: steps 4-5 match."""
    world, extra = LAYOUTS[layout]
    five = ["train.steps=5", "train.save_every=3"]
    ref_out = tmp_path / "ref"
    ref = train(0, 1, base(tiny_data, ref_out, *five))
    out = tmp_path / "run"
    run_ranks(train, world, base(tiny_data, out, *extra, *five), timeout=240)
    step3 = ckpt.checkpoint_root(out) / "step_00000003"
    resumed_out = tmp_path / "resumed"
    losses = train(0, 1, base(tiny_data, resumed_out, *five, f"train.resume={step3}"))
    assert len(losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[3:]), rtol=LOSS_RTOL, atol=0)
    # and the other direction: a single-process checkpoint resumes at tp=2
    if layout == "tp2":
        back = run_ranks(train, 2, base(tiny_data, tmp_path / "back", *five, *extra,
                                        f"train.resume={ckpt.checkpoint_root(ref_out) / 'step_00000003'}"), timeout=240)
        torch.testing.assert_close(torch.tensor(back[0]), torch.tensor(ref[3:]), rtol=LOSS_RTOL, atol=0)


DEEPSPEED = {
    "zero1_dp2": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=1"]),
    "zero2_dp2": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    "zero1_tp2_dp2": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=1"]),
    "zero1_tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=deepspeed",
                         "parallel.zero_stage=1"]),
    "zero3_dp2": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=3"]),
    "zero2_offload_dp2": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=2",
                              "parallel.offload_optimizer=true"]),
    # buckets of 4096 elements: the tiny model's gradients take many reductions and all-gathers
    "zero2_dp2_small_buckets": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=2",
                                    "parallel.zero_bucket_size=4096"]),
    # ZeRO-3's hooks around the output layer (its logits come out of DeepSpeed's own autograd
    # function) with the chunks' in-place softmax, and the recomputed final norm of pointwise
    "zero3_dp2_loss_chunks_pointwise": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=3",
                                            "train.loss_chunk=12", "recompute.granularity=selective",
                                            "recompute.modules=pointwise"]),
}


def train_zero3_partitioned(rank, world, overrides):
    """train() with ZeRO-3 partitioning even the tiny test model's parameters (DeepSpeed keeps
    parameters under 100k elements whole by default, which would test nothing)."""
    return train(rank, world, [*overrides, "parallel.zero3_persistence_threshold=0"])


@pytest.mark.parametrize("layout", list(DEEPSPEED))
def test_deepspeed_matches_single_process(layout, tiny_data, tmp_path, reference):
    world, extra = DEEPSPEED[layout]
    out = tmp_path / "run"
    fn = train_zero3_partitioned if "zero3" in layout else train
    losses = run_ranks(fn, world, base(tiny_data, out, *extra), timeout=240)
    assert_matches(reference, losses[0], final_params(out))


def _zero3_save_gathers(rank, world, overrides):
    """The sizes of the parameter lists DeepSpeed gathers while a ZeRO-3 run saves."""
    import deepspeed

    from bigtrain import state

    real, sizes, saving = deepspeed.zero.GatheredParameters, [], [False]

    def spy(params, *args, **kwargs):
        if saving[0]:
            sizes.append(len(list(params)) if not isinstance(params, torch.nn.Parameter) else 1)
        return real(params, *args, **kwargs)

    real_save = state.save_state

    def save(*args, **kwargs):
        saving[0] = True
        try:
            return real_save(*args, **kwargs)
        finally:
            saving[0] = False

    deepspeed.zero.GatheredParameters, state.save_state = spy, save
    try:
        train_zero3_partitioned(rank, world, overrides)
    finally:
        deepspeed.zero.GatheredParameters, state.save_state = real, real_save
    return sizes


def test_zero3_save_gathers_one_parameter_at_a_time(tiny_data, tmp_path):
    world, extra = DEEPSPEED["zero3_dp2"]
    sizes = run_ranks(_zero3_save_gathers, world, base(tiny_data, tmp_path / "run", *extra, "train.save_every=3"),
                      timeout=240)
    n_params = 20  # the tiny model's parameters, tied embedding once
    assert sizes[0] == sizes[1] == [1] * n_params


@pytest.mark.parametrize("layout", ["zero2_dp2", "zero3_dp2"])
def test_deepspeed_save_and_resume(layout, tiny_data, tmp_path):
    """A ZeRO-2/3 run saved at step 3 and resumed (same layout) continues exactly like the uninterrupted run."""
    world, extra = DEEPSPEED[layout]
    fn = train_zero3_partitioned if "zero3" in layout else train
    five = ["train.steps=5", "train.save_every=3"]
    full = run_ranks(fn, world, base(tiny_data, tmp_path / "full", *extra, *five), timeout=240)[0]
    step3 = ckpt.checkpoint_root(tmp_path / "full") / "step_00000003"
    assert (step3 / "deepspeed").is_dir()
    resumed = run_ranks(fn, world, base(tiny_data, tmp_path / "resumed", *extra, *five,
                                        f"train.resume={step3}"), timeout=240)[0]
    assert resumed == full[3:]  # same layout, same engine: bitwise


def _resume_under_ddp(rank, world, overrides, saved):
    """A DDP run resumed from a DeepSpeed checkpoint: its weights right after the restore must
    be the checkpoint's bitwise (at tp=1 each rank holds them whole); then it trains on."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.manual_seed(0)
    trainer = Trainer(load_config("configs/debug.yaml", overrides))
    restored = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    assert restored.keys() <= saved.keys()
    for name, value in restored.items():
        assert torch.equal(value, saved[name]), name
    return [r["loss"] for r in trainer.train()]


@pytest.mark.parametrize("layout, to", [("zero2_dp2", (1, [])), ("zero1_tp2_dp2", (2, ["parallel.dp=2"]))],
                         ids=["zero2_dp2-to-ddp_dp1", "zero1_tp2_dp2-to-ddp_tp1_dp2"])
def test_deepspeed_checkpoint_resumes_under_ddp(layout, to, tiny_data, tmp_path):
    """ZeRO-1/2 -> DDP at another layout: DeepSpeed's fp32 masters and Adam moments, joined from
    its partitions and cut for the new layout. Restored weights bitwise; the continuation matches
    the uninterrupted DeepSpeed run to the layouts' tolerance (another reduction order)."""
    world, extra = DEEPSPEED[layout]
    five = ["train.steps=5", "train.save_every=3"]
    full = run_ranks(train, world, base(tiny_data, tmp_path / "full", *extra, *five), timeout=240)[0]
    step3 = ckpt.checkpoint_root(tmp_path / "full") / "step_00000003"
    saved = ckpt.full_model_state(step3, ckpt.read_manifest(step3))
    new_world, new_extra = to
    resumed = run_ranks(_resume_under_ddp, new_world, base(tiny_data, tmp_path / "resumed", *new_extra, *five,
                                                           f"train.resume={step3}"), saved, timeout=240)[0]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=LOSS_RTOL, atol=0)
    got, want = final_params(tmp_path / "resumed"), final_params(tmp_path / "full")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=name)


def _resume_error(rank, world, overrides):
    from bigtrain.errors import UserError

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        Trainer(load_config("configs/debug.yaml", overrides))
    except UserError as e:
        return str(e)
    return None


def test_zero3_checkpoint_under_ddp_is_refused_in_one_line(tiny_data, tmp_path):
    world, extra = DEEPSPEED["zero3_dp2"]
    run_ranks(train_zero3_partitioned, world, base(tiny_data, tmp_path / "z3", *extra), timeout=240)
    step = ckpt.latest_checkpoint(tmp_path / "z3")
    errors = run_ranks(_resume_error, 1, base(tiny_data, tmp_path / "ddp", f"train.resume={step}"), timeout=120)
    assert "written by DeepSpeed ZeRO-3" in errors[0] and "parallel.zero_stage=3" in errors[0], errors
    assert "\n" not in errors[0]


def test_tp2_dropout_resume_is_exact(tiny_data, tmp_path):
    """With dropout inside split regions, the per-rank "tp" RNG stream is checkpointed too: a
    tp=2 run resumed at step 3 continues bitwise like the uninterrupted one."""
    five = ["train.steps=5", "train.save_every=3", "model.dropout=0.1", "parallel.tp=2"]
    full = run_ranks(train, 2, base(tiny_data, tmp_path / "full", *five), timeout=240)[0]
    step3 = ckpt.checkpoint_root(tmp_path / "full") / "step_00000003"
    resumed = run_ranks(train, 2, base(tiny_data, tmp_path / "resumed", *five, f"train.resume={step3}"),
                        timeout=240)[0]
    assert resumed == full[3:]


def test_one_process_deepspeed_trains_and_saves(tiny_data, tmp_path):
    """parallel.engine=deepspeed in one plain process (no launcher variables): trains and saves;
    bigtrain makes its one-process group on a free port (no MASTER_ADDR/RANK exported)."""
    from tests.conftest import run_cli

    out = tmp_path / "run"
    r = run_cli("train", "--config", "configs/debug.yaml", *base(tiny_data, out, "parallel.engine=deepspeed"),
                check=True)
    assert "resumed" not in r.stdout and [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000003"]
    assert (ckpt.latest_checkpoint(out) / "deepspeed").is_dir()
