"""Cross-entropy over logits whose vocab is split over the TP ranks (Megatron's vocab-parallel
cross-entropy): the full (b, s, v) logits are never gathered, only three (b*s,) vectors are
all-reduced: the max, the sum of exponentials and the target logit. The chunked loss
(train.loss_chunk) uses the same function at every tp, in place on each chunk's logits.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint

from bigtrain.model import document_ids
from bigtrain.parallel.mappings import group_rank, group_size


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group=None, vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over all tokens, computed in fp32.

    logits: (..., v_local), this rank's vocab slice (ranks in tp_rank order) when `group` has
    more than one rank, else the full (..., v). targets: (...) global token ids in [0, vocab).
    Columns at or past `vocab_size` (tp padding) are excluded; None keeps every column.
    """
    if group_size(group) == 1:
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())
    losses, _ = _VocabParallelCrossEntropy.apply(logits, targets, group, vocab_size, False)
    return losses.mean()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token loss log(sum_v exp(z_v)) - z_target from vocab-split logits, with
    all-reduces (max, then sum-exp and target logit together) over `group` (none when it has
    one rank: the whole vocab is here).
    Backward: purely local: softmax minus one-hot on this rank's slice, times the incoming
    gradient; no communication, since each rank owns its columns' gradient.

    logits (..., v/tp), targets (...) -> losses (...), and the logits themselves: with
    `in_place` and fp32 logits, the softmax is computed in the logits' own buffer (marked
    dirty: autograd then knows the tensor now holds this function's output), so one
    logits-sized buffer exists instead of two. Only for logits nothing else reads (the matmul
    that makes them does not save its output); the second output is that buffer."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_size, in_place):
        n_local = logits.shape[-1]
        start = group_rank(group) * n_local
        split = group_size(group) > 1
        if in_place and logits.dtype == torch.float32:
            z = logits
            ctx.mark_dirty(logits)
        else:
            z = logits.to(torch.float32, copy=True)  # our own fp32 buffer, modified in place below
        if vocab_size is not None and start + n_local > vocab_size:
            z[..., max(0, vocab_size - start):] = float("-inf")  # padding columns: no softmax mass
        zmax = z.amax(dim=-1)  # (...)
        if split:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
        z.sub_(zmax.unsqueeze(-1))  # the max shift cancels in the loss; it only prevents overflow

        elsewhere = (targets < start) | (targets >= start + n_local)  # target owned by another rank
        local_t = (targets - start).masked_fill(elsewhere, 0)
        target_z = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(elsewhere, 0.0)  # (...)
        probs = z.exp_()  # (..., v/tp), in place: z is no longer needed
        sums = torch.stack([probs.sum(dim=-1), target_z])  # (2, ...): one all-reduce for both
        if split:
            dist.all_reduce(sums, group=group)
        sum_exp, target_z = sums.unbind(0)
        probs.div_(sum_exp.unsqueeze(-1))  # softmax over the full vocab

        ctx.save_for_backward(probs, local_t, elsewhere)
        ctx.logits_dtype = logits.dtype
        ctx.set_materialize_grads(False)
        return sum_exp.log() - target_z, (probs if z is logits else None)

    @staticmethod
    def backward(ctx, grad_loss, _grad_probs):
        # (_grad_probs: nothing reads the overwritten logits, so no gradient comes through them)
        probs, local_t, elsewhere = ctx.saved_tensors
        # d loss / d z = softmax - onehot(target). Reuses the saved softmax in place (it is as
        # large as the logits), so this graph cannot be backpropagated twice (retain_graph).
        grad = probs
        grad.scatter_add_(-1, local_t.unsqueeze(-1), (elsewhere.to(grad.dtype) - 1.0).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, output, targets: torch.Tensor, chunk: int, group=None,
                          vocab_size: int | None = None, sequence_parallel: bool = False) -> torch.Tensor:
    """cross_entropy(output(hidden), targets), `chunk` positions at a time (train.loss_chunk):
    each chunk's logits exist only while that chunk runs, in forward and again in backward
    (torch's checkpoint recomputes the chunk: one more output-layer forward per step), and its
    softmax is made in them when they are fp32 (the vocab-parallel function, also at tp=1: one
    fp32 buffer per chunk, not logits and a log-softmax; under bf16 autocast the bf16 logits and
    one fp32 copy); equal to the whole loss to fp32 rounding.

    hidden: (b, s, h) final hidden states, or this rank's (b, s/tp, h) under sequence
    parallelism, where the output layer all-gathers each chunk: rank r's positions [r s/tp + k c/tp,
    ... + c/tp) for chunk k, whose targets are cut the same way. targets: (b, s) token ids."""
    b, s = targets.shape
    n = group_size(group) if sequence_parallel else 1
    local = hidden.shape[1]  # s / n
    step = max(1, chunk // n)
    per_rank = targets.view(b, n, local)  # (b, n, s/n): rank r's positions in row r
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, local, step):
        part = per_rank[:, :, start:start + step].reshape(b, -1)  # (b, n * c/n), in gather order
        total = total + torch_checkpoint.checkpoint(_chunk_loss_sum, hidden[:, start:start + step], output, part,
                                                    group, vocab_size, use_reentrant=False)
    return total / (b * s)


def _chunk_loss_sum(hidden, output, targets, group, vocab_size):
    """The summed loss of one chunk, its softmax made in its fp32 logits' buffer (nothing else
    reads them): the chunk's peak is one (b, c, v/tp) fp32 buffer, not the logits and a
    log-softmax (bf16 logits under autocast: those and one fp32 copy)."""
    logits = output(hidden)  # (b, c, v/tp)
    losses, _ = _VocabParallelCrossEntropy.apply(logits, targets, group, vocab_size, True)  # (b, c)
    return losses.sum()


def step_loss(model, batch: torch.Tensor, job, dims) -> torch.Tensor:
    """Mean next-token loss of a (b, s+1) batch of token ids through `model` (the engine's: a
    data-parallel wrapper or the module itself), as every training step computes it -- the
    trainer's and the planner's dry run alike: the document ids (data.document_mask), the
    compute dtype, the loss whole or in chunks (train.loss_chunk), vocab-parallel over dims' TP group."""
    x, y = batch[:, :-1], batch[:, 1:]  # (b, s), (b, s)
    cfg = job.cfg
    # (a dry run without data has no EOS id; where documents end does not change the bytes)
    documents = document_ids(x, job.eos_id if job.eos_id is not None else 0) if cfg.data.document_mask else None
    vocab, chunk = cfg.model.vocab_size, job.shape.loss_chunk
    if chunk:
        # the output layer and the loss chunk by chunk, inside forward (so wrappers see one step)
        head = functools.partial(chunked_cross_entropy, targets=y, chunk=chunk, group=dims.tp_group,
                                 vocab_size=vocab, sequence_parallel=dims.sequence_parallel)
        with job.autocast():
            return model(x, documents, head)
    with job.autocast():
        logits = model(x, documents)  # (b, s, v/tp)
    return cross_entropy(logits, y, group=dims.tp_group, vocab_size=vocab)
