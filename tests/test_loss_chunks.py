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
