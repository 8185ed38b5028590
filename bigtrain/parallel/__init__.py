"""Tensor and sequence parallelism for the plain model in bigtrain/model.py.

    dims = ParallelDims.build(world_size, rank, tp=2)       # ranks and process groups
    rng = seed_rng(seed, dims)                              # default + "tp" RNG streams
    model = parallelize(build_model(cfg), dims, rng=rng)    # swap in sharded layers (meta)
    init_weights(model, seed)                               # each rank keeps its slice
    loss = cross_entropy(model(tokens), targets, dims.tp_group, cfg.vocab_size)

Import from the modules themselves (this package imports nothing, so that config.py can use
the layout rules in dims without importing the layers). Modules: dims (layout and validation), mappings (conjugate autograd collectives), layers
(column/row-parallel linear, vocab-parallel embedding), loss (vocab-parallel cross-entropy),
random (named RNG states), parallelize (the plan, gradient sync and norm).
"""
