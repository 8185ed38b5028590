"""Op-level selective recompute (recompute.modules: pointwise) against the no-recompute run.

The same checks as tests/test_recompute.py, with its helpers: bitwise-equal loss, gradients,
input gradient and RNG streams (fp32, dropout 0.1) at tp=1, tp=2 and tp=2 with sequence
parallelism, alone, combined with core_attn / mlp, and with offload; the accountant equals the
formula exactly; FlopCounterMode sees no extra matmul FLOPs; the trainer under DDP and
DeepSpeed ZeRO gives the same losses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bigtrain.config import ConfigError, load_config
from bigtrain.model import build_model, init_weights
from bigtrain.parallel.dims import ParallelDims
from bigtrain.recompute import apply_recompute
from tests.multiproc import run_ranks
from tests.test_recompute import B, S, _formula, _measured, assert_same, model_cfg, rc, run_model

POINTWISE = {
    "pointwise": rc(granularity="selective", modules=["pointwise"]),
    "pointwise_core_attn": rc(granularity="selective", modules=["pointwise", "core_attn"]),
    "pointwise_mlp": rc(granularity="selective", modules=["pointwise", "mlp"]),
    "pointwise_offload": rc(granularity="selective", modules=["pointwise"], offload=True),
}
NONE = rc()


@pytest.mark.parametrize("mode", list(POINTWISE))
def test_tp1_pointwise_is_bitwise_equal_to_no_recompute(mode):
    ref = run_model(ParallelDims.single(), NONE)
    assert_same(run_model(ParallelDims.single(), POINTWISE[mode]), ref, mode)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", list(POINTWISE))
def test_accountant_equals_formula_pointwise_tp1(mode, dropout):
    r = POINTWISE[mode]
    got = run_model(ParallelDims.single(), r, dropout=dropout, account=True)["report"]
    assert _measured(got) == _formula(r, dropout=dropout)


def test_pointwise_keeps_fewer_bytes():
    """At tp=1 without dropout a block keeps S*(16h + 8kv + 8f + 4a) bytes: its input, q, k, v,
    attention output and lse, the out-projection's output, gate and up."""
    one = ParallelDims.single()
    got = _measured(run_model(one, POINTWISE["pointwise"], dropout=0.0, account=True)["report"])["layer 0"]
    h, kv, f, a, n = 64, 32, 128, 4, B * S
    assert got == (n * (16 * h + 8 * kv + 8 * f + 4 * a), 0)
    none = _measured(run_model(one, NONE, dropout=0.0, account=True)["report"])["layer 0"][0]
    assert none == n * (32 * h + 8 * kv + 16 * f + 4 * a + 8)


def _tp2_pointwise(rank, world, sp):
    dims = ParallelDims.build(world, rank, tp=2, sequence_parallel=sp)
    ref = run_model(dims, NONE, sp=sp)
    for mode in ("pointwise", "pointwise_core_attn", "pointwise_mlp", "pointwise_offload"):
        assert_same(run_model(dims, POINTWISE[mode], sp=sp), ref, mode)
    for mode in ("none", "pointwise", "pointwise_core_attn"):
        r = NONE if mode == "none" else POINTWISE[mode]
        got = _measured(run_model(dims, r, sp=sp, account=True)["report"])
        assert got == _formula(r, dims, sp), (mode, got, _formula(r, dims, sp))
    return True


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_pointwise_is_bitwise_equal_and_accounted(sp):
    assert all(run_ranks(_tp2_pointwise, 2, sp, timeout=240))


def _flops(r) -> int:
    model = init_weights(apply_recompute(build_model(model_cfg(0.0)), ParallelDims.single(), r), seed=0)
    tokens = torch.randint(0, 100, (B, S + 1), generator=torch.Generator().manual_seed(3))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return fc.get_total_flops()


def test_pointwise_adds_no_matmul_flops():
    none = _flops(NONE)
    assert _flops(POINTWISE["pointwise"]) == none
    # ... while mlp with it runs w1 and w3 again (2 * 2 * S * h * f per block, 3 blocks)
    assert _flops(POINTWISE["pointwise_mlp"]) - none == 3 * 2 * 2 * B * S * 64 * 128


@pytest.mark.parametrize("modules, message", [
    ("pointwise,norm", "pointwise already recomputes every elementwise op"),
    ("pointwise,mlp_act", "drop mlp_act"),
])
def test_pointwise_nonsense_combinations_are_rejected(modules, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/debug.yaml", ["recompute.granularity=selective", f"recompute.modules={modules}"])


ENGINES = {  # layout -> (ranks, overrides, recompute overrides)
    "ddp_tp2_dp2_sp_pointwise": (4, ["parallel.tp=2", "parallel.dp=2", "parallel.sequence_parallel=true"],
                                 ["recompute.granularity=selective", "recompute.modules=pointwise"]),
    "deepspeed_zero2_dp2_pointwise_offload": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=2"],
                                              ["recompute.granularity=selective", "recompute.modules=pointwise",
                                               "recompute.offload=true"]),
    "deepspeed_zero1_tp2_sp_pointwise": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.engine=deepspeed",
                                         "parallel.zero_stage=1"],
                                         ["recompute.granularity=selective", "recompute.modules=pointwise"]),
    "deepspeed_zero3_dp2_pointwise": (2, ["parallel.dp=2", "parallel.engine=deepspeed", "parallel.zero_stage=3"],
                                      ["recompute.granularity=selective", "recompute.modules=pointwise"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(ENGINES))
def test_pointwise_under_data_parallel_engines(layout, tiny_data, tmp_path):
    from tests.test_distributed_train import base, train, train_zero3_partitioned

    world, extra, recompute = ENGINES[layout]
    fn = train_zero3_partitioned if "zero3" in layout else train
    common = [*extra, "model.dropout=0.1", "recompute.offload_min_size=0"]
    ref = run_ranks(fn, world, base(tiny_data, tmp_path / "ref", *common), timeout=240)
    got = run_ranks(fn, world, base(tiny_data, tmp_path / "rc", *common, *recompute), timeout=240)
    assert got == ref


def test_second_backward_through_the_same_pointwise_graph():
    """retain_graph / autograd.grad: the replay is entered again and must hand out the kept
    outputs again."""
    from tests.test_recompute import model_cfg as cfg_of

    cfg = cfg_of()
    model = init_weights(apply_recompute(build_model(cfg), ParallelDims.single(), POINTWISE["pointwise"]), seed=0)
    torch.manual_seed(0)
    x = torch.randn(B, S, cfg.dim, requires_grad=True)
    y = (model.block_runner(x, model.positions(S)) ** 2).sum()
    (first,) = torch.autograd.grad(y, x, retain_graph=True)
    (second,) = torch.autograd.grad(y, x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_swiglu_is_autograds_product_bitwise_and_saves_only_its_inputs(dtype):
    """SwiGLU.lean (pointwise's): the same product and gradients as F.silu(gate) * up, bitwise,
    saving gate and up only (silu(gate) is made again in backward)."""
    from bigtrain.model import SwiGLU

    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(2, 16, 48, generator=g).to(dtype) for _ in range(3))
    results = []
    for lean in (False, True):
        act = SwiGLU()
        act.lean = lean
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = act(a * 1, b * 1)  # non-leaf inputs, as the matmuls' outputs are
        out.backward(grad)
        results.append((out.detach(), a.grad, b.grad, saved))
    (ref, ref_ga, ref_gu, _), (out, ga, gu, saved) = results
    assert torch.equal(out, ref) and torch.equal(ga, ref_ga) and torch.equal(gu, ref_gu)
    assert len(saved) == 2 and all(t.shape == gate.shape for t in saved)


def test_pointwise_forward_holds_one_mlp_tensor_beyond_what_it_keeps():
    """The blocks' forward under pointwise: at its peak (the last block's down-projection) it
    holds, beyond what the blocks keep and return, the product (b, s, ffn) and the
    down-projection's output (b, s, h) -- not silu(gate) beside the product, nor the MLP's
    input (the MLP half runs as two regions, SwiGLU.lean makes the product in place)."""
    from bigtrain.planner.profile import LiveBytes
    from tests.test_recompute import model_cfg as cfg_of

    cfg = cfg_of(dropout=0.0)
    model = init_weights(apply_recompute(build_model(cfg), ParallelDims.single(), POINTWISE["pointwise"]), seed=0)
    x = torch.randn(B, S, cfg.dim, requires_grad=True)
    live = LiveBytes()
    with live:
        start = live.restart_peak()
        y = model.block_runner(x, model.positions(S))
        end = live.total
    h_bytes, f_bytes = 4 * B * S * cfg.dim, 4 * B * S * cfg.hidden
    assert live.peak - end == f_bytes + h_bytes, (live.peak - start, end - start, f_bytes, h_bytes)
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("mode", ["none", "pointwise"])
def test_accountant_equals_formula_outside_the_blocks(mode):
    """After a pointwise last span the final norm keeps only its input (its normalised tensor
    and rstd are recomputed): what the forward keeps outside the blocks is the formula's, exactly."""
    from bigtrain.planner.formula import Shape, outside_tensors
    from bigtrain.recompute.policy import final_norm_recomputed, spans_of

    r = NONE if mode == "none" else POINTWISE[mode]
    report = run_model(ParallelDims.single(), r, dropout=0.0, account=True)["report"]
    cfg = model_cfg(0.0)
    sh = Shape(cfg, B, S, 1, False, elem=4, mask_bytes=4, math_attention=False)
    recomputed = final_norm_recomputed(spans_of(r, cfg.n_layers))
    assert recomputed == (mode == "pointwise")
    items = outside_tensors(sh, cfg.vocab_size, recomputed)
    assert report.outside.device == sum(n for name, n in items.items() if not name.startswith("loss.")), items
