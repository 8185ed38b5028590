"""Collectives that autograd can differentiate, in conjugate pairs (after Megatron's mappings.py).

Each forward collective's backward is its adjoint:

    copy_to_tp                 identity             / all-reduce
    reduce_from_tp             all-reduce           / identity
    gather_from_sequence       all-gather dim 1     / reduce-scatter dim 1
                               (its output's SequenceSlice: the slice, re-gathered in backward;
                               under autocast the slice is cast before the all-gather)
    reduce_scatter_to_sequence reduce-scatter dim 1 / all-gather dim 1

Activations are (b, s, h): the sequence is dim 1, not the leading dim that the single-tensor
collectives split, so all_gather / reduce_scatter lay the per-rank chunks out rank-major in a
contiguous buffer and back (one copy each way, none when b == 1).
All functions take the group explicitly; with group None (or a group of one) they are the
identity. The same code runs on gloo (CPU tests) and NCCL: torch >= 2.x gloo implements the
single-tensor all-gather and reduce-scatter.

Collectives never modify their input or an incoming gradient in place: autograd may hand the
same gradient tensor to several branches (e.g. both sides of a residual add).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bigtrain.model import compute_dtype

# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch (the GPU
# machine's 2.11) only has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


# --------------------------------------------------------------------------------------------
# Plain (non-autograd) building blocks


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, into a new tensor."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's x along dim."""
    n, dim = group_size(group), dim % x.dim()
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # rank-major: (n, *x.shape) flattened
    _all_gather_single(out, x, group=group)
    # (n, ..., c, ...) -> (..., n * c, ...): one copy, none when everything before dim is 1.
    return out.view(n, *x.shape).movedim(0, dim).flatten(dim, dim + 1).contiguous()


def start_all_gather(x: torch.Tensor, group) -> tuple[torch.Tensor, object]:
    """Start concatenating every rank's flat x (n,) into (size * n,), rank order; returns
    (output, work): the output is valid once work.wait() has returned (on CUDA the current
    stream then waits for the collective's)."""
    out = x.new_empty(group_size(group) * x.numel())
    return out, _all_gather_single(out, x.contiguous(), group=group, async_op=True)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group, keep this rank's 1/size chunk along dim."""
    n, dim = group_size(group), dim % x.dim()
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {n} ranks")
    # (..., n * c, ...) -> (n, ..., c, ...): rank r's chunk becomes block r of the flat input.
    chunks = x.unflatten(dim, (n, -1)).movedim(dim, 0).contiguous()
    out = chunks.new_empty(chunks.shape[1:])  # (..., c, ...)
    _reduce_scatter_single(out, chunks.flatten(0, 1), group=group)
    return out


# --------------------------------------------------------------------------------------------
# Tensor-parallel region: enter / leave along the hidden (last) dim


class _CopyToTP(torch.autograd.Function):
    """Forward: identity (x is replicated on every TP rank).
    Backward: all-reduce, since each rank's branch contributes part of x's gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)  # a new tensor object, so autograd records this node

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce of the partial sums each rank computed.
    Backward: identity (the summed output's gradient is every summand's gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# --------------------------------------------------------------------------------------------
# Sequence-parallel region: split / gather along the sequence, dim 1 of (b, s, h)


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather (b, s/tp, h) -> (b, s, h), entering the TP region under SP.
    Backward: reduce-scatter: each rank's gradient of the full sequence is a partial sum (its
    column-parallel shard), and each rank keeps the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, 1, ctx.group), None


class _GatherCastFromSequence(torch.autograd.Function):
    """gather_from_sequence under autocast: cast this rank's slice to the compute dtype, then
    all-gather it (half the bytes of gathering fp32 and casting the whole sequence after). Also
    returns the cast slice (not differentiable: for SequenceSlice). Backward: the gradient in
    the input's dtype, then the reduce-scatter -- in the input's precision, as when the cast came
    after the gather: bitwise the same gradients."""

    @staticmethod
    def forward(ctx, x, dtype, group):
        ctx.group, ctx.dtype = group, x.dtype
        local = x.to(dtype)  # (b, s/tp, h)
        ctx.mark_non_differentiable(local)
        return all_gather(local, 1, group), local

    @staticmethod
    def backward(ctx, grad, _local_grad):
        return reduce_scatter(grad.to(ctx.dtype), 1, ctx.group), None, None


class SequenceSlice:
    """This rank's (b, s/tp, h) slice of an all-gathered input, kept instead of the gathered
    (b, s, h) tensor by the column-parallel projections that read it (see
    layers.ColumnParallelLinear): their backward all-gathers it again, once for all of them.
    gather_from_sequence attaches one to its output as `.sequence_slice`, and the slice itself
    as `.sequence_local` (on the output, so that it lives only as long as the output: in
    backward the slice comes from the projections' saved tensors, which offload may have moved)."""

    def __init__(self, group):
        self.group = group
        self._full: torch.Tensor | None = None
        self._work = None
        self._users = 0  # projections whose backward has not run yet

    def use(self) -> None:
        self._users += 1

    def start(self, local: torch.Tensor) -> None:
        """Begin the all-gather of `local` (asynchronous where the backend allows), unless done."""
        if self._full is None and self._work is None:
            local = local.contiguous()
            self._shape = local.shape
            self._buf = local.new_empty((group_size(self.group) * local.shape[0], *local.shape[1:]))
            self._work = _all_gather_single(self._buf, local, group=self.group, async_op=True)

    def full(self) -> torch.Tensor:
        """(after start) The gathered (b, s, h) input, bitwise what the forward's all-gather gave; released
        after the last projection's backward."""
        if self._full is None:
            self._work.wait()
            n = group_size(self.group)
            self._full = self._buf.view(n, *self._shape).movedim(0, 1).flatten(1, 2).contiguous()
            self._work = self._buf = None
        full = self._full
        self._users -= 1
        if self._users <= 0:
            self._full = None  # gathered again if a second backward needs it
        return full


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: reduce-scatter partial sums (b, s, h) -> summed slice (b, s/tp, h), leaving the
    TP region under SP. Backward: all-gather the slices' gradients (the partial sums' gradient
    is the full summed gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 1, ctx.group), None


def _apply(fn, x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return fn.apply(x, group)


def copy_to_tp(x, group):
    """Identity / all-reduce. See _CopyToTP."""
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x, group):
    """All-reduce / identity. See _ReduceFromTP."""
    return _apply(_ReduceFromTP, x, group)


def gather_from_sequence(x, group):
    """All-gather dim 1 / reduce-scatter dim 1. See _GatherFromSequence. The output carries a
    SequenceSlice of x (`.sequence_slice`) for the column-parallel layers that read it. Under
    autocast the slice is cast to the compute dtype first (the projections read that dtype):
    _GatherCastFromSequence."""
    if group_size(group) == 1:
        return x
    dtype = compute_dtype(x)
    if dtype != x.dtype:
        out, local = _GatherCastFromSequence.apply(x, dtype, group)
    else:
        out, local = _GatherFromSequence.apply(x, group), x
    out.sequence_slice, out.sequence_local = SequenceSlice(group), local
    return out


def reduce_scatter_to_sequence(x, group):
    """Reduce-scatter dim 1 / all-gather dim 1. See _ReduceScatterToSequence."""
    return _apply(_ReduceScatterToSequence, x, group)
