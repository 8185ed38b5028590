"""Policy search: the candidate policies for one block, mixes of two, and the cheapest that fits
a memory budget (`recompute.granularity: auto`); what else would fit when nothing does."""

from __future__ import annotations

import itertools
import os
from dataclasses import replace

from bigtrain.config import Config, parse_bytes
from bigtrain.errors import UserError
from bigtrain.job import Job
from bigtrain.planner.memory import GiB, Estimate, Params, estimate, rank_params
from bigtrain.recompute.policy import Span

# Candidate policies for one block, by name: what auto chooses among (and the plan table lists).
CANDIDATES = {
    "none": Span(0, 1),
    "selective(norm,mlp_act)": Span(0, 1, modules=("norm", "mlp_act")),
    "selective(norm,mlp)": Span(0, 1, modules=("norm", "mlp")),
    "selective(pointwise)": Span(0, 1, modules=("pointwise",)),
    "full": Span(0, 1, checkpointed=True),
    "full+partition": Span(0, 1, checkpointed=True, partition=True),
    "offload": Span(0, 1, offload=True),
    "full+offload": Span(0, 1, checkpointed=True, offload=True),
    "full+partition+offload": Span(0, 1, checkpointed=True, partition=True, offload=True),
}


def candidate_names(job: Job) -> list[str]:
    names = list(CANDIDATES)
    if job.tp == 1 or job.sp:  # partition does nothing there
        names = [k for k in names if "partition" not in k]
    return names


def uniform(name: str, n_layers: int) -> list[Span]:
    c = CANDIDATES[name]
    return [replace(c, start=i, stop=i + 1) for i in range(n_layers)]


def mixed(first: str, k: int, rest: str, n_layers: int) -> list[Span]:
    """The first k blocks under `first` (their activations live longest), the others under `rest`."""
    return uniform(first, n_layers)[:k] + uniform(rest, n_layers)[k:]


def mixed_name(spans: list[Span]) -> str:
    """e.g. "full" (every span alike) or "full+offload x6 + selective(norm,mlp_act) x26"."""
    groups = [(p, len(list(g))) for p, g in itertools.groupby(s.policy for s in spans)]
    if len(groups) == 1:
        return groups[0][0]
    return " + ".join(f"{p} x{k}" for p, k in groups)


def alternatives(job: Job) -> list[Estimate]:
    """Every candidate policy applied to all blocks."""
    n = rank_params(job)
    return [estimate(job, uniform(name, job.cfg.model.n_layers), name, n) for name in candidate_names(job)]


HOST_SHARE = 0.8  # of the node's RAM, for offload under auto: the rest for the OS, loaders, page cache


def host_budget(job: Job) -> int | None:
    """Host bytes one rank may fill with offloaded activations and optimizer states under auto
    (recompute.host_memory_budget); None on the CPU, where the host is the device and its budget
    is memory_budget's."""
    if job.device == "cpu":
        return None
    text = job.cfg.recompute.host_memory_budget
    if text != "auto":
        return parse_bytes(text, "recompute.host_memory_budget")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # torchrun sets LOCAL_WORLD_SIZE; planning elsewhere, a node holds the job or 8 GPUs of it.
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or min(job.world, 8))
    return int(HOST_SHARE * ram) // per_node


def choose_policy(job: Job, budget: int) -> Estimate:
    """The least estimated overhead that fits `budget` on the device and host_budget(job) on the
    host: every candidate for all blocks, and every mix of two candidates (the first k blocks
    under one, the rest under the other), which is where the optimum of this knapsack over
    identical blocks lies. UserError if nothing fits."""
    n = rank_params(job)
    L = job.cfg.model.n_layers
    names = candidate_names(job)
    host = host_budget(job)
    best = over_host = None
    for a, b in itertools.product(names, names):
        for k in range(1 if a != b else L, L + 1) if a != b else [L]:
            spans = mixed(a, k, b, L)
            name = a if k == L else mixed_name(spans)
            est = estimate(job, spans, name, n)
            if est.peak > budget:
                continue
            if host is not None and est.host_total > host:
                over_host = over_host or est
                continue
            if best is None or (est.overhead, est.peak) < (best.overhead, best.peak):
                best = est
    if best is None:
        raise UserError(_nothing_fits(job, budget, n, (over_host, host)))
    return best


def _nothing_fits(job: Job, budget: int, n: Params, over_host: tuple) -> str:
    est, host = over_host
    if est is not None:  # the device budget is met by offloading more than the host may take
        return (f"no activation policy fits {budget / GiB:.1f} GiB per GPU within recompute.host_memory_budget "
                f"({host / GiB:.1f} GiB per rank): {est.policy} fits the GPU but puts {est.host_total / GiB:.1f} GiB "
                f"on the host; raise recompute.host_memory_budget if the node has it, or see bigtrain plan")
    smallest = smallest_policy(job, n)
    msg = (f"no activation policy fits {budget / GiB:.1f} GiB per GPU: the smallest, {smallest.policy}, needs "
           f"{smallest.peak / GiB:.1f} GiB ({(smallest.peak - budget) / GiB:.1f} GiB over, peak in the "
           f"{smallest.peak_phase})")
    instead = suggestions(job, budget)
    return "; ".join([msg, *instead]) if instead else msg + "; nothing simple fits either (more GPUs?)"


def smallest_policy(job: Job, n: Params | None = None) -> Estimate:
    """The candidate (all blocks alike) with the lowest peak."""
    n = n or rank_params(job)
    return min((estimate(job, uniform(x, job.cfg.model.n_layers), x, n) for x in candidate_names(job)),
               key=lambda e: e.peak)


def suggestions(job: Job, budget: int) -> list[str]:
    """What would fit instead: more tensor parallelism, a smaller micro-batch, optimizer offload."""
    from bigtrain.job import resolve

    out, cfg = [], job.cfg
    # more GPUs for the same data-parallel size
    tries = [(f"parallel.tp={tp} (with {tp * job.dp} GPUs)", {"parallel.tp": tp}, tp * job.dp)
             for tp in (job.tp * 2, job.tp * 4)]
    if cfg.train.micro_batch_size > 1:
        mb = cfg.train.micro_batch_size // 2
        tries.append((f"train.micro_batch_size={mb}", {"train.micro_batch_size": mb}, job.world))
    if cfg.parallel.engine == "ddp" or not cfg.parallel.offload_optimizer:
        tries.append(("parallel.engine=deepspeed parallel.zero_stage=1 parallel.offload_optimizer=true",
                      {"parallel.engine": "deepspeed", "parallel.zero_stage": 1, "parallel.offload_optimizer": True},
                      job.world))
    for text, changes, world in tries:
        try:
            best = smallest_policy(resolve(_changed(cfg, changes), world, job.device))
        except UserError:
            continue
        if best.peak <= budget:
            out.append(f"{text} fits with {best.policy} ({best.peak / GiB:.1f} GiB)")
    return out[:3]


def _changed(cfg: Config, changes: dict) -> Config:
    """A copy of cfg with {"section.key": value} changed (cfg itself is not touched)."""
    sections = {}
    for key, value in changes.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return replace(cfg, **{s: replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


def choose_recompute(job: Job) -> tuple[list[Span] | None, str]:
    """For recompute.granularity=auto: the per-block policy that fits recompute.memory_budget
    with the least estimated overhead, and a table explaining it; (None, "") otherwise."""
    r = job.cfg.recompute
    if r.granularity != "auto":
        return None, ""
    budget = parse_bytes(r.memory_budget)
    chosen = choose_policy(job, budget)
    full = estimate(job, uniform("full", job.cfg.model.n_layers), "full")
    g = 2.0 ** 30
    host = host_budget(job)
    on_host = f", host {chosen.host_total / g:.2f} of {host / g:.2f} GiB" if host is not None else ""
    text = (f"recompute.granularity=auto, budget {budget / g:.2f} GiB per GPU{on_host}: chose {chosen.policy}\n"
            "| policy | est. peak GiB | peak in | est. extra step time |\n|---|---|---|---|\n"
            f"| {chosen.policy} (chosen) | {chosen.peak / g:.2f} | {chosen.peak_phase} | {100 * chosen.overhead:.1f}% |\n"
            f"| full, every block | {full.peak / g:.2f} | {full.peak_phase} | {100 * full.overhead:.1f}% |")
    return chosen.spans, text
