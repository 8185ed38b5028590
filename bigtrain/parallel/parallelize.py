"""Tensor parallelism for bigtrain.model.Transformer: which module becomes which parallel layer
(the "styles", keyed by module path), and the gradient helpers it implies.

parallelize() is the first step after building the plain model on the meta device (see
bigtrain.build for the whole order): it swaps layers for sharded ones, so it must see plain
modules; recompute then wraps whole blocks, whose forward already contains the collectives and
the RNG forks a replay must repeat; data parallelism comes last, since it registers hooks on
the final parameters.

Under sequence parallelism the residual stream, norms and dropout hold (b, s/tp, h); every
sublayer all-gathers the sequence once on entry and reduce-scatters on exit; the final norm's
output is gathered by the output layer, whose logits stay split over the vocab for the
vocab-parallel loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.parallel.dims import ParallelDims, padded_vocab
from bigtrain.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, is_sequence_parallel,
                                      is_sharded, mark_sequence_parallel)
from bigtrain.parallel.mappings import copy_to_tp, gather_from_sequence
from bigtrain.parallel.random import TP, TP_SEED_OFFSET, RNGTracker


@dataclass
class _Ctx:
    """What every style needs."""
    dims: ParallelDims
    sp: bool
    rng: RNGTracker
    vocab: int  # the padded vocab


Style = Callable[[nn.Module, _Ctx], "nn.Module | None"]  # returns a replacement, or None if changed in place


# --------------------------------------------------------------------------------------------
# Styles: what each does to one module


def column(m: nn.Linear, c: _Ctx) -> nn.Module:
    """Column-parallel; the parent's enter_tp_region already brought the input in."""
    return ColumnParallelLinear(m, c.dims, c.sp, input_ready=True)


def row(m: nn.Linear, c: _Ctx) -> nn.Module:
    return RowParallelLinear(m, c.dims, c.sp)


def vocab_embedding(m: nn.Embedding, c: _Ctx) -> nn.Module:
    return VocabParallelEmbedding(m, c.dims, c.sp, pad_to=c.vocab)


def vocab_output(m: nn.Linear, c: _Ctx) -> nn.Module:
    """Column-parallel over the padded vocab; logits stay split (the loss is vocab-parallel)."""
    return ColumnParallelLinear(m, c.dims, c.sp, pad_to=c.vocab)


def enter_tp_region(m: nn.Module, c: _Ctx) -> None:
    """Bring the sublayer's input into the TP region once, for all its column-parallel
    projections: one all-gather of the sequence under SP (reduce-scatter in backward), else one
    copy_to_tp (one all-reduce in backward) instead of one per projection."""
    group = c.dims.tp_group
    enter = gather_from_sequence if c.sp else copy_to_tp

    def pre_hook(module, args):
        return (enter(args[0], group), *args[1:])  # (b, s/tp, h) -> (b, s, h) under SP

    m.register_forward_pre_hook(pre_hook)


def tp_random(m: nn.Module, c: _Ctx) -> None:
    """Run the module under the "tp" RNG stream: its dropout acts on this rank's heads or
    sequence slice, so masks must differ between TP ranks (and the default generator, shared by
    the TP ranks for replicated tensors, must not advance here)."""
    m.register_forward_pre_hook(lambda module, args: c.rng.enter(TP))
    # always_call: leave the stream even if forward raises.
    m.register_forward_hook(lambda module, args, out: c.rng.exit(), always_call=True)


def sequence_parallel_params(m: nn.Module, c: _Ctx) -> None:
    """Replicated weights applied to a sequence slice: their gradients are partial sums, summed
    over TP by sync_sequence_parallel_grads."""
    for p in m.parameters():
        mark_sequence_parallel(p)


# --------------------------------------------------------------------------------------------
# Which module gets which style


def model_styles(sp: bool) -> dict[str, Style]:
    """Modules outside the blocks, keyed by path in the Transformer."""
    styles = {"tok_embeddings": vocab_embedding, "output": vocab_output}
    if sp:
        styles |= {"dropout": tp_random, "norm": sequence_parallel_params}  # both on (b, s/tp, h)
    return styles


def block_styles(sp: bool) -> dict[str, Style]:
    """Modules of one Block, keyed by path in the block. Parent entries come before children."""
    styles = {
        "attention": enter_tp_region,
        "attention.wq": column,  # n_heads/tp query heads per rank
        "attention.wk": column,  # n_kv_heads/tp kv heads per rank: exactly those its queries use
        "attention.wv": column,
        "attention.core_attention": tp_random,  # attention dropout on this rank's heads
        "attention.wo": row,
        "feed_forward": enter_tp_region,
        "feed_forward.w1": column,
        "feed_forward.w3": column,
        "feed_forward.w2": row,
    }
    if sp:
        styles |= {"attention_norm": sequence_parallel_params, "ffn_norm": sequence_parallel_params,
                 "dropout": tp_random}  # residual dropout on this rank's slice
    return styles


def apply_styles(root: nn.Module, styles: dict[str, Style], c: _Ctx) -> None:
    for path, style in styles.items():
        new = style(root.get_submodule(path), c)
        if new is not None:
            root.set_submodule(path, new)


def parallelize(model: nn.Module, dims: ParallelDims, rng: RNGTracker | None = None) -> nn.Module:
    """Apply tensor (and, if dims says so, sequence) parallelism to a plain Transformer whose
    config the job has validated for dims.tp; in place, returns it.

    rng: the tracker whose "tp" stream drives dropout in split regions (see random.seed_rng;
    recompute replays it too); None makes one seeded from 0. With tp == 1 the model is returned
    unchanged.
    """
    if dims.tp == 1:
        return model
    if rng is None:
        rng = RNGTracker()
        rng.add(TP, TP_SEED_OFFSET + dims.tp_rank)
    sp = dims.sequence_parallel
    c = _Ctx(dims, sp, rng, padded_vocab(model.cfg.vocab_size, dims.tp))
    apply_styles(model, model_styles(sp), c)
    for block in model.layers:
        apply_styles(block, block_styles(sp), c)
    if model.cfg.tie_embeddings:
        # Both shards are rows [r*v/tp, (r+1)*v/tp) of the same padded (v, h) matrix: one Parameter.
        model.output.weight = model.tok_embeddings.weight
    return model


# --------------------------------------------------------------------------------------------
# Gradients


def sync_sequence_parallel_grads(model: nn.Module, dims: ParallelDims) -> None:
    """Sum over TP the gradients of parameters marked `sequence_parallel` (norm weights under
    SP), each rank having seen only its slice of the sequence. Call after backward (and the
    data-parallel reduction, with which it commutes), before clipping. One all-reduce."""
    grads = [p.grad for p in model.parameters() if is_sequence_parallel(p) and p.grad is not None]
    if not grads or dims.tp_group is None:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=dims.tp_group)
    for g, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(summed)


def grad_norm(model: nn.Module, dims: ParallelDims) -> torch.Tensor:
    """Global L2 norm of the gradients, every parameter counted once: squares of sharded
    parameters are summed over the TP group, replicated ones (norm weights, row biases; already
    summed by sync_sequence_parallel_grads under SP) are counted once, not all-reduced. The
    result is the same on every rank; fp32."""
    sharded, replicated = [], []
    for p in model.parameters():  # tied parameters appear once
        if p.grad is not None:
            (sharded if is_sharded(p) else replicated).append(p.grad)
    if not sharded and not replicated:
        return torch.zeros(())
    device = (sharded or replicated)[0].device
    sharded_sq, replicated_sq = (_sum_sq(grads, device) for grads in (sharded, replicated))
    if dims.tp_group is not None:
        dist.all_reduce(sharded_sq, group=dims.tp_group)
    return (sharded_sq + replicated_sq).sqrt()


def _sum_sq(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float() ** 2


def clip_grad_norm(model: nn.Module, max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """Scale gradients so their global norm (grad_norm) is at most max_norm > 0. Returns the
    norm before clipping."""
    total = grad_norm(model, dims)
    grads = [p for p in model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return total
