"""The memory model: one rank's bytes over a training step, for a resolved Job.

- parameters, gradients and optimizer states, counted exactly from the model built on the meta
  device and sharded like the real run (vocab padding included), with ZeRO sharding and
  optimizer offload for the DeepSpeed engine;
- activations kept for backward: the per-block formula (bigtrain.planner.formula, exact
  against the saved-bytes accountant) for each span of the policy, plus what the embedding,
  final norm, output layer and loss keep;
- transients: the logits and the loss's fp32 copies at the end of forward, their gradients at
  the start of backward, the replay of one checkpointed span during backward, and AdamW's
  foreach temporary in the optimizer step;
- the peak is the maximum over the step -- end of forward, each span of backward (kept bytes
  shrink while gradients grow), optimizer step -- not a sum of everything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bigtrain.config import parse_bytes
from bigtrain.job import Job
from bigtrain.model import build_model
from bigtrain.parallel.dims import ParallelDims
from bigtrain.planner.cost import overhead
from bigtrain.planner.profile import Profile, head_profile, span_profile
from bigtrain.planner.formula import document_tensors, outside_tensors, span_bytes, span_pool_bytes
from bigtrain.recompute.policy import Span, final_norm_recomputed, keep_last_on_device
from bigtrain.recompute.saved import CHUNK_BYTES

GiB = 2**30


@dataclass
class Params:
    total: int  # parameters on this rank (tied weights once)
    decay: int  # in the weight-decay group (matrices)
    per_block: int  # of one block
    vocab: int  # of the embedding/output (tied: once)
    output: int  # of the output layer (its gradient is the first one backward allocates)
    largest: int = 0  # the largest parameter (this rank's shard): what a ZeRO-3 save gathers at once


def rank_params(job: Job) -> Params:
    """Exact parameter counts of one rank: the model built on meta and sharded like the run."""
    from bigtrain.parallel.parallelize import parallelize

    model = build_model(replace(job.cfg.model, dropout=0.0))
    if job.tp > 1:
        parallelize(model, ParallelDims(world_size=job.tp, rank=0, tp=job.tp, sequence_parallel=job.sp))
    seen, total, decay = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            decay += p.numel() if p.ndim >= 2 else 0
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    vocab = sum(p.numel() for p in {id(p): p for p in (model.tok_embeddings.weight, model.output.weight)}.values())
    largest = max(p.numel() for p in model.parameters())
    return Params(total, decay, per_block, vocab, model.output.weight.numel(), largest)


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


def model_states(job: Job, n: Params) -> States:
    p = job.cfg.parallel
    if p.engine == "ddp":
        # fp32 parameters and gradients (autocast computes in bf16, the weights stay fp32); DDP's
        # gradients are views of its buckets (gradient_as_bucket_view), allocated up front.
        return States(params=4 * n.total, grads=4 * n.total, optimizer=8 * n.total, buffers=0, host=0,
                      grads_persistent=job.dp > 1 or job.accum > 1, step_temp=4 * n.decay)
    # DeepSpeed ZeRO (approximate: DeepSpeed's own buffers are modelled, not cross-checked).
    pb = 2 if job.bf16 else 4  # bf16 engine: bf16 module weights and gradients
    dp, stage = job.dp, p.zero_stage
    master = 4 * n.total if pb == 2 else 0  # fp32 master weights next to bf16 ones
    optimizer = (master + 8 * n.total) // dp
    grads = (4 * n.total) // dp if stage >= 2 else pb * n.total  # fp32 partition vs full bf16/fp32
    params = pb * n.total // dp if stage == 3 else pb * n.total
    bucket = pb * min(n.total, p.zero_bucket_size)  # one reduction bucket (reduce_bucket_size), as configured
    if stage == 3:
        # gathered working set: this block and the prefetched next, or the output layer's weight
        bucket += max(2 * pb * n.per_block, pb * n.output * job.tp)
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
    host: int  # kept on the host: offloaded activations and optimizer states
    host_pinned: int  # the host pool's pinned reservation for the activations (whole chunks)
    overhead: float  # estimated extra step time from recompute/offload/partition, fraction
    activations: int  # kept on the device by the blocks at the end of forward
    host_total: int  # taken of the host: the pool's whole pinned chunks and offloaded optimizer states

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def estimate(job: Job, spans: list[Span], policy: str = "", n: Params | None = None) -> Estimate:
    """The memory (and extra time) of one rank under `spans`."""
    spans = keep_last_on_device(spans)  # as apply_recompute runs them
    n = n or rank_params(job)
    st = model_states(job, n)
    sh = job.shape
    pointwise = any(s.pointwise for s in spans)
    if pointwise and sh.flex:  # the forward then holds a dense mask (model.Transformer.positions)
        sh = replace(sh, flex=False, expand_kv=job.cfg.model.kv_heads < job.cfg.model.n_heads)
    on_cpu = job.device == "cpu"
    min_bytes = parse_bytes(job.cfg.recompute.offload_min_size)
    kept = [span_bytes(sh, s, min_bytes) for s in spans]
    kept_dev = [d for d, _ in kept]
    host_of = [h for _, h in kept]
    offloaded = sum(host_of)
    pooled = sum(span_pool_bytes(sh, s, min_bytes) for s in spans)  # each storage aligned in the pool
    pinned = -(-pooled // CHUNK_BYTES) * CHUNK_BYTES  # the pool pins whole chunks
    norm_recomputed = final_norm_recomputed(spans)
    outs = outside_tensors(sh, job.padded_vocab, norm_recomputed)
    outside = sum(outs.values())
    # kept until the embedding's backward; the document mask's tensors until the first block's
    ids = outs["embedding.ids"] + outs.get("embedding.dropout_mask", 0) + sum(document_tensors(sh).values())
    S = sh.b * sh.s
    Sr = S // job.tp if sh.sp else S
    D = 4 * Sr * job.cfg.model.dim  # one residual-stream tensor (fp32): a block's input, its gradient
    persistent = st.grads_persistent
    grads_up_front = st.grads if persistent else 0
    # On the CPU the host pool is the same memory as everything else: its whole chunks count.
    pool = pinned if on_cpu else 0
    base = st.params + st.optimizer + st.buffers + grads_up_front + pool
    # The transients of each span's forward and backward, from its real code on fake tensors.
    prof = [span_profile(sh, s.stop - s.start, s.checkpointed, tuple(s.modules), persistent, held=h > 0,
                         partition=s.partition) for s, h in zip(spans, host_of)]

    # Forward, span by span: what the earlier spans keep, this span's input and its transients.
    peak_fwd = max((base + ids + sum(kept_dev[:i]) + D + p.fwd_peak for i, p in enumerate(prof)), default=0)
    # Two spans of device->host copies may be in flight (CUDA): at the end of forward the last
    # offloaded span's tensors may still be on the device.
    in_flight = 0 if on_cpu else next((h for h in reversed(host_of) if h), 0)
    head = head_profile(sh, persistent, norm_recomputed)  # final norm, output layer, loss: their real code on fake tensors
    end_fwd = base + sum(kept_dev) + ids + outs["norm.input"] + head.fwd_peak + in_flight
    phases = {"forward": max(peak_fwd, end_fwd)}
    walk = _Walk(base, kept_dev, host_of, prof, head, ids, outside, D, persistent)
    phases["backward"] = _backward_peak(job, spans, walk, min_bytes)
    phases["optimizer step"] = st.params + st.grads + st.optimizer + st.buffers + st.step_temp + pool
    phases["checkpoint save"] = _save_phase(job, st, n) + pool
    activations = {"gradients": grads_up_front, "activations (blocks)": sum(kept_dev),
                   "activations (embedding, norm, loss)": outside}
    components = _components(phases, st, activations, pool)
    return Estimate(policy, spans, components, phases, st.host + offloaded, pinned, overhead(job, n, spans),
                    sum(kept_dev), st.host + pinned)


@dataclass(frozen=True)
class _Walk:
    """What backward's walk over the spans starts from (see `estimate`)."""
    base: int  # model states (and the CPU's pool) that live through the step
    kept_dev: list[int]  # per span: what it keeps on the device
    host_of: list[int]  # per span: what it keeps on the host
    prof: list[Profile]  # per span: its forward/backward transients
    head: Profile  # the final norm, output layer and loss
    ids: int  # the embedding's ids (and the document mask's tensors)
    outside: int  # what the embedding, final norm and loss keep
    D: int  # one residual-stream tensor (fp32): a block's input, its gradient
    persistent: bool  # the gradients exist before backward (accumulation, DDP buckets)


def _backward_peak(job: Job, spans: list[Span], w: _Walk, min_bytes: int) -> int:
    """The peak of backward: the head's first, while everything the forward kept is still there."""
    peak = w.base + sum(w.kept_dev) + w.outside + w.head.bwd_peak
    # Then the output layer and the final norm free what they kept; the output layer's gradient
    # is the first one backward allocates. Each span: its kept tensors, the incoming gradient,
    # its backward's transients (replays, temporaries, its gradients as they are made).
    grads = w.head.grads
    cur = w.base + sum(w.kept_dev) + w.ids  # the incoming gradient (D) is part of each span's profile
    ahead = _prefetched_gathers(job, spans, min_bytes)
    for i in range(len(spans) - 1, -1, -1):
        # An offloaded span's kept tensors come back to the device for its backward, and the
        # nearest earlier span with host copies is prefetched meanwhile (any span's backward
        # prefetches it, offloaded or not).
        prefetched = next((h for h in reversed(w.host_of[:i]) if h), 0)
        back = w.host_of[i] + prefetched
        peak = max(peak, cur + grads + w.prof[i].bwd_peak + back + ahead[i])
        cur -= w.kept_dev[i]
        grads += w.prof[i].grads if not w.persistent else 0
    # The embedding's backward makes a dense (v, h) gradient; accumulated, it is added into the
    # existing .grad in place; tied (and not accumulated), autograd's input buffer sums it with
    # the output layer's, still pending, out of place: a second temporary of the same size.
    one = 4 * (job.padded_vocab // job.tp) * job.cfg.model.dim
    tied = job.cfg.model.tie_embeddings
    emb = one * (2 if tied and not w.persistent else 1) if tied or w.persistent else 0
    return max(peak, cur + w.D + grads + emb)


def _prefetched_gathers(job: Job, spans: list[Span], min_bytes: int) -> list[int]:
    """Per span, the bytes of the previous span's all-gathered input that its backward holds:
    under full+partition a span's recompute starts the all-gather of the previous span's
    partitioned input (Stash.prefetch), when that span's piece stayed on the device."""
    sh = job.shape
    n = sh.b * sh.s * job.cfg.model.dim  # one block input (fp32)
    piece = -(-n // job.tp) * 4

    def partitioned(s: Span) -> bool:
        return s.checkpointed and s.partition and job.tp > 1 and not sh.sp

    out = [0] * len(spans)
    for i in range(1, len(spans)):
        prev = spans[i - 1]
        on_device = not prev.offload or piece < min_bytes
        if partitioned(spans[i]) and partitioned(prev) and on_device:
            out[i] = job.tp * piece
    return out


def _save_phase(job: Job, st: States, n: Params) -> int:
    """A checkpoint save (bigtrain.state.save_state, every train.save_every steps and at the end):
    between steps, each parameter is copied to the host (.cpu().clone(): on the CPU, a copy in
    the same memory); ZeRO-3 gathers them one at a time (engine.each_full_parameter), so it holds
    at most the largest one gathered beside its partitions."""
    pe = job.cfg.parallel
    pb = 2 if pe.engine == "deepspeed" and job.bf16 else 4
    full = pb * n.total
    kept_between = st.grads if pe.engine == "deepspeed" or job.dp > 1 else 0  # partitions, DDP buckets
    gathered = pb * n.largest if pe.engine == "deepspeed" and pe.zero_stage == 3 else 0
    return st.params + st.optimizer + st.buffers + kept_between + gathered + (full if job.device == "cpu" else 0)


def _components(phases: dict, st: States, activations: dict, pool: int) -> dict:
    """What is resident at the peak, by component (they add up to the peak). `activations`: the
    gradients that exist up front and the kept activations, resident in forward and backward."""
    states = {"parameters": st.params, "gradients": st.grads, "optimizer states": st.optimizer,
              "communication buffers": st.buffers}
    peak_phase = max(phases, key=phases.get)
    if peak_phase in ("optimizer step", "checkpoint save"):
        components = {**states, "activations (blocks)": 0, "activations (embedding, norm, loss)": 0,
                      "transient (logits, replay, optimizer)": phases[peak_phase] - sum(states.values()) - pool}
    else:
        components = {**states, **activations}
        components["transient (logits, replay, optimizer)"] = phases[peak_phase] - sum(components.values()) - pool
    components["host pool (on the CPU: same memory)"] = pool
    return components


def offload_reservation(job: Job, spans: list[Span]) -> tuple[int, int]:
    """(host bytes to pin, device bytes of reloads) for the offloaded spans: what the host pool
    and the side stream reserve at build time so that step 1 does not stall on allocating them.
    Reloads: a span's tensors and the prefetched earlier span's, at most two spans at once."""
    min_bytes = parse_bytes(job.cfg.recompute.offload_min_size)
    spans = keep_last_on_device(spans)
    host_of = [span_bytes(job.shape, s, min_bytes)[1] for s in spans]
    if not any(host_of):
        return 0, 0
    two = sorted(host_of)[-2:]
    return sum(span_pool_bytes(job.shape, s, min_bytes) for s in spans), sum(two)
