"""Each tensor is written once: data-parallel replicas do not repeat the model and optimizer
bytes, and what they no longer write is read back from the file the manifest names."""

import pytest
import torch

from bigtrain import checkpoint as ckpt
from tests.multiproc import run_ranks
from tests.test_distributed_train import LOSS_RTOL, base, train

pytestmark = pytest.mark.slow

# dim 128: the model and optimizer (~6 MB) dwarf the per-rank RNG state (~25 kB a file), as in
# any real model, so "the same bytes" can be checked to 5%.
WIDER = ["model.dim=128"]
LAYOUTS = {"dp1": (1, []), "dp2": (2, ["parallel.dp=2"]), "tp2_dp2": (4, ["parallel.tp=2", "parallel.dp=2"])}


def step_bytes(out, step=3) -> int:
    return sum(p.stat().st_size for p in (ckpt.checkpoint_root(out) / f"step_{step:08d}").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """3 steps (checkpoint at 3) of each layout, and 5-step runs (checkpoints at 3 and 5)."""
    done = {}
    for name, (world, extra) in LAYOUTS.items():
        out = tmp_path_factory.mktemp(name) / "run"
        args = base(tiny_data, out, *WIDER, *extra, "train.steps=5", "train.save_every=3")
        losses = run_ranks(train, world, args, timeout=300)[0] if world > 1 else train(0, 1, args)
        done[name] = (out, losses, args)
    return done


def test_replicas_write_each_tensor_once(runs):
    dp1 = step_bytes(runs["dp1"][0])
    for name in ("dp2", "tp2_dp2"):
        ratio = step_bytes(runs[name][0]) / dp1
        assert abs(ratio - 1) < 0.05, (name, ratio)


def test_manifest_names_the_tensor_files(runs):
    out = runs["tp2_dp2"][0]
    step = ckpt.checkpoint_root(out) / "step_00000003"
    manifest = ckpt.read_manifest(step)
    assert manifest["tensor_files"]["model"] == ["rank00000.pt", "rank00001.pt"]
    for rank in range(4):
        saved = ckpt.read_rank_file(step, rank)
        assert ("model" in saved) == ("optim" in saved) == (rank < 2), rank  # dp rank 0 only
        assert "rng" in saved and "rng_tracker" in saved


@pytest.mark.parametrize("layout", ["dp2", "tp2_dp2"])
def test_same_layout_resume_is_exact(layout, runs, tmp_path):
    """The replicas that wrote no shards read them from the files the manifest names: bitwise."""
    out, full, args = runs[layout]
    world = LAYOUTS[layout][0]
    _resume_and_compare(world, out, full, args, tmp_path)


def test_tp2_dp2_dropout_resume_is_exact(tiny_data, tmp_path):
    """With dropout, each rank's RNG streams come from its own file, the shards from dp rank 0's."""
    args = base(tiny_data, tmp_path / "full", *WIDER, *LAYOUTS["tp2_dp2"][1], "train.steps=5", "train.save_every=3",
                "model.dropout=0.1")
    full = run_ranks(train, 4, args, timeout=300)[0]
    _resume_and_compare(4, tmp_path / "full", full, args, tmp_path)


def _resume_and_compare(world, out, full, args, tmp_path):
    step3 = ckpt.checkpoint_root(out) / "step_00000003"
    resumed_args = [a for a in args if not a.startswith("train.out_dir")] + [
        f"train.out_dir={tmp_path / 'resumed'}", f"train.resume={step3}"]
    resumed = run_ranks(train, world, resumed_args, timeout=300)[0]
    assert resumed == full[3:]


def test_tp2_dp2_reshards_to_one_process(runs, tmp_path):
    out, _, args = runs["tp2_dp2"]
    ref = runs["dp1"][1]
    step3 = ckpt.checkpoint_root(out) / "step_00000003"
    one = [a for a in args if not a.startswith(("train.out_dir", "parallel."))]
    losses = train(0, 1, [*one, f"train.out_dir={tmp_path / 'one'}", f"train.resume={step3}"])
    assert len(losses) == 2  # as test_resharded_resume: fp32 rounding of another layout
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[3:]), rtol=LOSS_RTOL, atol=0)


# --------------------------------------------------------------------------------------------
# Bounded resharding: each rank's slice cut straight from the saved pieces


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("src_tp,src_padded,dst_tp,dst_padded", [
    (2, 10, 1, 10), (1, 10, 2, 10), (4, 12, 2, 10), (2, 10, 4, 12), (4, 12, 3, 12), (3, 12, 4, 12)])
def test_part_of_is_the_slice_of_the_full_tensor(dim, src_tp, src_padded, dst_tp, dst_padded):
    """Vocab-style padding on both sides (10 real rows padded to 12): the part equals the
    destination Shard applied to the rebuilt full tensor, bitwise."""
    from bigtrain.parallel.layers import Shard

    shape = (10, 3) if dim == 0 else (3, 10)
    full = torch.randn(shape)
    pieces = [Shard(dim, src_padded, src_tp, r, shape)(full) for r in range(src_tp)]
    info = {"shard_dim": dim, "full_shape": list(shape)}
    for r in range(dst_tp):
        dst = Shard(dim, dst_padded, dst_tp, r, shape)
        assert torch.equal(ckpt.part_of(pieces, info, dst), dst(full)), r
    assert torch.equal(ckpt.part_of(pieces, info, None), full)  # a replicated destination


def test_reshard_maps_the_files(runs, monkeypatch):
    """Resharding loads the saved TP group's files memory-mapped (reads only what it slices)."""
    from bigtrain.config import load_config
    from bigtrain.trainer import Trainer

    seen = []
    real = ckpt.load_tensors
    monkeypatch.setattr(ckpt, "load_tensors", lambda path, *a, **k: seen.append((path.name, k.get("mmap"))) or real(path, *a, **k))
    out, _, args = runs["tp2_dp2"]
    one = [a for a in args if not a.startswith(("train.out_dir", "parallel."))]
    Trainer(load_config("configs/debug.yaml", [*one, f"train.out_dir={out.parent / 'mapped'}",
                                               f"train.resume={ckpt.checkpoint_root(out) / 'step_00000003'}"]))
    assert ("rank00000.pt", True) in seen and ("rank00001.pt", True) in seen


def test_deepspeed_weights_are_written_once(tiny_data, tmp_path):
    """ZeRO-2 writes the module weights in its own model-states file: bigtrain's rank files hold
    only RNG state and shard metadata, and the manifest points at DeepSpeed's file."""
    out = tmp_path / "run"
    run_ranks(train, 2, base(tiny_data, out, "parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=2",
                             "train.steps=2", "train.save_every=2"), timeout=300)
    step = ckpt.latest_checkpoint(out)
    manifest = ckpt.read_manifest(step)
    assert manifest["tensor_files"]["model"] == ["deepspeed/mp_rank_00_model_states.pt"]
    for rank in range(2):
        assert "model" not in ckpt.read_rank_file(step, rank)
    full = ckpt.full_model_state(step, manifest)
    assert set(full) == set(ckpt.read_rank_file(step, 0)["shards"])
