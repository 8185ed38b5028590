"""Will it fit? Per-rank memory of a config and layout before launch, and the activation policy
chosen from a memory budget (`recompute.granularity: auto`, `bigtrain plan`).

The memory model, per rank (every rank of a tp x dp layout holds the same amounts):

- parameters, gradients and optimizer states, counted exactly from the model built on the meta
  device and sharded like the real run (vocab padding included), with ZeRO sharding and
  optimizer offload for the DeepSpeed engine;
- activations kept for backward: bigtrain.recompute.accounting's per-block formula (exact against
  the saved-bytes accountant) for each span of the policy, plus what the embedding, final norm,
  output layer and loss keep;
- transients: the logits and the loss's fp32 copies at the end of forward, their gradients at
  the start of backward, the replay of one checkpointed span during backward, and AdamW's
  foreach temporary in the optimizer step;
- the peak is the maximum over the step -- end of forward, each span of backward (kept bytes
  shrink while gradients grow), optimizer step -- not a sum of everything.

It is checked against the real allocations of the model's step under fake tensors
(`fake_peak`, MemTracker: no memory is allocated) in tests/test_plan.py.

The cost model for choosing a policy estimates the extra time of a step from FLOPs and bytes:
recomputed FLOPs at hardware.peak_tflops * hardware.mfu, recomputed elementwise modules at
hardware.memory_bandwidth, offload copies beyond what the block's own compute hides at
hardware.host_bandwidth, and partition all-gathers (not overlapped) at hardware.tp_bandwidth.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace

import torch

from bigtrain.config import Config, parse_bytes
from bigtrain.errors import UserError
from bigtrain.model import build_model
from bigtrain.parallel.dims import ParallelDims, check_layout, check_model, check_sequence, padded_vocab
from bigtrain.recompute.accounting import Shape, outside_tensors, saved_tensors, span_bytes
from bigtrain.recompute.policy import Span

GiB = 2**30

# Candidate policies for one block, by name: what auto chooses among (and the plan table lists).
CANDIDATES = {
    "none": Span(0, 1),
    "selective(norm,mlp_act)": Span(0, 1, modules=("norm", "mlp_act")),
    "selective(norm,mlp)": Span(0, 1, modules=("norm", "mlp")),
    "full": Span(0, 1, checkpointed=True),
    "full+partition": Span(0, 1, checkpointed=True, partition=True),
    "offload": Span(0, 1, offload=True),
    "full+offload": Span(0, 1, checkpointed=True, offload=True),
    "full+partition+offload": Span(0, 1, checkpointed=True, partition=True, offload=True),
}


@dataclass(frozen=True)
class Layout:
    """One rank's place and what the step looks like there."""
    world: int
    tp: int
    dp: int
    sp: bool
    accum: int  # micro-batches per optimizer step
    device: str  # "cuda" (the target of a plan) or "cpu"
    shape: Shape  # the block formula's inputs
    vocab: int  # padded to a multiple of tp


def layout_of(cfg: Config, world: int, device: str = "cuda") -> Layout:
    """Validate cfg for `world` ranks (the same checks a launch makes) and describe one rank."""
    if cfg.model.vocab_size <= 0:
        from bigtrain.trainer import resolve_vocab

        resolve_vocab(cfg)  # from data.path's meta.json (a clear error if there is none)
    tp, dp = check_layout(world, cfg.parallel.tp, cfg.parallel.dp)
    check_model(cfg.model, tp)
    if cfg.parallel.sequence_parallel:
        check_sequence(cfg.train.seq_len, tp)
    t = cfg.train
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size({t.global_batch_size}) is not a multiple of "
                        f"train.micro_batch_size({t.micro_batch_size}) * dp({dp}) = {per_step}")
    autocast = t.dtype == "bf16" or (t.dtype == "auto" and device == "cuda")
    elem = 2 if autocast else 4
    on_cpu = device == "cpu"
    shape = Shape(cfg.model, t.micro_batch_size, t.seq_len, tp, cfg.parallel.sequence_parallel, elem,
                  mask_bytes=elem if on_cpu else 1, math_attention=on_cpu and cfg.model.dropout > 0)
    return Layout(world, tp, dp, cfg.parallel.sequence_parallel, t.global_batch_size // per_step, device, shape,
                  padded_vocab(cfg.model.vocab_size, tp))


# --------------------------------------------------------------------------------------------
# Model states


@dataclass
class Params:
    total: int  # parameters on this rank (tied weights once)
    decay: int  # in the weight-decay group (matrices)
    per_block: int  # of one block
    vocab: int  # of the embedding/output (tied: once)
    output: int  # of the output layer (its gradient is the first one backward allocates)


def rank_params(cfg: Config, lay: Layout) -> Params:
    """Exact parameter counts of one rank: the model built on meta and sharded like the run."""
    from bigtrain.parallel.parallelize import parallelize

    model = build_model(replace(cfg.model, dropout=0.0))
    if lay.tp > 1:
        parallelize(model, ParallelDims(world_size=lay.tp, rank=0, tp=lay.tp), sequence_parallel=lay.sp)
    seen, total, decay = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            decay += p.numel() if p.ndim >= 2 else 0
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    vocab = sum(p.numel() for p in {id(p): p for p in (model.tok_embeddings.weight, model.output.weight)}.values())
    return Params(total, decay, per_block, vocab, model.output.weight.numel())


@dataclass
class States:
    """Bytes of parameters, gradients and optimizer on one rank (device unless said)."""
    params: int
    grads: int
    optimizer: int  # AdamW moments (+ fp32 master weights under DeepSpeed bf16)
    buffers: int  # communication buckets
    host: int  # optimizer states offloaded to the host
    grads_persistent: bool  # gradients exist during forward (DDP buckets, accumulation, DeepSpeed)
    step_temp: int  # AdamW foreach temporary during the optimizer step


def model_states(cfg: Config, lay: Layout, n: Params) -> States:
    p = cfg.parallel
    if p.engine == "ddp":
        # fp32 parameters and gradients (autocast computes in bf16, the weights stay fp32); DDP's
        # gradients are views of its buckets (gradient_as_bucket_view), allocated up front.
        return States(params=4 * n.total, grads=4 * n.total, optimizer=8 * n.total, buffers=0, host=0,
                      grads_persistent=lay.dp > 1 or lay.accum > 1, step_temp=4 * n.decay)
    # DeepSpeed ZeRO (approximate: DeepSpeed's own buffers are modelled, not cross-checked).
    pb = 2 if lay.shape.elem == 2 else 4  # bf16 engine: bf16 module weights and gradients
    dp, stage = lay.dp, p.zero_stage
    master = 4 * n.total if pb == 2 else 0  # fp32 master weights next to bf16 ones
    optimizer = (master + 8 * n.total) // dp
    grads = (4 * n.total) // dp if stage >= 2 else pb * n.total  # fp32 partition vs full bf16/fp32
    params = pb * n.total // dp if stage == 3 else pb * n.total
    bucket = pb * min(n.total, 500_000_000)  # reduce_bucket_size's default, 5e8 elements
    if stage == 3:
        # gathered working set: this block and the prefetched next, or the output layer's weight
        bucket += max(2 * pb * n.per_block, pb * n.output * lay.tp)
    host = 0
    if p.offload_optimizer:
        host, optimizer = optimizer, 0
    return States(params, grads, optimizer, bucket, host, grads_persistent=True,
                  step_temp=0 if p.offload_optimizer else 4 * n.decay // dp)


# --------------------------------------------------------------------------------------------
# The peak over one step


@dataclass
class Estimate:
    """One rank's memory for one policy: components, phases and the peak (bytes)."""
    policy: str
    spans: list[Span]
    components: dict[str, int]
    phases: dict[str, int]
    host: int
    overhead: float  # estimated extra step time from recompute/offload/partition, fraction
    activations: int  # kept on the device by the blocks at the end of forward

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def estimate(cfg: Config, lay: Layout, spans: list[Span], policy: str = "", n: Params | None = None) -> Estimate:
    """The memory (and extra time) of one rank under `spans`."""
    n = n or rank_params(cfg, lay)
    st = model_states(cfg, lay, n)
    sh = lay.shape
    min_bytes = parse_bytes(cfg.recompute.offload_min_size)
    kept = [span_bytes(sh, s, min_bytes) for s in spans]
    kept_dev = [d for d, _ in kept]
    outside = sum(outside_tensors(sh, lay.vocab).values())
    S, v_local = sh.b * sh.s, lay.vocab // lay.tp
    # End of forward: the logits (elem bytes) while the loss makes its fp32 softmax; with bf16
    # logits at tp=1, F.cross_entropy also makes an fp32 copy first.
    logits_fwd = sh.elem * S * v_local + (4 * S * v_local if sh.elem == 2 and lay.tp == 1 else 0)
    # Start of backward. tp=1: F.cross_entropy's two fp32 gradients (of the log-probabilities,
    # then of the logits) live together. tp>1: the vocab-parallel loss turns its kept softmax
    # into the gradient in place; only a bf16 copy is new.
    logits_bwd = 8 * S * v_local if lay.tp == 1 else (sh.elem * S * v_local if sh.elem == 2 else 0)
    grads_up_front = st.grads if st.grads_persistent else 0
    base = st.params + st.optimizer + st.buffers + grads_up_front
    phases = {"forward": base + sum(kept_dev) + outside + logits_fwd}
    # Backward, span by span from the last: kept bytes are freed as gradients are allocated;
    # a checkpointed span first replays its blocks (their none-mode activations).
    # Gradients allocated by backward itself (when they do not exist up front): the output
    # layer's first, then each block's as its backward runs (the embedding's comes last).
    grad_bytes = 0 if st.grads_persistent else st.grads // max(1, n.total)
    cur = base + sum(kept_dev) + outside
    peak_bwd = cur + logits_bwd  # before the output layer's backward allocates its gradient
    grads = grad_bytes * n.output
    none_block = sum(saved_tensors(sh).values())
    host_of = [h for _, h in kept]
    for i in range(len(spans) - 1, -1, -1):
        span, dev = spans[i], kept_dev[i]
        replay = none_block * (span.stop - span.start) if span.checkpointed else 0
        # An offloaded span's kept tensors come back to the device for its backward, and the
        # span before it is prefetched at the same time.
        back = host_of[i] + (host_of[i - 1] if i > 0 else 0)
        peak_bwd = max(peak_bwd, cur + grads + replay + back)
        cur -= dev
        grads += grad_bytes * n.per_block * (span.stop - span.start)
    phases["backward"] = peak_bwd
    phases["optimizer step"] = st.params + st.grads + st.optimizer + st.buffers + st.step_temp
    # What is resident at the peak, by component (they add up to the peak).
    states = {"parameters": st.params, "gradients": st.grads, "optimizer states": st.optimizer,
              "communication buffers": st.buffers}
    peak_phase = max(phases, key=phases.get)
    if peak_phase == "optimizer step":
        components = {**states, "activations (blocks)": 0, "activations (embedding, norm, loss)": 0,
                      "transient (logits, replay, optimizer)": st.step_temp}
    else:
        components = {**states, "gradients": grads_up_front, "activations (blocks)": sum(kept_dev),
                      "activations (embedding, norm, loss)": outside}
        components["transient (logits, replay, optimizer)"] = phases[peak_phase] - sum(components.values())
    host = st.host + sum(h for _, h in kept)
    return Estimate(policy, spans, components, phases, host, overhead(cfg, lay, n, spans), sum(kept_dev))


# --------------------------------------------------------------------------------------------
# Time


def overhead(cfg: Config, lay: Layout, n: Params, spans: list[Span]) -> float:
    """Estimated extra time of the step under `spans`, as a fraction of the no-recompute step."""
    hw, sh, m = cfg.hardware, lay.shape, cfg.model
    flops = hw.peak_tflops * 1e12 * hw.mfu
    S, t = sh.b * sh.s, lay.tp
    attn_fwd = 4 * S * sh.s * m.dim / t  # q k^T and probs v over the full square (as flops_per_token)
    mlp_fwd = 2 * S * 3 * m.dim * m.hidden / t
    block_fwd = 2 * S * n.per_block + attn_fwd  # n.per_block is already this rank's share
    step = 3 * (m.n_layers * block_fwd + 2 * S * n.vocab) / flops
    hbm, host, tpbw = hw.memory_bandwidth * 1e9, hw.host_bandwidth * 1e9, hw.tp_bandwidth * 1e9
    Sr = S // t if sh.sp else S
    min_bytes = parse_bytes(cfg.recompute.offload_min_size)
    extra = 0.0
    for span in spans:
        k = span.stop - span.start
        fwd_time = k * block_fwd / flops
        if span.checkpointed:
            extra += fwd_time
        for name in span.modules:
            if name == "mlp":
                extra += k * mlp_fwd / flops
            elif name == "core_attn":
                extra += k * attn_fwd / flops
            elif name == "norm":
                extra += k * 2 * 3 * 4 * Sr * m.dim / hbm  # read the input, write two outputs, per norm
            elif name == "mlp_act":
                extra += k * 3 * sh.elem * S * m.hidden / t / hbm
        if span.offload:
            moved = span_bytes(sh, span, min_bytes)[1] / host
            # device->host during the span's forward, host->device during the next span's backward
            extra += max(0.0, moved - fwd_time) + max(0.0, moved - 2 * fwd_time)
        if span.partition and t > 1 and not sh.sp:
            extra += 4 * S * m.dim * (t - 1) / t / tpbw  # the replay's all-gather, not overlapped
    return extra / step


# --------------------------------------------------------------------------------------------
# Policies: the configured one, the alternatives, and auto's choice


def candidate_names(lay: Layout) -> list[str]:
    names = list(CANDIDATES)
    if lay.tp == 1 or lay.sp:  # partition does nothing there
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


def alternatives(cfg: Config, lay: Layout) -> list[Estimate]:
    """Every candidate policy applied to all blocks."""
    n = rank_params(cfg, lay)
    return [estimate(cfg, lay, uniform(name, cfg.model.n_layers), name, n) for name in candidate_names(lay)]


def choose_policy(cfg: Config, lay: Layout, budget: int) -> Estimate:
    """The least estimated overhead that fits `budget`: every candidate for all blocks, and every
    mix of two candidates (the first k blocks under one, the rest under the other), which is
    where the optimum of this knapsack over identical blocks lies. UserError if nothing fits."""
    n = rank_params(cfg, lay)
    L = cfg.model.n_layers
    names = candidate_names(lay)
    best = None
    for a, b in itertools.product(names, names):
        for k in range(1 if a != b else L, L + 1) if a != b else [L]:
            spans = mixed(a, k, b, L)
            name = a if k == L else mixed_name(spans)
            est = estimate(cfg, lay, spans, name, n)
            if est.peak <= budget and (best is None or (est.overhead, est.peak) < (best.overhead, best.peak)):
                best = est
    if best is None:
        raise UserError(_nothing_fits(cfg, lay, budget, n))
    return best


def _nothing_fits(cfg: Config, lay: Layout, budget: int, n: Params) -> str:
    smallest = min((estimate(cfg, lay, uniform(x, cfg.model.n_layers), x, n) for x in candidate_names(lay)),
                   key=lambda e: e.peak)
    msg = (f"no activation policy fits {budget / GiB:.1f} GiB per GPU: the smallest, {smallest.policy}, needs "
           f"{smallest.peak / GiB:.1f} GiB ({(smallest.peak - budget) / GiB:.1f} GiB over, peak in the "
           f"{smallest.peak_phase})")
    instead = suggestions(cfg, lay, budget)
    return "; ".join([msg, *instead]) if instead else msg + "; nothing simple fits either (more GPUs?)"


def suggestions(cfg: Config, lay: Layout, budget: int) -> list[str]:
    """What would fit instead: more tensor parallelism, a smaller micro-batch, optimizer offload."""
    out = []
    # more GPUs for the same data-parallel size
    tries = [(f"parallel.tp={tp} (with {tp * lay.dp} GPUs)", {"parallel.tp": tp}, tp * lay.dp)
             for tp in (lay.tp * 2, lay.tp * 4)]
    if cfg.train.micro_batch_size > 1:
        mb = cfg.train.micro_batch_size // 2
        tries.append((f"train.micro_batch_size={mb}", {"train.micro_batch_size": mb}, lay.world))
    if cfg.parallel.engine == "ddp" or not cfg.parallel.offload_optimizer:
        tries.append(("parallel.engine=deepspeed parallel.zero_stage=1 parallel.offload_optimizer=true",
                      {"parallel.engine": "deepspeed", "parallel.zero_stage": 1, "parallel.offload_optimizer": True},
                      lay.world))
    for text, changes, world in tries:
        c = copy.deepcopy(cfg)
        for key, value in changes.items():
            section, name = key.split(".")
            setattr(getattr(c, section), name, value)
        try:
            l2 = layout_of(c, world, lay.device)
            best = min((estimate(c, l2, uniform(x, c.model.n_layers), x) for x in candidate_names(l2)),
                       key=lambda e: e.peak)
        except UserError:
            continue
        if best.peak <= budget:
            out.append(f"{text} fits with {best.policy} ({best.peak / GiB:.1f} GiB)")
    return out[:3]


# --------------------------------------------------------------------------------------------
# Report


def report(cfg: Config, world: int, budget: int, device: str = "cuda") -> dict:
    """Everything `bigtrain plan` prints, as data (the --json output)."""
    lay = layout_of(cfg, world, device)
    n = rank_params(cfg, lay)
    r = cfg.recompute
    if r.granularity == "auto":
        configured = choose_policy(cfg, lay, parse_bytes(r.memory_budget))
    else:
        from bigtrain.recompute.policy import spans as spans_of

        plan = spans_of(r, cfg.model.n_layers)
        configured = estimate(cfg, lay, plan, mixed_name(plan), n)
    alts = alternatives(cfg, lay)
    try:
        recommended = choose_policy(cfg, lay, budget)
        why = None
    except UserError as e:
        recommended, why = None, str(e)
    return {
        "layout": {"world_size": world, "tp": lay.tp, "dp": lay.dp, "sequence_parallel": lay.sp,
                   "micro_batch": lay.shape.b, "seq_len": lay.shape.s, "accumulation": lay.accum,
                   "activation_bytes": lay.shape.elem, "engine": cfg.parallel.engine,
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
            "phases": e.phases, "activation_bytes": e.activations, "host_bytes": e.host, "overhead": e.overhead}


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
    lines += [f"| host memory (offloaded) | {g(c['host_bytes'])} |",
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


# --------------------------------------------------------------------------------------------
# Cross-check against real allocations under fake tensors


def fake_peak(cfg: Config, spans: list[Span] | None = None, steps: int = 1) -> dict:
    """Peak memory (bytes by MemTracker category, and "Total") of `steps` real training steps of
    the single-process model (tp=1, plain AdamW) under FakeTensorMode: the real ops and
    allocations, no real memory. fp32 on the CPU unless train.dtype=bf16 (CPU autocast)."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from bigtrain.optim import build_optimizer
    from bigtrain.recompute.policy import apply_recompute

    t = cfg.train
    with FakeTensorMode():
        model = build_model(cfg.model, device="cpu")
        apply_recompute(model, ParallelDims.single(), cfg.recompute, plan=spans)
        optimizer = build_optimizer(model, cfg.optim)
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.dtype == "bf16", cache_enabled=False)  # as the trainer
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(steps):
                with autocast:
                    logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
                del logits
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        snap = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(snap.values()))
    return {str(getattr(k, "value", k)): v for k, v in per_device.items()}
