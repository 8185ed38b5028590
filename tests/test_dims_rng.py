"""The tp x dp layout (validation messages, rank layout, groups) and the named RNG streams that
make dropout correct under tensor parallelism.

Pure checks run in this process; ParallelDims.build and seed_rng run on gloo ranks
(tests/multiproc.py); the layout user error goes through the `bigtrain train` CLI; a tp=2
training run with dropout goes through Trainer on 2 ranks. RNG comparisons are bitwise
(torch.equal): they are the same generator states and the same ops, or they must differ.
"""

import contextlib
import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bigtrain.config import ModelConfig, load_config
from bigtrain.errors import UserError
from bigtrain.parallel.dims import (ParallelDims, check_layout, check_model, check_sequence, padded_vocab,
                                    vocab_padding_note)
from bigtrain.parallel.random import TP, TP_SEED_OFFSET, RNGTracker, get_default_rng_state, seed_rng, set_default_rng_state
from bigtrain.trainer import Trainer
from tests.conftest import ROOT, TINY, assert_user_error, run_cli
from tests.multiproc import run_ranks

CONFIG = str(ROOT / "configs" / "debug.yaml")


# --------------------------------------------------------------------------------------------
# Layout validation: pure functions


@pytest.mark.parametrize("args, message", [
    ((4, 2, 3), "tp(2) * dp(3) = 6 != world_size(4)"),
    ((4, 3), "world_size(4) is not divisible by tp(3)"),
    ((1, 2), "world_size(1) is not divisible by tp(2)"),
    ((1, 2, 1), "tp(2) * dp(1) = 2 != world_size(1)"),
    ((8, 2, 2), "tp(2) * dp(2) = 4 != world_size(8)"),
    ((0, 1), "world_size(0) must be >= 1"),
    ((4, 0), "tp(0) must be >= 1"),
    ((4, 2, -1), "dp(-1) must be >= 0"),
])
def test_check_layout_errors(args, message):
    with pytest.raises(UserError) as e:
        check_layout(*args)
    assert message in str(e.value), str(e.value)


def test_check_layout_valid():
    assert check_layout(1, 1) == (1, 1)
    assert check_layout(4, 2) == (2, 2)  # dp inferred
    assert check_layout(8, 2, 4) == (2, 4)
    assert check_layout(4, 4, 1) == (4, 1)
    assert check_layout(6, 1) == (1, 6)


@pytest.mark.parametrize("kwargs, tp, message", [
    (dict(dim=64, n_heads=4, n_kv_heads=2), 4, "n_kv_heads(2) is not divisible by tp(4)"),
    (dict(dim=96, n_heads=6, n_kv_heads=6), 4, "n_heads(6) is not divisible by tp(4)"),
    (dict(dim=96, n_heads=6), 4, "n_heads(6) is not divisible by tp(4)"),  # n_kv_heads 0 = n_heads
    (dict(dim=64, n_heads=4, n_kv_heads=1), 2, "n_kv_heads(1) is not divisible by tp(2)"),
    (dict(dim=64, n_heads=4, ffn_hidden=33), 2, "ffn_hidden(33) is not divisible by tp(2)"),
    (dict(dim=128, n_heads=8, n_kv_heads=8), 16, "n_heads(8) is not divisible by tp(16)"),
])
def test_check_model_errors(kwargs, tp, message):
    with pytest.raises(UserError) as e:
        check_model(ModelConfig(**kwargs), tp)
    assert str(e.value) == message


def test_check_model_valid_and_vocab_not_checked():
    check_model(ModelConfig(dim=64, n_heads=4, n_kv_heads=2, vocab_size=7), 2)  # the vocab is padded instead
    check_model(ModelConfig(dim=64, n_heads=4, n_kv_heads=4, ffn_hidden=100), 4)
    check_model(ModelConfig(dim=64, n_heads=3, n_kv_heads=1, ffn_hidden=33), 1)  # tp=1 splits nothing


def test_check_sequence():
    check_sequence(32, 4)
    with pytest.raises(UserError) as e:
        check_sequence(30, 4)
    assert str(e.value) == "seq_len(30) is not divisible by tp(4), which sequence parallelism splits it over"


def test_padded_vocab_and_note():
    assert [padded_vocab(v, tp) for v, tp in [(7, 2), (8, 2), (10, 4), (9, 4), (400, 1), (4096, 3), (1, 8)]] == \
        [8, 8, 12, 12, 400, 4098, 8]
    assert vocab_padding_note(7, 2) == "vocab_size(7) padded to 8 for tp(2)"
    assert vocab_padding_note(10, 4) == "vocab_size(10) padded to 12 for tp(4)"
    assert vocab_padding_note(8, 2) is None
    assert vocab_padding_note(400, 1) is None


def test_parallel_dims_rank_arithmetic():
    # rank = dp_rank * tp + tp_rank: TP groups adjacent, DP groups strided
    d = ParallelDims(world_size=8, rank=5, tp=2, dp=4)
    assert (d.tp_rank, d.dp_rank) == (1, 2)
    d = ParallelDims(world_size=8, rank=6, tp=4, dp=2)
    assert (d.tp_rank, d.dp_rank) == (2, 1)
    s = ParallelDims.single()
    assert (s.world_size, s.rank, s.tp, s.dp, s.tp_rank, s.dp_rank) == (1, 0, 1, 1, 0, 0)
    assert s.tp_group is None and s.dp_group is None


def test_build_rejects_before_any_collective():
    # no process group exists in this process: these must fail on validation alone
    with pytest.raises(UserError, match=r"sequence_parallel needs tp > 1"):
        ParallelDims.build(1, 0, tp=1, sequence_parallel=True)
    with pytest.raises(UserError, match=r"world_size\(4\) is not divisible by tp\(3\)"):
        ParallelDims.build(4, 0, tp=3)
    single = ParallelDims.build(1, 0, tp=1)
    assert single.tp_group is None and single.dp_group is None


def _build_layouts(rank, world, layouts):
    out = []
    for tp, dp, sp in layouts:  # every rank builds every layout, in the same order (new_group is collective)
        dims = ParallelDims.build(world, rank, tp, dp, sequence_parallel=sp)
        got = {"tp": dims.tp, "dp": dims.dp, "tp_rank": dims.tp_rank, "dp_rank": dims.dp_rank,
               "sp": dims.sequence_parallel}
        for kind in ("tp", "dp"):
            group = getattr(dims, f"{kind}_group")
            if group is None:
                got[f"{kind}_members"] = None
                continue
            assert dist.get_rank(group) == getattr(dims, f"{kind}_rank")
            members = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size(group))]
            dist.all_gather(members, torch.tensor(rank), group=group)  # who is really in the group
            got[f"{kind}_members"] = [int(m) for m in members]
        out.append(got)
    return out


def test_build_layout_on_4_ranks():
    layouts = [(2, 0, False), (2, 2, True), (4, 0, True), (1, 0, False), (1, 4, False)]
    results = run_ranks(_build_layouts, 4, layouts)
    want_tp = {(2, 0): [[0, 1], [0, 1], [2, 3], [2, 3]], (4, 0): [[0, 1, 2, 3]] * 4, (1, 0): [None] * 4}
    want_dp = {(2, 0): [[0, 2], [1, 3], [0, 2], [1, 3]], (4, 0): [None] * 4, (1, 0): [[0, 1, 2, 3]] * 4}
    want_tp[(2, 2)], want_dp[(2, 2)] = want_tp[(2, 0)], want_dp[(2, 0)]
    want_tp[(1, 4)], want_dp[(1, 4)] = want_tp[(1, 0)], want_dp[(1, 0)]
    for i, (tp, dp, sp) in enumerate(layouts):
        for rank, per_layout in enumerate(results):
            got = per_layout[i]
            assert (got["tp"], got["dp"], got["sp"]) == (tp, 4 // tp, sp)
            assert (got["tp_rank"], got["dp_rank"]) == (rank % tp, rank // tp)
            assert got["tp_members"] == want_tp[(tp, dp)][rank], (tp, dp, rank, got)
            assert got["dp_members"] == want_dp[(tp, dp)][rank], (tp, dp, rank, got)


# --------------------------------------------------------------------------------------------
# RNG tracker: one process, CPU


@pytest.fixture
def rng():
    """A tracker with a "tp" stream seeded 1 and the default generator seeded 0; the test
    process's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tracker = RNGTracker()
        tracker.add(TP, 1)
        yield tracker


def _stream(seed, n):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_fork_draws_from_its_stream_and_leaves_default_alone(rng):
    with rng.fork(TP):
        inside = torch.rand(6)
    after = torch.rand(6)
    assert torch.equal(inside, _stream(1, 6))  # the "tp" stream, seeded 1
    assert torch.equal(after, _stream(0, 6))  # the default generator did not advance inside the fork
    assert not torch.equal(inside, after)
    with rng.fork():  # TP is the default name
        again = torch.rand(6)
    assert torch.equal(again, _stream(1, 12)[6:])  # the stream continues across forks
    assert torch.equal(torch.rand(6), _stream(0, 12)[6:])


def test_fork_restores_default_on_error(rng):
    before = torch.get_rng_state()
    with pytest.raises(ZeroDivisionError):
        with rng.fork(TP):
            torch.rand(3)
            1 / 0
    assert torch.equal(torch.get_rng_state(), before)
    with rng.fork(TP):
        assert torch.equal(torch.rand(3), _stream(1, 6)[3:])  # the advance before the error was kept


def test_get_set_states_replays(rng):
    with rng.fork(TP):
        torch.rand(5)
    saved = rng.get_states()
    default = get_default_rng_state()
    with rng.fork(TP):
        first = torch.randn(4, 4)
        first_mask = F.dropout(torch.ones(8, 8), 0.5)
    first_default = torch.rand(3)
    rng.set_states(saved)
    set_default_rng_state(default)
    with rng.fork(TP):
        assert torch.equal(torch.randn(4, 4), first)
        assert torch.equal(F.dropout(torch.ones(8, 8), 0.5), first_mask)
    assert torch.equal(torch.rand(3), first_default)
    # get_states is a copy: advancing the stream does not change what was saved
    with rng.fork(TP):
        torch.rand(100)
    rng.set_states(saved)
    with rng.fork(TP):
        assert torch.equal(torch.randn(4, 4), first)


def test_nested_forks(rng):
    rng.add("other", 7)
    with rng.fork(TP):
        a = torch.rand(2)
        with rng.fork(TP):  # same name: already in the stream, keeps drawing from it
            b = torch.rand(2)
        c = torch.rand(2)
        with rng.fork("other"):
            o = torch.rand(2)
        d = torch.rand(2)
    assert torch.equal(torch.cat([a, b, c, d]), _stream(1, 8))
    assert torch.equal(o, _stream(7, 2))
    assert torch.equal(torch.rand(2), _stream(0, 2))
    # enter / exit, as the forward hooks of parallelize use them
    rng.enter(TP)
    e = torch.rand(2)
    rng.exit()
    assert torch.equal(e, _stream(1, 10)[8:])
    assert torch.equal(torch.rand(2), _stream(0, 4)[2:])


def test_reentering_a_stream_under_another_continues_it(rng):
    rng.add("other", 7)
    with rng.fork(TP):
        a = torch.rand(2)
        with rng.fork("other"):
            with rng.fork(TP):
                b = torch.rand(2)
        c = torch.rand(2)
    assert torch.equal(torch.cat([a, b, c]), _stream(1, 6))


def test_tracker_misuse_raises(rng):
    with rng.fork(TP):
        with pytest.raises(RuntimeError, match=r"get_states\(\) inside fork\('tp'\)"):
            rng.get_states()
        with pytest.raises(RuntimeError, match=r"set_states\(\) inside fork\('tp'\)"):
            rng.set_states({})
    with pytest.raises(KeyError, match=r"never added; streams: \['tp'\]"):
        with rng.fork("nope"):
            pass
    with pytest.raises(ValueError, match="already exists"):
        rng.add(TP, 3)
    assert rng.names == [TP]


def _seeded_draws(rank, world, tp):
    dims = ParallelDims.build(world, rank, tp)
    tracker = seed_rng(42, dims)
    default = torch.rand(8)
    with tracker.fork(TP):
        tp_draw = torch.rand(8)
    after = torch.rand(8)
    return {"default": default, "tp": tp_draw, "after": after, "seed": tracker.get_states()[TP]["seed"],
            "tp_rank": dims.tp_rank}


@pytest.mark.parametrize("world, tp", [(2, 2), (4, 2)], ids=["tp2", "tp2_dp2"])
def test_seed_rng_on_ranks(world, tp):
    results = run_ranks(_seeded_draws, world, tp)
    expected_default = _stream(42, 16)
    for r in results:
        # default generator: seeded alike everywhere, not advanced by the fork
        assert torch.equal(torch.cat([r["default"], r["after"]]), expected_default)
        assert r["seed"] == 42 + TP_SEED_OFFSET + r["tp_rank"]
        assert torch.equal(r["tp"], _stream(r["seed"], 8))
    for a in results:
        for b in results:
            # "tp" stream: the same on ranks with the same tp_rank (DP replicas), distinct across TP ranks
            assert torch.equal(a["tp"], b["tp"]) == (a["tp_rank"] == b["tp_rank"])


# --------------------------------------------------------------------------------------------
# The layout error through the CLI, and an invalid model split on 2 ranks


@pytest.mark.slow
def test_cli_layout_error_single_process(tiny_data, tmp_path):
    # tp=2 with an invalid model split for tp=2 too (n_kv_heads 1): the layout is checked first,
    # before any process group or model exists, so that is the one error reported
    r = run_cli("train", "--config", CONFIG, *TINY, f"data.path={tiny_data}", f"train.out_dir={tmp_path / 'run'}",
                "parallel.tp=2", "model.n_kv_heads=1")
    line = assert_user_error(r, "tp(2)", "world_size(1)")
    assert line == "bigtrain: error: world_size(1) is not divisible by tp(2)"
    assert "n_kv_heads" not in line
    assert not (tmp_path / "run").exists()


def _cli_in_rank(rank, world, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from bigtrain.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)  # uses the process group run_ranks made, tears it down at the end
    return rc, err.getvalue()


@pytest.mark.slow
def test_invalid_model_split_on_2_ranks(tiny_data, tmp_path):
    """The layout is fine (tp=2 on 2 ranks), the model is not: 1 kv head cannot be split."""
    args = ["train", "--config", CONFIG, *TINY, f"data.path={tiny_data}", f"train.out_dir={tmp_path / 'run'}",
            "parallel.tp=2", "model.n_kv_heads=1"]
    (rc0, err0), (rc1, err1) = run_ranks(_cli_in_rank, 2, args)
    assert (rc0, rc1) == (2, 2)
    assert err0 == "bigtrain: error: n_kv_heads(1) is not divisible by tp(2)\n"
    assert err1 == "bigtrain: error (rank 1): n_kv_heads(1) is not divisible by tp(2)\n"


# --------------------------------------------------------------------------------------------
# Dropout under tensor parallelism, through the Trainer


def _train_with_dropout(rank, world, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.manual_seed(0)
    trainer = Trainer(load_config(CONFIG, overrides))
    model = trainer.module
    seen = {"residual": [], "attn": None}

    def residual_hook(module, args, out):  # the embedding's and each block's residual dropout
        if module.training:
            assert (args[0] != 0).all()  # so a zero in the output is a dropped element
            seen["residual"].append(out == 0)

    for m in [model.dropout, *(block.dropout for block in model.layers)]:
        m.register_forward_hook(residual_hook)
    core = model.layers[0].attention.core_attention

    # Registered after parallelize's hooks: the pre-hook runs inside fork("tp"), so the state it
    # reads is the one SDPA's dropout draws from.
    def attn_pre(module, args):
        if module.training and seen["attn"] is None:
            seen["attn"] = {"state": torch.get_rng_state(), "qkv": [a.detach().clone() for a in args]}

    def attn_post(module, args, out):
        if module.training and "out" not in seen["attn"]:
            seen["attn"]["out"] = out.detach().clone()

    core.register_forward_pre_hook(attn_pre)
    core.register_forward_hook(attn_post)
    losses = [r["loss"] for r in trainer.train()]
    default_state = torch.get_rng_state()  # before the replays below set it

    # Replay the first attention of the run with its captured state (it must give the same
    # output: the state decides the mask), then rank 0's q, k, v with this rank's state.
    # core.forward, not core(): the module's hooks would swap the (advanced) "tp" stream in.
    a = seen["attn"]
    theirs = [a["state"], a["qkv"], a["out"]]
    dist.broadcast_object_list(theirs, src=0)
    core.train()
    torch.set_rng_state(a["state"])
    own_replay = core.forward(*a["qkv"])
    torch.set_rng_state(a["state"])
    cross = core.forward(*theirs[1])  # rank 0's inputs under this rank's attention-dropout draw
    core.eval()
    no_dropout = core.forward(*a["qkv"])
    with trainer.rng.fork(TP):
        tp_draw = torch.rand(16)
    return {"losses": losses, "residual": seen["residual"], "own_replay_equal": torch.equal(own_replay, a["out"]),
            "dropout_active": not torch.equal(no_dropout, a["out"]), "cross_equals_rank0": torch.equal(cross, theirs[2]),
            "tp_seed": trainer.rng.get_states()[TP]["seed"], "tp_draw": tp_draw,
            "default_state": default_state}


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_training_with_dropout(sp, tiny_data, tmp_path):
    overrides = [*TINY, f"data.path={tiny_data}", f"train.out_dir={tmp_path / 'run'}", "train.micro_batch_size=2",
                 "train.global_batch_size=4", "train.steps=2", "train.save_every=0", "model.dropout=0.1",
                 "parallel.tp=2", f"parallel.sequence_parallel={str(sp).lower()}"]
    r0, r1 = run_ranks(_train_with_dropout, 2, overrides, timeout=240)
    assert len(r0["losses"]) == 2 and all(math.isfinite(x) for x in r0["losses"])
    assert r0["losses"] == r1["losses"]  # the vocab-parallel loss is all-reduced: bitwise the same

    # attention dropout runs on each rank's own heads under the "tp" stream: different masks
    for r in (r0, r1):
        assert r["own_replay_equal"] and r["dropout_active"]
    assert r0["cross_equals_rank0"] and not r1["cross_equals_rank0"]
    assert r0["tp_seed"] != r1["tp_seed"] and not torch.equal(r0["tp_draw"], r1["tp_draw"])

    # residual dropout: embedding + 2 per block, 2 micro-batches per step, 2 steps
    n_calls = (1 + 2 * 2) * 2 * 2
    assert len(r0["residual"]) == len(r1["residual"]) == n_calls
    local_s = 32 // 2 if sp else 32
    for m0, m1 in zip(r0["residual"], r1["residual"]):
        assert m0.shape == m1.shape == (2, local_s, 64)
        assert 0 < m0.float().mean() < 0.3  # about 10% dropped
        if sp:  # on each rank's own sequence slice, under the "tp" stream: different masks
            assert not torch.equal(m0, m1)
        else:  # on the replicated residual stream, from the default generator: identical masks
            assert torch.equal(m0, m1)
    # the default generator advanced in lockstep on both ranks
    assert torch.equal(r0["default_state"], r1["default_state"])
