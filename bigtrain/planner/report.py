"""What `bigtrain plan` shows: the report as data (--json), as Markdown, and as a plot."""

from __future__ import annotations

from bigtrain.config import parse_bytes
from bigtrain.errors import UserError
from bigtrain.job import Job
from bigtrain.planner.memory import GiB, Estimate, estimate, rank_params
from bigtrain.planner.search import alternatives, choose_policy, mixed_name
from bigtrain.recompute.policy import spans_of


def report(job: Job, budget: int) -> dict:
    """Everything `bigtrain plan` prints, as data (the --json output)."""
    cfg = job.cfg
    n = rank_params(job)
    r = cfg.recompute
    if r.granularity == "auto":
        configured = choose_policy(job, parse_bytes(r.memory_budget))
    else:
        spans = spans_of(r, cfg.model.n_layers)
        configured = estimate(job, spans, mixed_name(spans), n)
    alts = alternatives(job)
    try:
        recommended = choose_policy(job, budget)
        why = None
    except UserError as e:
        recommended, why = None, str(e)
    return {
        "layout": {"world_size": job.world, "tp": job.tp, "dp": job.dp, "sequence_parallel": job.sp,
                   "micro_batch": job.shape.b, "seq_len": job.shape.s, "accumulation": job.accum,
                   "activation_bytes": job.shape.elem, "engine": cfg.parallel.engine,
                   "zero_stage": cfg.parallel.zero_stage if cfg.parallel.engine == "deepspeed" else None},
        "parameters_per_rank": n.total,
        "budget_bytes": budget,
        "configured": _as_dict(configured),
        "alternatives": [_as_dict(e) for e in alts],
        "recommended": _as_dict(recommended) if recommended else None,
        "nothing_fits": why,
    }


def _as_dict(e: Estimate) -> dict:
    return {"policy": e.policy, "peak_bytes": e.peak, "peak_phase": e.peak_phase, "components": e.components,
            "phases": e.phases, "activation_bytes": e.activations, "host_bytes": e.host, "host_pinned_bytes": e.host_pinned,
            "overhead": e.overhead}


def format_report(rep: dict) -> str:
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lay = rep["layout"]
    c = rep["configured"]
    lines = [f"layout: {lay['world_size']} GPUs, tp={lay['tp']} dp={lay['dp']} sequence_parallel={lay['sequence_parallel']}, "
             f"micro-batch {lay['micro_batch']} x seq {lay['seq_len']} ({lay['accumulation']} per step), "
             f"engine {lay['engine']}" + (f" ZeRO-{lay['zero_stage']}" if lay["zero_stage"] else "")
             + f"; {rep['parameters_per_rank'] / 1e6:,.1f}M parameters per rank (every rank holds the same amounts)",
             "", f"configured policy: {c['policy']}", "", "| component | GiB per rank |", "|---|---|"]
    lines += [f"| {k} | {g(v)} |" for k, v in c["components"].items()]
    lines += [f"| host memory (offloaded; pinned pool {g(c['host_pinned_bytes'])}) | {g(c['host_bytes'])} |",
              f"| **peak** ({c['peak_phase']}) | **{g(c['peak_bytes'])}** |", "",
              f"policies (all blocks alike), budget {g(rep['budget_bytes'])} GiB per GPU:", "",
              "| policy | activations GiB | peak GiB | peak in | host GiB | est. extra step time | fits |",
              "|---|---|---|---|---|---|---|"]
    for a in rep["alternatives"]:
        acts = a["activation_bytes"]
        fits = "yes" if a["peak_bytes"] <= rep["budget_bytes"] else "no"
        lines.append(f"| {a['policy']} | {g(acts)} | {g(a['peak_bytes'])} | {a['peak_phase']} | {g(a['host_bytes'])} "
                     f"| {100 * a['overhead']:.1f}% | {fits} |")
    lines.append("")
    if rep["recommended"]:
        r = rep["recommended"]
        lines.append(f"recommendation: {r['policy']} -- peak {g(r['peak_bytes'])} GiB, est. +{100 * r['overhead']:.1f}% "
                     f"step time (set recompute.granularity=auto recompute.memory_budget=... to get it per block)")
    else:
        lines.append(f"recommendation: none -- {rep['nothing_fits']}")
    sim = rep.get("simulated")
    if sim:
        lines += ["", f"dry run (rank 0, 2 real training steps on fake tensors with a fake process group, CPU code "
                      f"path), policy {sim['policy']}: simulated peak {g(sim['simulated_peak_bytes'])} GiB, planned "
                      f"{g(sim['planned_peak_bytes'])} GiB ({100 * sim['error']:+.2f}%), {sim['seconds']:.0f} s, "
                      f"max RSS {sim['max_rss_bytes'] / GiB:.2f} GiB"]
    return "\n".join(lines)


def plot(rep: dict, path: str) -> None:
    """Stacked bars of the components per policy (matplotlib), the budget as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'bigtrain[plot]'") from None
    alts = rep["alternatives"]
    keys = list(alts[0]["components"])
    fig, ax = plt.subplots(figsize=(10, 5))
    bottom = [0.0] * len(alts)
    for key in keys:
        vals = [a["components"][key] / GiB for a in alts]
        ax.bar(range(len(alts)), vals, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(rep["budget_bytes"] / GiB, color="black", linestyle="--", label="budget")
    ax.set_xticks(range(len(alts)), [a["policy"] for a in alts], rotation=25, ha="right")
    ax.set_ylabel("GiB per GPU (at the peak phase)")
    lay = rep["layout"]
    ax.set_title(f"memory per policy: tp={lay['tp']} dp={lay['dp']}, micro-batch {lay['micro_batch']} x {lay['seq_len']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
