"""Tensor-parallel layers, each built by slicing a plain nn.Linear / nn.Embedding.

    ColumnParallelLinear   weight (out, in) split along out: y_r = x A_r^T, output stays split
    RowParallelLinear      weight (out, in) split along in:  y = sum_r x_r A_r^T, summed over TP
    VocabParallelEmbedding weight (v, h) split along v: each rank looks up the ids it owns

A plain module on the meta device gives meta shards; a materialised one gives copies of its
slices. Every sharded parameter carries one typed record, `p.tp_shard` (a `Shard`: the dim
split over the TP ranks, the unpadded full shape, the padded size, and `shard(full)` -> this
rank's slice), which bigtrain.model.init_weights and the checkpoint code rely on: init_weights
draws the full tensor from one seed and keeps shard(full), so tp=1 and tp=2 start bitwise
identical. full_from_shards is the inverse, for checkpoints; `shard_of(p)` reads the record.

Sequence parallelism (SP): activations between TP regions are (b, s/tp, h). Column-parallel
layers then all-gather the sequence on entry (reduce-scatter in backward) instead of copy_to_tp,
and row-parallel layers / the embedding reduce-scatter on exit instead of all-reducing. A
column-parallel layer whose input came from that all-gather keeps only this rank's (b, s/tp, h)
slice for its weight gradient and all-gathers it again in backward (as Megatron does), started
before the input-gradient matmul so the two overlap where the backend runs collectives
asynchronously; projections of the same input share one gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.model import SEQUENCE_PARALLEL, TP_SHARD
from bigtrain.parallel.dims import ParallelDims, padded_vocab
from bigtrain.parallel.mappings import (SequenceSlice, copy_to_tp, gather_from_sequence, reduce_from_tp,
                                       reduce_scatter_to_sequence)


class Shard:
    """Where a tensor-parallel parameter sits in its full tensor: this rank's slice along `dim`
    of the full tensor (shape `full_shape`) padded with zeros to `padded` first. Calling it cuts
    that slice out of a full tensor. A class rather than a closure so parameters stay picklable."""

    def __init__(self, dim: int, padded: int, tp: int, tp_rank: int, full_shape: tuple[int, ...] = ()):
        self.dim, self.size, self.start = dim, padded // tp, tp_rank * (padded // tp)
        self.padded, self.full_shape = padded, tuple(full_shape)

    def __call__(self, full: torch.Tensor) -> torch.Tensor:
        shape = list(full.shape)
        shape[self.dim] = self.size
        out = full.new_zeros(shape)
        real = max(0, min(self.size, full.shape[self.dim] - self.start))  # rows before the padding
        out.narrow(self.dim, 0, real).copy_(full.narrow(self.dim, self.start, real))
        return out

    def __repr__(self) -> str:
        return f"Shard(dim={self.dim}, rows {self.start}:{self.start + self.size} of {self.padded})"


def shard_parameter(param: torch.Tensor, dim: int, dims: ParallelDims, padded: int | None = None) -> nn.Parameter:
    """This rank's slice of `param` along `dim` as a new Parameter carrying its Shard."""
    padded = padded or param.shape[dim]
    if padded % dims.tp:
        raise ValueError(f"size {padded} of dim {dim} of a {tuple(param.shape)} weight is not divisible by tp({dims.tp})")
    shard = Shard(dim, padded, dims.tp, dims.tp_rank, tuple(param.shape))
    p = nn.Parameter(shard(param.detach()), requires_grad=param.requires_grad)  # meta stays meta
    setattr(p, TP_SHARD, shard)
    return p


def shard_of(p: torch.Tensor) -> Shard | None:
    """The parameter's Shard, or None for a replicated one."""
    return getattr(p, TP_SHARD, None)


def is_sharded(p: torch.Tensor) -> bool:
    return shard_of(p) is not None


def mark_sequence_parallel(p: torch.Tensor) -> None:
    """A replicated weight applied to this rank's sequence slice: its gradient is a partial sum
    over TP (summed by parallelize.sync_sequence_parallel_grads)."""
    setattr(p, SEQUENCE_PARALLEL, True)


def is_sequence_parallel(p: torch.Tensor) -> bool:
    return getattr(p, SEQUENCE_PARALLEL, False)


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape the parameter has at tp=1."""
    s = shard_of(p)
    return s.full_shape if s is not None else tuple(p.shape)


def my_slice(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` for parameter p: its shard, or `full` itself if replicated."""
    s = shard_of(p)
    return s(full) if s is not None else full


def full_from_shards(shards: list[torch.Tensor], shard_dim: int, full_size: int) -> torch.Tensor:
    """Inverse of shard_of: concatenate the TP ranks' slices (in tp_rank order), drop padding."""
    return torch.cat(list(shards), dim=shard_dim).narrow(shard_dim, 0, full_size)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's rows (output features) split: this rank computes y[..., its slice].

    Input: (b, s, in) replicated, or (b, s/tp, in) under SP; `input_ready` says the caller has
    already entered the TP region (one copy_to_tp / all-gather shared by several projections of
    the same input). Output: (b, s, out_padded/tp), split over TP (the vocab-parallel loss and
    the row-parallel layer after it consume it split).
    Columns past `out_features` (vocab padding, pad_to > out_features) are set to -inf, so they
    never take softmax mass, in the loss or when sampling.
    """

    def __init__(self, linear: nn.Linear, dims: ParallelDims, sequence_parallel: bool = False,
                 input_ready: bool = False, pad_to: int | None = None):
        super().__init__()
        self.group, self.sequence_parallel = dims.tp_group, sequence_parallel
        self.input_ready = input_ready
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = shard_parameter(linear.weight, 0, dims, pad_to)
        self.bias = None if linear.bias is None else shard_parameter(linear.bias, 0, dims, pad_to)
        local = self.weight.shape[0]
        self.n_real = max(0, min(local, self.out_features - dims.tp_rank * local))  # unpadded columns here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_ready:
            x = gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        piece = getattr(x, "sequence_slice", None) if self.sequence_parallel else None
        if piece is not None and torch.is_grad_enabled() and x.requires_grad and self.weight.requires_grad:
            piece.use()
            y = _LinearRegatherInput.apply(x, x.sequence_local, self.weight, piece)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x, self.weight, self.bias)  # (b, s, out_padded/tp)
        if self.n_real < y.shape[-1]:
            # In place on our own matmul output (linear's backward does not need it); autograd
            # gives the filled columns zero gradient, so the zero padding rows stay zero.
            y[..., self.n_real:] = float("-inf")
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, local_out={self.weight.shape[0]}, "
                f"sequence_parallel={self.sequence_parallel}")


class _LinearRegatherInput(torch.autograd.Function):
    """y = x W^T for x the all-gathered (b, s, in) input, keeping only `local`, this rank's
    (b, s/tp, in) slice (in the compute dtype under autocast): backward all-gathers it again for
    W's gradient. The gradients are bitwise those of F.linear's backward: the same two matmuls
    on the same operands."""

    @staticmethod
    def forward(ctx, x, local, weight, piece: SequenceSlice):
        ctx.piece = piece
        ctx.save_for_backward(local, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        local, weight = ctx.saved_tensors  # (b, s/tp, in): unpacked so recompute/offload see it
        piece = ctx.piece
        piece.start(local)  # the all-gather runs while the input gradient is computed
        # Under autocast the forward multiplied the casts of the weight and of the input to the
        # compute dtype (grad's): cast again, the same rounding (the weight's gradient goes back
        # to fp32 as autocast's would). No-ops in fp32, and for an input cast before the gather.
        weight = weight.to(grad.dtype)
        g = grad.reshape(-1, grad.shape[-1])  # (b*s, out)
        grad_x = g.mm(weight).view(*grad.shape[:-1], weight.shape[1])  # (b, s, in)
        full = piece.full().to(grad.dtype)
        grad_w = g.t().mm(full.reshape(-1, full.shape[-1]))  # (out, in)
        return grad_x, None, grad_w, None


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's columns (input features) split: this rank holds x[..., its slice]
    (the output of a column-parallel layer) and computes a partial sum, summed over TP by an
    all-reduce, or under SP by a reduce-scatter that leaves (b, s/tp, out).

    The bias is replicated and added after the sum; under SP it sees only this rank's slice of
    the sequence, so its gradient is partial and it is marked `sequence_parallel`.
    """

    def __init__(self, linear: nn.Linear, dims: ParallelDims, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = dims.tp_group, sequence_parallel
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = shard_parameter(linear.weight, 1, dims)
        self.bias = linear.bias
        if self.bias is not None and sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (b, s, out): this rank's partial sum
        y = reduce_scatter_to_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias  # (b, s/tp, out) under SP, else (b, s, out)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, local_in={self.weight.shape[1]}, out={self.out_features}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocab (rows) split, padded to a multiple of tp with zero rows.

    Each rank looks up the ids in its row range and writes zeros for the others; the sum over
    TP (all-reduce, or under SP a reduce-scatter along the sequence) assembles the full lookup.
    Input (b, s) ids; output (b, s, h), or (b, s/tp, h) under SP.
    """

    def __init__(self, embedding: nn.Embedding, dims: ParallelDims, sequence_parallel: bool = False,
                 pad_to: int | None = None):
        super().__init__()
        if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
            raise ValueError("VocabParallelEmbedding supports plain embeddings only (no padding_idx, max_norm, sparse)")
        self.group, self.sequence_parallel = dims.tp_group, sequence_parallel
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        padded = pad_to or padded_vocab(embedding.num_embeddings, dims.tp)
        self.weight = shard_parameter(embedding.weight, 0, dims, padded)
        self.vocab_start = dims.tp_rank * self.weight.shape[0]
        self.vocab_end = self.vocab_start + self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        elsewhere = (ids < self.vocab_start) | (ids >= self.vocab_end)  # (b, s): another rank's rows
        local = (ids - self.vocab_start).masked_fill(elsewhere, 0)
        out = F.embedding(local, self.weight)  # (b, s, h)
        out = out.masked_fill_(elsewhere.unsqueeze(-1), 0.0)  # in place: embedding's backward needs only ids
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)  # (b, s/tp, h)
        return reduce_from_tp(out, self.group)  # (b, s, h)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows={self.vocab_start}:{self.vocab_end}, "
                f"sequence_parallel={self.sequence_parallel}")
