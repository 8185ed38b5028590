"""The tensor-parallel plan for bigtrain.model.Transformer, and the gradient helpers it implies.

parallelize() is the first step after building the plain model on the meta device, in this
order (see DESIGN.md):
  1. tensor parallelism (here): swaps layers for sharded ones, so it must see plain modules;
  2. recompute: wraps whole blocks, whose forward then already contains the collectives and
     the RNG forks it must replay;
  3. torch.compile, if any: compiles the final per-block code;
  4. data parallelism (DDP / DeepSpeed) last: it registers hooks on the final parameters.
Then init_weights() materialises each rank's shards from the full, seeded tensors.

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

from bigtrain.errors import UserError
from bigtrain.parallel.dims import ParallelDims, check_model, padded_vocab
from bigtrain.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, is_sharded
from bigtrain.parallel.mappings import copy_to_tp, gather_from_sequence
from bigtrain.parallel.random import TP, TP_SEED_OFFSET, RNGTracker


@dataclass
class _Ctx:
    """What every plan entry needs."""
    dims: ParallelDims
    sp: bool
    rng: RNGTracker
    vocab: int  # the padded vocab


Style = Callable[[nn.Module, _Ctx], "nn.Module | None"]  # returns a replacement, or None if changed in place


# --------------------------------------------------------------------------------------------
# Styles: what a plan entry does to one module


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
        p.sequence_parallel = True


# --------------------------------------------------------------------------------------------
# The plan


def model_plan(sp: bool) -> dict[str, Style]:
    """Modules outside the blocks, keyed by path in the Transformer."""
    plan = {"tok_embeddings": vocab_embedding, "output": vocab_output}
    if sp:
        plan |= {"dropout": tp_random, "norm": sequence_parallel_params}  # both on (b, s/tp, h)
    return plan


def block_plan(sp: bool) -> dict[str, Style]:
    """Modules of one Block, keyed by path in the block. Parent entries come before children."""
    plan = {
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
        plan |= {"attention_norm": sequence_parallel_params, "ffn_norm": sequence_parallel_params,
                 "dropout": tp_random}  # residual dropout on this rank's slice
    return plan


def apply_plan(root: nn.Module, plan: dict[str, Style], c: _Ctx) -> None:
    for path, style in plan.items():
        new = style(root.get_submodule(path), c)
        if new is not None:
            root.set_submodule(path, new)


def parallelize(model: nn.Module, dims: ParallelDims, sequence_parallel: bool | None = None,
                rng: RNGTracker | None = None) -> nn.Module:
    """Apply tensor (and sequence) parallelism to a plain Transformer in place; returns it.

    sequence_parallel: None takes dims.sequence_parallel. rng: the tracker whose "tp" stream
    drives dropout in split regions (see random.seed_rng); None makes one seeded from 0. It is
    kept as model.rng_tracker for recompute. With tp == 1 the model is returned unchanged.
    """
    sp = dims.sequence_parallel if sequence_parallel is None else sequence_parallel
    if dims.tp == 1:
        if sp:
            raise UserError("sequence_parallel needs tp > 1 (it splits the sequence over the tensor-parallel ranks)")
        return model
    cfg = model.cfg
    check_model(cfg, dims.tp)
    if rng is None:
        rng = RNGTracker()
        rng.add(TP, TP_SEED_OFFSET + dims.tp_rank)
    c = _Ctx(dims, sp, rng, padded_vocab(cfg.vocab_size, dims.tp))
    apply_plan(model, model_plan(sp), c)
    for block in model.layers:
        apply_plan(block, block_plan(sp), c)
    if cfg.tie_embeddings:
        # Both shards are rows [r*v/tp, (r+1)*v/tp) of the same padded (v, h) matrix: one Parameter.
        model.output.weight = model.tok_embeddings.weight
    model.rng_tracker = rng
    return model


# --------------------------------------------------------------------------------------------
# Gradients


def sync_sequence_parallel_grads(model: nn.Module, dims: ParallelDims) -> None:
    """Sum over TP the gradients of parameters marked `sequence_parallel` (norm weights under
    SP), each rank having seen only its slice of the sequence. Call after backward (and the
    data-parallel reduction, with which it commutes), before clipping. One all-reduce."""
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
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
    """Scale gradients so their global norm (grad_norm) is at most max_norm (0 only measures).
    Returns the norm before clipping."""
    total = grad_norm(model, dims)
    if max_norm > 0:
        grads = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return total
