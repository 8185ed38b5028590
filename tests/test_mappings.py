"""Each conjugate collective against the unsharded math, forward and gradient, on gloo ranks.

Every rank can generate every rank's input x_q and upstream gradient g_q (seeded by q), so it
computes the expected output and input gradient locally and compares with what the
collective gave. With world 4 and tp 2 the collectives run on the two TP subgroups.
"""

import pytest
import torch

from bigtrain.parallel import mappings as M
from bigtrain.parallel.dims import ParallelDims
from tests.multiproc import run_ranks


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# op name -> (input shape for n ranks, replicated input?, expected output, expected input grad)
# expected functions take (i = my index in the group, xs, gs) over the group's ranks.
CASES = {
    "copy_to_tp": (lambda n: (2, 3, 4), True,
                   lambda i, xs, gs: xs[i],
                   lambda i, xs, gs: sum(gs)),
    "reduce_from_tp": (lambda n: (2, 3, 4), False,
                       lambda i, xs, gs: sum(xs),
                       lambda i, xs, gs: gs[i]),
    "gather_from_sequence": (lambda n: (2, 4, 3), False,
                             lambda i, xs, gs: torch.cat(xs, 1),
                             lambda i, xs, gs: sum(gs).chunk(len(xs), 1)[i]),
    "reduce_scatter_to_sequence": (lambda n: (2, 4 * n, 3), False,
                                   lambda i, xs, gs: sum(xs).chunk(len(xs), 1)[i],
                                   lambda i, xs, gs: torch.cat(gs, 1)),
}


def _check_op(rank, world, name, tp, noncontiguous):
    dims = ParallelDims.build(world, rank, tp)
    shape_of, replicated, want_y, want_grad = CASES[name]
    shape = shape_of(tp)
    members = range(dims.dp_rank * dims.tp, (dims.dp_rank + 1) * dims.tp)  # TP ranks are adjacent
    xs = [_rand(shape, 0 if replicated else 100 + q) for q in members]
    op = getattr(M, name)
    y_shape = want_y(0, xs, xs).shape
    gs = [_rand(y_shape, 200 + q) for q in members]
    i = dims.tp_rank

    x = xs[i].clone()
    if noncontiguous:  # same values, transposed memory
        x = x.transpose(0, 2).contiguous().transpose(0, 2)
    x.requires_grad_(True)
    x_before = x.detach().clone()
    y = op(x, dims.tp_group)
    (y * gs[i]).sum().backward()
    torch.testing.assert_close(y, want_y(i, xs, gs), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, want_grad(i, xs, gs), rtol=1e-6, atol=1e-6)
    assert torch.equal(x.detach(), x_before), "the collective modified its input"


@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_collective_world2(name, noncontiguous):
    run_ranks(_check_op, 2, name, 2, noncontiguous)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["copy_to_tp", "reduce_from_tp", "gather_from_sequence", "reduce_scatter_to_sequence"])
def test_collective_world4(name, tp):
    run_ranks(_check_op, 4, name, tp, True)


@pytest.mark.parametrize("name", list(CASES))
def test_identity_without_group(name):
    x = torch.randn(2, 4, 4, requires_grad=True)
    assert getattr(M, name)(x, None) is x


def _residual_grad_not_mutated(rank, world):
    """Autograd hands the same gradient tensor to both sides of an add: the backward
    all-reduce of copy_to_tp must not change it under the other branch's feet."""
    dims = ParallelDims.build(world, rank, 2)
    x = torch.ones(2, 3, requires_grad=True)
    y = x + M.copy_to_tp(x, dims.tp_group) * (rank + 1)  # d/dx = 1 + sum_r (r + 1) = 4
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 3), 4.0))


def test_backward_does_not_mutate_shared_grad():
    run_ranks(_residual_grad_not_mutated, 2)
