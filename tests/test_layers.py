"""Tensor-parallel layers and the vocab-parallel loss against the unsharded math (gloo, CPU, fp32).

Every rank builds the same plain nn.Linear / nn.Embedding from a fixed seed, runs it locally as
the reference, builds the parallel layer from a copy of it (the constructor slices the plain
module) and compares the forward output, the input gradient, and the full weight gradient
reassembled from every TP rank's shard with full_from_shards. Inputs are seeded by dp_rank, so
with world 4 and tp 2 the two TP groups see different data: a collective that leaked out of its
group would mix them.

Tolerance: what only moves, masks or sums with exact zeros must be bitwise and is checked with
torch.equal: shard slicing and reassembly, the embedding lookup (each row comes from one rank,
the others add 0.0) and its weight gradient, the -inf padding columns and the zero gradient of
the padding rows. Matmuls are compared with assert_close(rtol=1e-6, atol=1e-6) (values are O(1),
fp32 eps is 1.2e-7): row-parallel partial sums, the all-reduced input gradient of a
column-parallel layer and the vocab-parallel softmax sums change the summation order, and even
an unsplit reduction may take another BLAS kernel for a narrower matrix.

Each multi-rank test is one run_ranks call (one fork) running several cases; the ranks return
how many they checked, so a test cannot pass having checked nothing.
"""

import copy
import itertools
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigtrain.parallel.dims import ParallelDims, padded_vocab
from bigtrain.parallel.layers import (ColumnParallelLinear, RowParallelLinear, Shard, VocabParallelEmbedding,
                                      full_from_shards, full_shape, is_sharded, shard_of, shard_parameter)
from bigtrain.parallel.loss import cross_entropy
from tests.multiproc import run_ranks

TOL = dict(rtol=1e-6, atol=1e-6)
B, S = 2, 8  # batch, sequence (divisible by tp up to 4, for sequence parallelism)


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _ids(shape, vocab, seed):
    """Random ids in [0, vocab) that contain every id (the first `vocab` positions)."""
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    ids.view(-1)[:vocab] = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed + 1))
    return ids


def _linear(n_in, n_out, bias, seed):
    torch.manual_seed(seed)  # identical on every rank
    return nn.Linear(n_in, n_out, bias=bias)


def _gather_shards(t, dims, dim, full_size):
    """The full tensor from every TP rank's shard `t` (in tp_rank order), padding dropped."""
    parts = [torch.empty_like(t) for _ in range(dims.tp)]
    dist.all_gather(parts, t.contiguous(), group=dims.tp_group)
    return full_from_shards(parts, dim, full_size)


def _seq(t, dims):
    """This rank's slice of the sequence (dim 1), as sequence parallelism holds it."""
    return t.chunk(dims.tp, 1)[dims.tp_rank]


def _assert_zero(t, what):
    assert torch.equal(t, torch.zeros_like(t)), f"{what} is not exactly zero: {t}"


# --------------------------------------------------------------------------------------------
# The checks, each run on one rank against the local reference


def check_column(dims, bias, sp, pad_to=None, n_in=6, n_out=8):
    tp, r, seed = dims.tp, dims.tp_rank, 1000 * dims.dp_rank
    padded = pad_to or n_out
    lin = _linear(n_in, n_out, bias, seed)
    col = ColumnParallelLinear(copy.deepcopy(lin), dims, sequence_parallel=sp, pad_to=pad_to)
    local = padded // tp
    n_real = max(0, min(local, n_out - r * local))  # columns of this rank before the padding
    assert col.weight.shape == (local, n_in) and full_shape(col.weight) == (n_out, n_in)
    assert torch.equal(col.weight, Shard(0, padded, tp, r)(lin.weight))

    x = _rand((B, S, n_in), seed + 1)
    g_padded = _rand((B, S, padded), seed + 2)  # nonzero upstream gradient in the padding columns too
    g = g_padded[..., :n_out]

    xr = x.clone().requires_grad_(True)
    yr = lin(xr)
    yr.backward(g)

    xp = (_seq(x, dims) if sp else x).clone().requires_grad_(True)
    y = col(xp)
    assert y.shape == (B, S, local)
    want = yr.detach()[..., r * local:r * local + n_real]
    torch.testing.assert_close(y[..., :n_real], want, **TOL)
    assert torch.equal(y[..., n_real:], torch.full_like(y[..., n_real:], float("-inf")))
    y.backward(g_padded[..., r * local:(r + 1) * local])

    torch.testing.assert_close(xp.grad, _seq(xr.grad, dims) if sp else xr.grad, **TOL)
    _assert_zero(col.weight.grad[n_real:], "padding rows' weight gradient")
    torch.testing.assert_close(_gather_shards(col.weight.grad, dims, 0, n_out), lin.weight.grad, **TOL)
    if bias:
        _assert_zero(col.bias.grad[n_real:], "padding entries' bias gradient")
        torch.testing.assert_close(_gather_shards(col.bias.grad, dims, 0, n_out), lin.bias.grad, **TOL)
    else:
        assert col.bias is None


def check_row(dims, bias, sp, n_in=8, n_out=6):
    tp, r, seed = dims.tp, dims.tp_rank, 1000 * dims.dp_rank + 10
    lin = _linear(n_in, n_out, bias, seed)
    row = RowParallelLinear(copy.deepcopy(lin), dims, sequence_parallel=sp)
    assert torch.equal(row.weight, Shard(1, n_in, tp, r)(lin.weight))

    x = _rand((B, S, n_in), seed + 1)
    g = _rand((B, S, n_out), seed + 2)
    xr = x.clone().requires_grad_(True)
    yr = lin(xr)
    yr.backward(g)

    xp = x.chunk(tp, -1)[r].clone().requires_grad_(True)
    y = row(xp)
    torch.testing.assert_close(y, _seq(yr, dims) if sp else yr, **TOL)
    y.backward(_seq(g, dims) if sp else g)

    torch.testing.assert_close(xp.grad, xr.grad.chunk(tp, -1)[r], **TOL)
    torch.testing.assert_close(_gather_shards(row.weight.grad, dims, 1, n_in), lin.weight.grad, **TOL)
    if bias:
        # replicated; under SP each rank saw only its sequence slice: a partial sum over TP
        bias_grad = row.bias.grad.clone()
        if sp:
            assert row.bias.sequence_parallel is True
            dist.all_reduce(bias_grad, group=dims.tp_group)
        torch.testing.assert_close(bias_grad, lin.bias.grad, **TOL)
    else:
        assert row.bias is None


def check_embedding(dims, vocab, sp, h=5):
    tp, r, seed = dims.tp, dims.tp_rank, 1000 * dims.dp_rank + 20
    padded = padded_vocab(vocab, tp)
    torch.manual_seed(seed)
    emb = nn.Embedding(vocab, h)
    par = VocabParallelEmbedding(copy.deepcopy(emb), dims, sequence_parallel=sp)
    local = padded // tp
    assert par.weight.shape == (local, h) and shard_of(par.weight).padded == padded
    assert (par.vocab_start, par.vocab_end) == (r * local, (r + 1) * local)
    assert torch.equal(par.weight, Shard(0, padded, tp, r)(emb.weight))  # zero padding rows

    ids = _ids((B, S), vocab, seed + 1)
    g = _rand((B, S, h), seed + 2)
    out_r = emb(ids)
    out_r.backward(g)

    out = par(ids)
    assert torch.equal(out, _seq(out_r, dims) if sp else out_r)  # one rank's row plus exact zeros
    out.backward(_seq(g, dims) if sp else g)
    assert torch.equal(par.weight.grad, Shard(0, padded, tp, r)(emb.weight.grad))  # padding rows: 0
    assert torch.equal(_gather_shards(par.weight.grad, dims, 0, vocab), emb.weight.grad)


def check_cross_entropy(dims, vocab, pass_vocab=True, dtype=torch.float32):
    tp, r, seed = dims.tp, dims.tp_rank, 1000 * dims.dp_rank + 30
    padded = padded_vocab(vocab, tp)
    local = padded // tp
    n_real = max(0, min(local, vocab - r * local))
    full = 3 * _rand((B, S, padded), seed)  # the padding columns hold garbage, which vocab_size excludes
    targets = _ids((B, S), vocab, seed + 1)

    zr = full[..., :vocab].to(dtype).float().requires_grad_(True)
    loss_r = F.cross_entropy(zr.flatten(0, 1), targets.flatten())
    loss_r.backward()

    zl = full[..., r * local:(r + 1) * local].to(dtype).requires_grad_(True)
    loss = cross_entropy(zl, targets, dims.tp_group, vocab if pass_vocab else None)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, loss_r.detach(), **TOL)
    loss.backward()
    assert zl.grad.dtype == dtype
    want = zr.grad[..., r * local:r * local + n_real]
    if dtype == torch.float32:
        torch.testing.assert_close(zl.grad[..., :n_real], want, **TOL)
    else:  # computed in fp32 and rounded once to the logits' dtype: within one bf16 ulp
        torch.testing.assert_close(zl.grad[..., :n_real], want.to(dtype), rtol=2 ** -7, atol=1e-6)
    _assert_zero(zl.grad[..., n_real:], "gradient of the padding logits")


def check_output_layer(dims, vocab, h=6):
    """The model's output layer: column-parallel over the padded vocab, logits left split, into
    the vocab-parallel loss; against nn.Linear + F.cross_entropy on the unpadded vocab."""
    tp, r, seed = dims.tp, dims.tp_rank, 1000 * dims.dp_rank + 40
    padded = padded_vocab(vocab, tp)
    lin = _linear(h, vocab, False, seed)
    out = ColumnParallelLinear(copy.deepcopy(lin), dims, pad_to=padded)
    local = padded // tp
    n_real = max(0, min(local, vocab - r * local))

    x = _rand((B, S, h), seed + 1)
    targets = _ids((B, S), vocab, seed + 2)
    xr = x.clone().requires_grad_(True)
    loss_r = F.cross_entropy(lin(xr).flatten(0, 1), targets.flatten())
    loss_r.backward()

    xp = x.clone().requires_grad_(True)
    logits = out(xp)
    assert logits.shape == (B, S, local)
    assert torch.isinf(logits[..., n_real:]).all() and (logits[..., n_real:] < 0).all()
    assert torch.isfinite(logits[..., :n_real]).all()
    loss = cross_entropy(logits, targets, dims.tp_group, vocab)
    torch.testing.assert_close(loss, loss_r.detach(), **TOL)
    loss.backward()
    torch.testing.assert_close(xp.grad, xr.grad, **TOL)
    _assert_zero(out.weight.grad[n_real:], "padding rows' weight gradient")
    torch.testing.assert_close(_gather_shards(out.weight.grad, dims, 0, vocab), lin.weight.grad, **TOL)


def _run_cases(rank, world, tp, cases):
    dims = ParallelDims.build(world, rank, tp)
    for check, kwargs in cases:
        try:
            CHECKS[check](dims, **kwargs)
        except Exception as e:
            raise AssertionError(f"{check}({kwargs}) at tp={tp}, rank {rank}: {e}") from e
    return len(cases)


CHECKS = {"column": check_column, "row": check_row, "embedding": check_embedding,
          "cross_entropy": check_cross_entropy, "output_layer": check_output_layer}


def _run(world, tp, cases):
    counts = run_ranks(_run_cases, world, tp, cases)
    assert counts == [len(cases)] * world


# --------------------------------------------------------------------------------------------
# Tests


def test_column_parallel_linear():
    cases = [("column", dict(bias=bias, sp=sp)) for bias, sp in itertools.product([False, True], repeat=2)]
    # an output padded past out_features (tp divides pad_to, not out_features)
    cases += [("column", dict(bias=bias, sp=False, n_out=7, pad_to=8)) for bias in (False, True)]
    _run(2, 2, cases)


def test_row_parallel_linear():
    cases = [("row", dict(bias=bias, sp=sp)) for bias, sp in itertools.product([False, True], repeat=2)]
    _run(2, 2, cases)


def test_vocab_parallel_embedding():
    # vocab 7 at tp=2: padded to 8, rank 1 holds one zero padding row
    _run(2, 2, [("embedding", dict(vocab=vocab, sp=sp)) for vocab, sp in itertools.product([7, 8], [False, True])])


def test_vocab_parallel_cross_entropy():
    _run(2, 2, [("cross_entropy", dict(vocab=7)),                     # padded: column 7 excluded
                ("cross_entropy", dict(vocab=8)),
                ("cross_entropy", dict(vocab=8, pass_vocab=False)),   # no padding, vocab_size=None
                ("cross_entropy", dict(vocab=7, dtype=torch.bfloat16))])


def test_padded_output_layer():
    """-inf in the padding columns, zero gradient to the padding rows, and the loss of the
    unpadded vocab (the pad_to column cases of test_column_parallel_linear check the first two
    with a nonzero upstream gradient in the padding columns)."""
    _run(2, 2, [("output_layer", dict(vocab=7)), ("output_layer", dict(vocab=8)),
                ("column", dict(bias=True, sp=True, n_out=7, pad_to=8))])


WORLD4 = [("column", dict(bias=True, sp=False)),
          ("column", dict(bias=True, sp=True)),
          ("column", dict(bias=True, sp=False, n_out=10, pad_to=12)),
          ("row", dict(bias=True, sp=False)),
          ("row", dict(bias=True, sp=True)),
          ("row", dict(bias=False, sp=True)),
          ("embedding", dict(vocab=10, sp=False)),   # padded to 12 at tp=4
          ("embedding", dict(vocab=9, sp=True)),     # tp=4: rank 3 holds only padding rows
          ("cross_entropy", dict(vocab=10)),
          ("cross_entropy", dict(vocab=9)),
          ("output_layer", dict(vocab=9)),
          ("output_layer", dict(vocab=10))]


@pytest.mark.parametrize("tp", [4, 2], ids=["tp4", "tp2_dp2"])
def test_layers_world4(tp):
    _run(4, tp, WORLD4)


def test_cross_entropy_without_group():
    """One rank (group None): the full logits, padding columns past vocab_size dropped."""
    logits = _rand((B, S, 8), 50).requires_grad_(True)
    targets = _ids((B, S), 7, 51)
    loss = cross_entropy(logits, targets, None, 7)
    ref = logits.detach()[..., :7].requires_grad_(True)
    loss_r = F.cross_entropy(ref.flatten(0, 1), targets.flatten())
    assert torch.equal(loss, loss_r)  # the same call on the same values
    loss.backward()
    loss_r.backward()
    assert torch.equal(logits.grad[..., :7], ref.grad)
    _assert_zero(logits.grad[..., 7:], "gradient of the padding logits")
    assert torch.equal(cross_entropy(logits, targets), F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


# --------------------------------------------------------------------------------------------
# Sharding helpers, single process (no groups needed to slice)


@pytest.mark.parametrize("shape, dim, tp", [((7, 3), 0, 2), ((10, 3), 0, 4), ((9, 2), 0, 4), ((3, 8), 1, 2),
                                            ((2, 5, 6), 2, 3)])
def test_shard_of_full_from_shards_round_trip(shape, dim, tp):
    full = _rand(shape, 0)
    padded = padded_vocab(shape[dim], tp)
    shards = [Shard(dim, padded, tp, r)(full) for r in range(tp)]
    for r, shard in enumerate(shards):
        assert shard.shape[dim] == padded // tp
        start = r * (padded // tp)
        real = max(0, min(padded // tp, shape[dim] - start))
        assert torch.equal(shard.narrow(dim, 0, real), full.narrow(dim, start, real))
        _assert_zero(shard.narrow(dim, real, padded // tp - real), "padding")
    assert torch.equal(full_from_shards(shards, dim, shape[dim]), full)
    assert full_from_shards(shards, dim, shape[dim]).shape == full.shape


def test_shard_parameter_contract():
    full = _rand((7, 4), 1)
    for r in range(2):
        dims = ParallelDims(world_size=2, rank=r, tp=2)  # slicing needs no process group
        p = shard_parameter(nn.Parameter(full.clone()), 0, dims, padded=8)
        assert is_sharded(p) and isinstance(p, nn.Parameter) and p.requires_grad
        s = shard_of(p)
        assert (s.full_shape, s.dim, s.padded) == ((7, 4), 0, 8)
        assert torch.equal(p, s(full))
        assert torch.equal(pickle.loads(pickle.dumps(s))(full), p.detach())  # picklable
        # a meta weight gives a meta shard of the right shape
        m = shard_parameter(nn.Parameter(torch.empty(7, 4, device="meta")), 0, dims, padded=8)
        assert m.is_meta and m.shape == (4, 4) and full_shape(m) == (7, 4)
    assert not is_sharded(nn.Parameter(full))
    with pytest.raises(ValueError, match=r"size 7 of dim 0 of a \(7, 4\) weight is not divisible by tp\(2\)"):
        shard_parameter(nn.Parameter(full), 0, ParallelDims(world_size=2, rank=0, tp=2))


def test_layers_built_on_meta_keep_the_contract():
    """What parallelize does: plain modules on meta in, meta shards with the contract out."""
    dims = ParallelDims(world_size=2, rank=1, tp=2)
    with torch.device("meta"):
        col = ColumnParallelLinear(nn.Linear(6, 7, bias=True), dims, pad_to=8)
        row = RowParallelLinear(nn.Linear(8, 6), dims)
        emb = VocabParallelEmbedding(nn.Embedding(7, 5), dims)
    assert col.weight.is_meta and col.weight.shape == (4, 6) and col.n_real == 3
    assert col.bias.shape == (4,) and full_shape(col.bias) == (7,)
    assert row.weight.shape == (6, 4) and shard_of(row.weight).dim == 1 and not is_sharded(row.bias)
    assert emb.weight.shape == (4, 5) and (emb.vocab_start, emb.vocab_end) == (4, 8)
    with pytest.raises(ValueError, match="plain embeddings only"):
        VocabParallelEmbedding(nn.Embedding(8, 5, padding_idx=0), dims)
