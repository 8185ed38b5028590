"""Activation memory as a knob: full, selective, CPU-offloaded and partitioned recompute.

    apply_recompute(model, dims, cfg.recompute, rng=rng)             # after parallelize()
    with ActivationAccountant(model) as acc:                         # what a forward keeps
        loss = ...
    print(acc.report)

Modules: checkpoint (the RNG-exact, input-preserving checkpoint function), saved (where kept
tensors live: device or host pool, with prefetch), pointwise (op-level selective recompute:
matmul and attention outputs kept, elementwise ops replayed), policy (config -> runner and wrappers),
accounting (the saved-bytes accountant; the formula it is checked against is
bigtrain.planner.formula).
"""

from bigtrain.recompute.accounting import ActivationAccountant, ActivationReport
from bigtrain.recompute.checkpoint import Stash, checkpoint, is_recomputing
from bigtrain.recompute.policy import SELECTIVE_MODULES, BlockRunner, Recomputed, apply_recompute, spans_of

__all__ = ["ActivationAccountant", "ActivationReport", "Stash", "checkpoint", "is_recomputing",
           "SELECTIVE_MODULES", "BlockRunner", "Recomputed", "apply_recompute", "spans_of"]
