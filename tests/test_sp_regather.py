"""Sequence parallelism keeps 1/tp of the all-gathered input (issue 11 item 2).

Under SP the column-parallel projections (wq/wk/wv, w1/w3) keep this rank's (b, s/tp, h) slice
of their all-gathered input and gather it again in backward (parallel.layers). Checked: the
gradients are bitwise those of keeping the whole gathered input (the old path, restored by
patching the Function out); the accountant equals the formula at tp=2 and tp=4 and shows the
saving, 2 * (S*h - S*h/tp) * 4 bytes per block in fp32. Under bf16 autocast the slice is cast
before the all-gather and kept in bf16: gradients bitwise those of gathering fp32 and casting
after (the old path), the accountant equal to the formula, 2 * (S*h - S*h/tp) * 2 bytes saved.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch.nn.functional as F

from tests.multiproc import run_ranks


def _worker(rank, world, check_old):
    import tests.test_recompute as T
    from bigtrain.parallel import layers
    from bigtrain.parallel.dims import ParallelDims

    base = T.model_cfg
    if world == 4:  # kv heads must divide by tp
        T.model_cfg = lambda dropout=0.1: dataclasses.replace(base(dropout), n_kv_heads=4)
    try:
        dims = ParallelDims.build(world, rank, tp=world, sequence_parallel=True)
        out = {}
        for dropout in (0.0, 0.1):
            for name, r in {"none": T.rc(), "selective_mlp": T.rc(granularity="selective", modules=["mlp"]),
                            "full": T.rc(granularity="full")}.items():
                got = T.run_model(dims, r, sp=True, dropout=dropout, account=True)
                measured = T._measured(got["report"])
                assert measured == T._formula(r, dims, True, dropout=dropout), (name, dropout)
                out[(name, dropout)] = measured["layer 0"][0]
        if check_old:
            new = T.run_model(dims, T.rc(), sp=True, account=True)
            fused = layers._LinearRegatherInput.apply
            layers._LinearRegatherInput.apply = staticmethod(lambda x, local, w, piece: F.linear(x, w))
            try:
                old = T.run_model(dims, T.rc(), sp=True, account=True)
            finally:
                layers._LinearRegatherInput.apply = fused
            T.assert_same(new, old, "regather vs keep the gathered input")
            out["old_none"] = T._measured(old["report"])["layer 0"][0]
        return out
    finally:
        T.model_cfg = base


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_keeps_the_slice(tp):
    got = run_ranks(_worker, tp, tp == 2, timeout=280)[0]
    if tp == 2:
        from tests.test_recompute import B, S
        saving = 2 * (4 * B * S * 64 - 4 * B * S * 64 // tp)  # attention and MLP inputs, fp32
        assert got["old_none"] - got[("none", 0.1)] == saving


def _bf16_worker(rank, world):
    import tests.test_recompute as T
    from bigtrain.parallel import mappings
    from bigtrain.parallel.dims import ParallelDims

    dims = ParallelDims.build(world, rank, tp=world, sequence_parallel=True)
    out = {}
    for name, r in {"none": T.rc(), "selective_mlp": T.rc(granularity="selective", modules=["mlp"]),
                    "full": T.rc(granularity="full")}.items():
        # no dropout: the formula is exact under CPU autocast without it
        new = T.run_model(dims, r, sp=True, dropout=0.0, account=True, autocast=True)
        assert T._measured(new["report"]) == T._formula(r, dims, True, dropout=0.0, elem=2), name
        cast_first = mappings.compute_dtype
        mappings.compute_dtype = lambda x: x.dtype  # the old path: gather fp32, the projections cast
        try:
            old = T.run_model(dims, r, sp=True, dropout=0.0, account=True, autocast=True)
        finally:
            mappings.compute_dtype = cast_first
        T.assert_same(new, old, f"{name}: cast before the all-gather vs after")
        out[name] = (T._measured(new["report"])["layer 0"][0], T._measured(old["report"])["layer 0"][0])
    return out


@pytest.mark.slow
def test_sequence_parallel_casts_before_the_all_gather_under_autocast():
    from tests.test_recompute import B, S

    got = run_ranks(_bf16_worker, 2, timeout=280)[0]
    new, old = got["none"]
    assert old - new == 2 * (2 * B * S * 64 - 2 * B * S * 64 // 2)  # attention and MLP inputs, bf16
