"""Tensor and sequence parallelism for the plain model in bigtrain/model.py.

    dims = ParallelDims.build(world_size, rank, tp=2)       # ranks and process groups
    rng = seed_rng(seed, dims)                              # default + "tp" RNG streams
    model = parallelize(build_model(cfg), dims, rng=rng)    # swap in sharded layers (meta)
    init_weights(model, seed)                               # each rank keeps its slice
    loss = cross_entropy(model(tokens), targets, dims.tp_group, cfg.vocab_size)

Modules: dims (layout and validation), mappings (conjugate autograd collectives), layers
(column/row-parallel linear, vocab-parallel embedding), loss (vocab-parallel cross-entropy),
random (named RNG states), parallelize (the plan, gradient sync and norm).
"""

from bigtrain.parallel.dims import ParallelDims, check_layout, check_model, check_sequence, padded_vocab, vocab_padding_note
from bigtrain.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, full_from_shards, is_sharded
from bigtrain.parallel.loss import cross_entropy
from bigtrain.parallel.parallelize import clip_grad_norm, grad_norm, parallelize, sync_sequence_parallel_grads
from bigtrain.parallel.random import RNGTracker, get_default_rng_state, seed_rng, set_default_rng_state

__all__ = [
    "ParallelDims", "check_layout", "check_model", "check_sequence", "padded_vocab", "vocab_padding_note",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "full_from_shards", "is_sharded",
    "cross_entropy", "parallelize", "sync_sequence_parallel_grads", "grad_norm", "clip_grad_norm",
    "RNGTracker", "seed_rng", "get_default_rng_state", "set_default_rng_state",
]
