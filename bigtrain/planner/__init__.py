"""Will it fit? Per-rank memory of a job before launch, and the activation policy chosen from a
memory budget (`recompute.granularity: auto`, `bigtrain plan`).

    job = resolve(cfg, world=8, device="cuda")
    est = estimate(job, spans_of(cfg.recompute, cfg.model.n_layers))   # est.peak, est.phases
    best = choose_policy(job, budget)                                 # the cheapest that fits

Modules: formula (what one block keeps for backward, per policy), memory (the memory model: states, activations, transients, the peak over a step),
cost (the extra time of a policy), search (candidates, mixes, auto's choice, suggestions),
report (the `bigtrain plan` table, JSON and plot), simulate (a real step under fake tensors,
the cross-check).
"""

from bigtrain.planner.cost import overhead
from bigtrain.planner.memory import Estimate, Params, States, estimate, model_states, rank_params
from bigtrain.planner.report import format_report, plot, report
from bigtrain.planner.search import (CANDIDATES, alternatives, candidate_names, choose_policy, choose_recompute,
                                     host_budget, mixed, mixed_name, suggestions, uniform)
from bigtrain.planner.simulate import fake_peak, simulate_configured, simulated_peak

__all__ = ["overhead", "Estimate", "Params", "States", "estimate", "model_states", "rank_params",
           "format_report", "plot", "report", "CANDIDATES", "alternatives", "candidate_names", "choose_policy",
           "choose_recompute", "host_budget", "mixed", "mixed_name", "suggestions", "uniform", "fake_peak",
           "simulate_configured", "simulated_peak"]
