"""Activation recompute: every mode and combination against the no-recompute run.

Equivalence is bitwise (torch.equal), in fp32 with dropout 0.1: a replay runs the same kernels
on the same inputs with the same RNG states, and autograd's graph is the original one, so
there is no reordering to tolerate. Each layout (tp=1; tp=2; tp=2 with sequence parallelism)
compares its modes with its own no-recompute run. Also checked: the caller's input is
unchanged; RNG streams continue as if nothing had been recomputed; FlopCounterMode sees the
recompute; the accountant's bytes equal the formula's exactly; side effects run once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bigtrain.config import ConfigError, ModelConfig, RecomputeConfig, load_config
from bigtrain.model import build_model, init_weights
from bigtrain.parallel.dims import ParallelDims
from bigtrain.parallel.loss import cross_entropy
from bigtrain.parallel.parallelize import parallelize
from bigtrain.parallel.random import seed_rng
from bigtrain.planner.formula import Shape, block_formula
from bigtrain.recompute import ActivationAccountant, Stash, apply_recompute, is_recomputing
from tests.multiproc import run_ranks

B, S = 2, 32


def model_cfg(dropout=0.1) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=100,
                       max_seq_len=64, dropout=dropout)


def rc(**kw) -> RecomputeConfig:
    r = RecomputeConfig(**{"offload_min_size": "0", **kw})
    r.validate()
    return r


FULL = rc(granularity="full")
MODES_TP1 = {
    "full": FULL,
    "full_uniform2": rc(granularity="full", num_layers=2),
    "full_block2": rc(granularity="full", method="block", num_layers=2),
    "selective_norm": rc(granularity="selective", modules=["norm"]),
    "selective_mlp_act": rc(granularity="selective", modules=["mlp_act"]),
    "selective_core_attn": rc(granularity="selective", modules=["core_attn"]),
    "selective_mlp": rc(granularity="selective", modules=["mlp"]),
    "selective_all": rc(granularity="selective", modules=["norm", "core_attn", "mlp"]),
    "offload": rc(offload=True),
    "full_offload": rc(granularity="full", offload=True),
    "selective_offload": rc(granularity="selective", modules=["norm", "mlp_act"], offload=True),
    "offload_min_size": rc(offload=True, offload_min_size="4KiB"),  # small tensors stay
}
MODES_TP2 = {
    **{k: MODES_TP1[k] for k in ("full", "full_uniform2", "selective_all", "selective_mlp", "full_offload",
                                 "selective_offload")},
    "full_partition": rc(granularity="full", partition=True),
    "full_partition_offload": rc(granularity="full", partition=True, offload=True),
    "block_partition": rc(granularity="full", method="block", num_layers=2, partition=True),
}


def run_model(dims: ParallelDims, r: RecomputeConfig, sp: bool = False, dropout: float = 0.1, account: bool = False,
              autocast: bool = False):
    """One forward/backward of a fresh model under policy r; what must match across policies.
    autocast: the forwards under CPU bf16 autocast (as the trainer's, without the weight cache)."""
    cfg = model_cfg(dropout)
    rng = seed_rng(7, dims)  # default generators and the "tp" stream, identical for every policy
    model = build_model(cfg)
    parallelize(model, dims, rng)
    apply_recompute(model, dims, r, rng=rng)
    init_weights(model, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(3))
    report = None
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False)
    if account:
        with ActivationAccountant(model) as acc, amp:
            logits = model(tokens[:, :-1])
        report = acc.report
    else:
        with amp:
            logits = model(tokens[:, :-1])
    loss = cross_entropy(logits, tokens[:, 1:], dims.tp_group, cfg.vocab_size)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The streams continue exactly as without recompute.
    after = {"default": torch.rand(4), "tp": rng.get_states() if dims.tp > 1 else None}

    # The block stack on its own: the caller's input is not modified, its gradient matches.
    x = torch.randn(B, S // dims.tp if sp else S, cfg.dim, generator=torch.Generator().manual_seed(5),
                    requires_grad=True)
    before = x.detach().clone()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        y = model.block_runner(x, model.positions(S))
    (y * g).sum().backward()
    assert torch.equal(x.detach(), before), "the checkpoint modified its caller's input"
    return {"loss": loss.detach(), "grads": grads, "after": after, "x_grad": x.grad, "report": report}


def assert_same(got: dict, ref: dict, mode: str) -> None:
    assert torch.equal(got["loss"], ref["loss"]), (mode, got["loss"], ref["loss"])
    assert got["grads"].keys() == ref["grads"].keys()
    for name in ref["grads"]:
        assert torch.equal(got["grads"][name], ref["grads"][name]), (mode, name)
    assert torch.equal(got["x_grad"], ref["x_grad"]), mode
    assert torch.equal(got["after"]["default"], ref["after"]["default"]), (mode, "default RNG stream")
    if ref["after"]["tp"] is not None:
        assert torch.equal(got["after"]["tp"]["tp"]["cpu"], ref["after"]["tp"]["tp"]["cpu"]), (mode, "tp RNG stream")


@pytest.mark.parametrize("mode", list(MODES_TP1))
def test_tp1_mode_is_bitwise_equal_to_no_recompute(mode):
    ref = run_model(ParallelDims.single(), rc())
    assert_same(run_model(ParallelDims.single(), MODES_TP1[mode]), ref, mode)


def _tp2_all_modes(rank, world, sp):
    dims = ParallelDims.build(world, rank, tp=2, sequence_parallel=sp)
    ref = run_model(dims, rc(), sp=sp)
    modes = MODES_TP2
    if sp:
        modes = {k: v for k, v in modes.items() if k != "block_partition"} | {
            "selective_norm_mlp_act": rc(granularity="selective", modules=["norm", "mlp_act"])}
    for mode, r in modes.items():
        assert_same(run_model(dims, r, sp=sp), ref, mode)
    # The dropout inside split regions really differs between the TP ranks (else this test
    # could not tell a replay with the wrong stream from one with the right one).
    return ref["grads"]["layers.0.attention.wq.weight"].sum().item()


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_modes_are_bitwise_equal_to_no_recompute(sp):
    run_ranks(_tp2_all_modes, 2, sp, timeout=240)


def _partition_round_trip(rank, world):
    dims = ParallelDims.build(world, rank, tp=world)
    x = torch.arange(15.0).view(1, 3, 5).requires_grad_(True)  # 15 elements: tp does not divide them
    stash = Stash((x,), None, dims)
    assert stash.take()[0] is x  # the forward gets the caller's own tensor
    assert stash._kept[0].numel() == -(-15 // world)  # this rank keeps ceil(n / tp), zero-padded
    (y,) = stash.take()  # the replay: all-gathered, fresh, same requires_grad
    assert torch.equal(y, x.detach()) and y.requires_grad and y is not x
    assert torch.equal(x.detach(), torch.arange(15.0).view(1, 3, 5))
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_partition_pads_uneven_tensors(world):
    assert all(run_ranks(_partition_round_trip, world))


def _partition_prefetch(rank, world, r):
    """The all-gathers started ahead of their recompute, in backward order, under policy r."""
    import importlib

    ck = importlib.import_module("bigtrain.recompute.checkpoint")  # (bigtrain.recompute.checkpoint is also a function)
    started = []
    real = ck.start_all_gather

    def spy(x, group):
        started.append(x.numel())
        return real(x, group)

    ck.start_all_gather = spy
    try:
        dims = ParallelDims.build(world, rank, tp=2)
        got = run_model(dims, r)
    finally:
        ck.start_all_gather = real
    return len(started), got["grads"]["layers.0.attention.wq.weight"].sum().item()


@pytest.mark.slow
def test_partition_all_gathers_are_prefetched():
    """full+partition: each span's recompute starts the previous span's all-gather (2 of 3
    spans per backward, twice: the model and the block stack in run_model), so it overlaps this
    span's recompute and backward; offloaded pieces are left to the offload chain. Gradients
    stay bitwise those of no recompute (test_tp2_modes_are_bitwise_equal_to_no_recompute)."""
    L = model_cfg().n_layers
    for count, _ in run_ranks(_partition_prefetch, 2, rc(granularity="full", partition=True)):
        assert count == 2 * (L - 1)
    for count, _ in run_ranks(_partition_prefetch, 2, rc(granularity="full", partition=True, offload=True)):
        assert count == 0


# ---------------------------------------------------------------------------------------------
# FLOPs: the recompute really happens, and only where asked


def _flops(r: RecomputeConfig) -> int:
    model = init_weights(apply_recompute(build_model(model_cfg(0.0)), ParallelDims.single(), r), seed=0)
    tokens = torch.randint(0, 100, (B, S + 1), generator=torch.Generator().manual_seed(3))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # the CPU flash kernel has no FLOP formula
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return fc.get_total_flops()


def _forward_flops(fn, *args) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn(*args)
    return fc.get_total_flops()


def test_flop_counter_sees_exactly_the_recompute():
    cfg = model_cfg(0.0)
    plain = init_weights(build_model(cfg), seed=0)
    block = plain.layers[0]
    h = torch.randn(B, S, cfg.dim)
    pos = plain.positions(S)
    q = torch.randn(B, S, cfg.n_heads, cfg.head_dim)
    kv = torch.randn(B, S, cfg.kv_heads, cfg.head_dim)
    block_fwd = _forward_flops(block, h, pos)
    mlp_fwd = _forward_flops(block.feed_forward, h)
    core_fwd = _forward_flops(block.attention.core_attention, q, kv, kv)
    down_fwd = _forward_flops(block.feed_forward.w2, torch.randn(B, S, cfg.hidden))
    L = cfg.n_layers
    none = _flops(rc())
    # Full: one more forward of every block, except each span's last down-projection, which
    # torch's early stop skips (nothing kept for backward depends on its output).
    assert _flops(FULL) - none == L * (block_fwd - down_fwd)
    assert _flops(rc(granularity="full", num_layers=3)) - none == L * block_fwd - down_fwd
    assert _flops(rc(granularity="full", method="block", num_layers=1)) - none == block_fwd - down_fwd
    # Selective: exactly the named modules' forward, again without each one's final matmul
    # (the MLP's down-projection; attention's probabilities @ v, whose output only the
    # out-projection saves, outside the module). Norms and the SwiGLU product have no matmul
    # FLOPs to count.
    probs_at_v = 2 * B * cfg.n_heads * S * S * cfg.head_dim
    assert core_fwd == 2 * probs_at_v  # (q k^T and probs v: the whole of the math kernel's FLOPs)
    assert _flops(rc(granularity="selective", modules=["core_attn"])) - none == L * (core_fwd - probs_at_v)
    assert _flops(rc(granularity="selective", modules=["mlp"])) - none == L * (mlp_fwd - down_fwd)
    assert _flops(rc(granularity="selective", modules=["norm", "mlp_act"])) == none


# ---------------------------------------------------------------------------------------------
# The accountant and the formula


def _formula(r, dims=ParallelDims.single(), sp=False, dropout=0.1, elem=4):
    sh = Shape(model_cfg(dropout), B, S, dims.tp, sp, elem=elem, mask_bytes=elem, math_attention=dropout > 0)
    return {label: (d, h) for label, d, h in block_formula(sh, r)}


def _measured(report):
    return {label: (b.device, b.host) for label, b in report.blocks.items()}


ALL_MODES = {"none": rc(), **MODES_TP1}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", list(ALL_MODES))
def test_accountant_equals_formula_tp1(mode, dropout):
    r = ALL_MODES[mode]
    got = run_model(ParallelDims.single(), r, dropout=dropout, account=True)["report"]
    assert _measured(got) == _formula(r, dropout=dropout)


def test_accountant_shows_what_each_mode_keeps():
    one = ParallelDims.single()
    per_block = {m: _measured(run_model(one, ALL_MODES[m], dropout=0.0, account=True)["report"])
                 for m in ("none", "full", "full_offload", "offload", "selective_norm", "selective_mlp")}
    block_input = 4 * B * S * 64  # fp32 (b, s, h)
    assert set(per_block["full"].values()) == {(block_input, 0)}  # only each block's input
    # ... and that on the host, except the last block's, whose backward comes first (kept on the device)
    assert per_block["full_offload"] == {"layer 0": (0, block_input), "layer 1": (0, block_input),
                                         "layer 2": (block_input, 0)}
    none = per_block["none"]["layer 0"][0]
    assert per_block["offload"]["layer 2"] == (none, 0)
    assert per_block["offload"]["layer 0"] == (0, none)  # everything moved, nothing lost
    ffn = 128
    assert none - per_block["selective_norm"]["layer 0"][0] == 2 * (4 * B * S + 4 * B * S * 64)  # rstd + normalised, x2
    assert none - per_block["selective_mlp"]["layer 0"][0] == 4 * 4 * B * S * ffn  # gate, up, silu, product


def _tp2_accounting(rank, world, sp):
    dims = ParallelDims.build(world, rank, tp=2, sequence_parallel=sp)
    out = {}
    for name, r in {"none": rc(), "full": FULL, "full_partition": MODES_TP2["full_partition"],
                    "full_partition_offload": MODES_TP2["full_partition_offload"],
                    "selective_mlp": MODES_TP2["selective_mlp"]}.items():
        got = _measured(run_model(dims, r, sp=sp, account=True)["report"])
        assert got == _formula(r, dims, sp), (name, got, _formula(r, dims, sp))
        out[name] = got["layer 0"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_accountant_equals_formula_tp2(sp):
    got = run_ranks(_tp2_accounting, 2, sp, timeout=240)[0]
    block_input = 4 * B * S * 64
    assert got["full_partition"] == (block_input // 2, 0)  # 1/tp of the input per rank
    assert got["full_partition_offload"] == (0, block_input // 2)
    # Under SP the input is already split: full keeps 1/tp with or without partition.
    assert got["full"] == ((block_input // 2) if sp else block_input, 0)


# ---------------------------------------------------------------------------------------------
# Side effects, host pool, config errors


def test_side_effects_run_once_under_recompute():
    model = init_weights(apply_recompute(build_model(model_cfg()), ParallelDims.single(), FULL), seed=0)
    calls = {"all": 0, "once": 0}

    def count(module, args, out):
        calls["all"] += 1
        calls["once"] += not is_recomputing()

    for block in model.layers:
        block.attention_norm.register_forward_hook(count)
    tokens = torch.randint(0, 100, (B, S))
    model(tokens).sum().backward()
    assert calls == {"all": 2 * 3, "once": 3}  # replayed, but counted once per block


def test_host_pool_is_reused_across_steps():
    model = init_weights(apply_recompute(build_model(model_cfg()), ParallelDims.single(), MODES_TP1["offload"]), seed=0)
    tokens = torch.randint(0, 100, (B, S))
    capacity = []
    for _ in range(3):
        model(tokens).sum().backward()
        capacity.append((len(model.block_runner.saved.pool.chunks), model.block_runner.saved.pool.capacity))
    assert capacity[0] == capacity[1] == capacity[2]  # allocated in the first step only


@pytest.mark.parametrize("overrides, message", [
    (["recompute.partition=true"], "needs recompute.granularity=full"),
    (["recompute.partition=true", "recompute.granularity=full"], "needs parallel.tp > 1"),
    (["recompute.granularity=auto"], "needs recompute.memory_budget"),
    (["recompute.granularity=auto", "recompute.memory_budget=9GiB", "recompute.offload=true"], "chooses offload per block"),
    (["recompute.memory_budget=70GiB", "recompute.granularity=full"], "only used by recompute.granularity=auto"),
    (["recompute.granularity=selective", "recompute.modules=[]"], "needs recompute.modules"),
    (["recompute.granularity=selective", "recompute.modules=mlp,mlp_act"], "mlp already recomputes"),
    (["recompute.granularity=selective", "recompute.modules=attn"], "allowed: norm, mlp_act, core_attn, mlp"),
    (["recompute.granularity=full", "recompute.num_layers=5", "model.n_layers=4"], "exceeds model.n_layers(4)"),
    (["recompute.offload_min_size=lots"], "is not a size"),
    (["recompute.host_memory_budget=100GiB", "recompute.granularity=full"], "it is only used by auto"),
    (["recompute.granularity=auto", "recompute.memory_budget=9GiB", "recompute.host_memory_budget=lots"],
     "recompute.host_memory_budget='lots' is not a size"),
])
def test_impossible_combinations_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=".*".join(map(__import__("re").escape, [message]))):
        load_config("configs/debug.yaml", overrides)


# ---------------------------------------------------------------------------------------------
# Through the trainer: data-parallel engines, the activation report


ENGINES = {  # layout -> (ranks, overrides, recompute overrides)
    "ddp_dp2_full_offload": (2, ["parallel.dp=2"], ["recompute.granularity=full", "recompute.offload=true"]),
    "ddp_tp2_dp2_sp_selective": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true"],
                                 ["recompute.granularity=selective", "recompute.modules=norm,mlp"]),
    "ddp_tp2_dp2_partition": (4, ["parallel.tp=2", "parallel.dp=2"],
                              ["recompute.granularity=full", "recompute.partition=true"]),
    "deepspeed_zero1_dp2_full": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=1"],
                                 ["recompute.granularity=full"]),
    "deepspeed_zero2_dp2_selective_offload": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=2"],
                                              ["recompute.granularity=selective", "recompute.offload=true"]),
    # ZeRO-3 gathers weights into new storages inside forward: they must not be taken for
    # activations (kept, offloaded, counted) by the saved-tensor hooks
    "deepspeed_zero3_dp2_offload": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=3",
                                        "log.activation_memory=true"], ["recompute.offload=true"]),
    "deepspeed_zero3_dp2_full": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=3"],
                                 ["recompute.granularity=full"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(ENGINES))
def test_recompute_under_data_parallel_engines(layout, tiny_data, tmp_path):
    """3 optimizer steps with dropout: recompute gives the same losses, bitwise, under DDP
    (gradient sync only on the last micro-batch) and under the DeepSpeed engine."""
    from tests.test_distributed_train import base, train, train_zero3_partitioned

    world, extra, recompute = ENGINES[layout]
    fn = train_zero3_partitioned if "zero3" in layout else train
    common = [*extra, "model.dropout=0.1", "recompute.offload_min_size=0"]
    ref = run_ranks(fn, world, base(tiny_data, tmp_path / "ref", *common), timeout=240)
    got = run_ranks(fn, world, base(tiny_data, tmp_path / "rc", *common, *recompute), timeout=240)
    assert got == ref


@pytest.mark.slow
def test_train_prints_activation_report(tiny_data, tmp_path):
    from tests.conftest import TINY, run_cli

    r = run_cli("train", "--config", "configs/debug.yaml", *TINY, f"data.path={tiny_data}",
                f"train.out_dir={tmp_path / 'run'}", "train.steps=2", "log.activation_memory=true",
                "recompute.granularity=full", check=True)
    lines = [line for line in r.stderr.splitlines() if line.startswith("| layer ")]
    assert len(lines) == 2  # TINY has 2 layers
    for line in lines:  # measured == formula, device and host
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == cells[3] and cells[2] == cells[4], line


def test_a_forward_without_backward_frees_everything():
    """Pack hooks return detached tensors: an op that saves its own output (rsqrt, exp) would
    otherwise keep its graph alive, and with it the offload groups and their host buffers."""
    import gc

    model = init_weights(apply_recompute(build_model(model_cfg()), ParallelDims.single(), MODES_TP1["offload"]), seed=0)
    tokens = torch.randint(0, 100, (B, S))
    for _ in range(3):
        with ActivationAccountant(model):
            out = model(tokens)
        del out
        gc.collect()
        saved = model.block_runner.saved
        assert not [g for g in (ref() for ref in saved._groups) if g is not None]
    assert len(saved.pool.chunks) == 1


def test_model_runs_on_the_meta_device_with_recompute():
    model = apply_recompute(build_model(model_cfg(0.0)), ParallelDims.single(), FULL)
    assert model(torch.zeros(1, 8, dtype=torch.long, device="meta")).shape == (1, 8, 100)


@pytest.mark.parametrize("mode", ["full", "selective_all", "full_offload", "offload"])
def test_second_backward_through_the_same_graph(mode):
    """retain_graph / autograd.grad: torch re-enters the same recompute context; the replay must
    give the same gradients again."""
    cfg = model_cfg()
    model = init_weights(apply_recompute(build_model(cfg), ParallelDims.single(), MODES_TP1[mode]), seed=0)
    torch.manual_seed(0)
    x = torch.randn(B, S, cfg.dim, requires_grad=True)
    y = (model.block_runner(x, model.positions(S)) ** 2).sum()
    (first,) = torch.autograd.grad(y, x, retain_graph=True)
    (second,) = torch.autograd.grad(y, x)
    assert torch.equal(first, second)


def _zero3_accounting(rank, world, overrides):
    import os

    from bigtrain.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    # partition every weight
    trainer = Trainer(load_config("configs/debug.yaml", [*overrides, "parallel.zero3_persistence_threshold=0"]))
    cfg = trainer.cfg
    with ActivationAccountant(trainer.module) as acc:
        trainer.loss_on(trainer.train_loader.next_batch())
    sh = Shape(cfg.model, cfg.train.micro_batch_size, cfg.train.seq_len, elem=4, mask_bytes=4)
    return _measured(acc.report) == {label: (d, h) for label, d, h in block_formula(sh, cfg.recompute)}


@pytest.mark.slow
@pytest.mark.parametrize("offload", [False, True])
def test_zero3_gathered_weights_are_not_activations(offload, tiny_data, tmp_path):
    from tests.test_distributed_train import base

    extra = ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=3", "recompute.offload_min_size=0",
             f"recompute.offload={str(offload).lower()}"]
    assert all(run_ranks(_zero3_accounting, 2, base(tiny_data, tmp_path / "run", *extra), timeout=240))
