"""train.loss_chunk: the output layer and the loss computed a chunk of positions at a time, each
chunk's logits recomputed in backward (parallel.loss.chunked_cross_entropy).

Against the whole-sequence loss: the same per-token losses summed in another order (per chunk,
then over chunks) and the output layer's weight gradient accumulated over the chunks, so the
loss agrees to fp32 rounding (1e-6 relative) and the gradients to 1e-5 relative of each
tensor's largest entry, at tp=1, tp=2 and tp=2 with sequence parallelism; the whole-model
layouts are in tests/test_distributed_train.py (LAYOUTS *_loss_chunks). The memory saving is
checked by the planner's matrix against the real trainer (tests/test_plan_matrix.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigtrain.config import ConfigError, ModelConfig, load_config
from bigtrain.model import build_model, init_weights
from bigtrain.parallel.dims import ParallelDims
from bigtrain.parallel.loss import chunked_cross_entropy, cross_entropy
from bigtrain.parallel.parallelize import parallelize
from bigtrain.parallel.random import seed_rng
from tests.multiproc import run_ranks

LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5


def _run(dims: ParallelDims, chunk: int):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=301, max_seq_len=64,
                      dropout=0.0, tie_embeddings=True)
    model = build_model(cfg)
    if dims.tp > 1:
        parallelize(model, dims, seed_rng(0, dims))
    init_weights(model, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (3, 33), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    if chunk:
        loss = model(x, None, lambda h, out: chunked_cross_entropy(h, out, y, chunk, dims.tp_group, cfg.vocab_size,
                                                                   dims.sequence_parallel))
    else:
        loss = cross_entropy(model(x), y, dims.tp_group, cfg.vocab_size)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(dims: ParallelDims, chunks=(4, 6, 31)) -> list[tuple]:
    ref_loss, ref_grads = _run(dims, 0)
    out = []
    for chunk in chunks:  # a divisor of 32, one that is not, one that leaves a single position
        loss, grads = _run(dims, chunk)
        worst = max(((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item() for n in ref_grads)
        out.append((chunk, abs(loss.item() / ref_loss.item() - 1), worst))
    return out


def _check(results):
    for chunk, loss_err, grad_err in results:
        assert loss_err <= LOSS_RTOL and grad_err <= GRAD_RTOL, (chunk, loss_err, grad_err)


def test_chunked_loss_equals_the_whole_one():
    _check(_compare(ParallelDims.single()))


def _tp2(rank, world, sp):
    return _compare(ParallelDims.build(world, rank, tp=2, sequence_parallel=sp), chunks=(4, 6, 30))


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_chunked_loss_at_tp2(sp):
    for results in run_ranks(_tp2, 2, sp, timeout=120):
        _check(results)


def test_loss_chunk_under_sequence_parallelism_is_a_multiple_of_tp():
    with pytest.raises(ConfigError, match=r"train.loss_chunk\(5\) must be a multiple of parallel.tp\(2\)"):
        load_config("configs/debug.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true", "train.loss_chunk=5"])
    with pytest.raises(ConfigError, match="train.loss_chunk=-1 must be >= 0"):
        load_config("configs/debug.yaml", ["train.loss_chunk=-1"])


@pytest.mark.parametrize("vocab_size", [None, 250])  # 250 of 256 columns: the padding ones carry no mass
@pytest.mark.parametrize("in_place", [False, True])
def test_vocab_parallel_loss_at_one_rank_equals_torchs(in_place, vocab_size):
    """The chunks' loss (the vocab-parallel function with a one-rank group, softmax in the
    logits' own buffer) against F.cross_entropy: per-token losses and logits gradients to fp32
    rounding; in place, the logits' buffer then holds the softmax."""
    from bigtrain.parallel.loss import _VocabParallelCrossEntropy

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 7, 256, generator=g) * 4
    targets = torch.randint(0, vocab_size or 256, (3, 7), generator=g)
    grad = torch.randn(3, 7, generator=g)
    ref_in = base.clone().requires_grad_()
    kept = ref_in[..., :vocab_size] if vocab_size else ref_in
    ref = F.cross_entropy(kept.flatten(0, 1), targets.flatten(), reduction="none").view(3, 7)
    ref.backward(grad)

    leaf = base.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a matmul's output is
    losses, probs = _VocabParallelCrossEntropy.apply(logits, targets, None, vocab_size, in_place)
    losses.backward(grad)
    torch.testing.assert_close(losses, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad, ref_in.grad, rtol=1e-5, atol=1e-7)
    if in_place:
        assert probs is logits and logits.data_ptr() == probs.data_ptr()
    else:
        assert probs is None and torch.equal(logits.detach(), base)  # the caller's logits untouched


def test_a_chunk_holds_one_logits_buffer():
    """train.loss_chunk's point: one chunk's forward holds its fp32 logits once (the softmax is
    made in them), not the logits and a log-softmax beside them."""
    from bigtrain.parallel.loss import _chunk_loss_sum
    from bigtrain.planner.profile import LiveBytes

    h, v, b, c = 32, 1024, 2, 64
    output = torch.nn.Linear(h, v, bias=False)
    hidden = torch.randn(b, c, h, requires_grad=True)
    targets = torch.randint(0, v, (b, c))
    live = LiveBytes()
    live.add(output.weight)  # (the matmul's weight.t() is a view of it: not a new storage)
    with live:
        start = live.restart_peak()
        loss = _chunk_loss_sum(hidden, output, targets, None, v)
    logits_bytes = 4 * b * c * v
    assert logits_bytes <= live.peak - start <= logits_bytes + 64 * 1024, live.peak - start
    loss.backward()
    assert hidden.grad is not None and output.weight.grad is not None
