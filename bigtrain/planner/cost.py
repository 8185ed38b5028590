"""The cost model: the extra time a policy adds to a step, estimated from FLOPs and bytes.

Recomputed FLOPs at hardware.peak_tflops * hardware.mfu, recomputed elementwise modules (norm,
mlp_act, pointwise) at hardware.memory_bandwidth, offload copies beyond what the neighbouring
spans' compute hides at hardware.host_bandwidth (copy_exposure), and partition all-gathers at
hardware.tp_bandwidth (exposed for the first of backward; each later one is started during the
next span's recompute and backward).
These rank policies against each other; they are not measurements.
"""

from __future__ import annotations

from bigtrain.config import parse_bytes
from bigtrain.job import Job
from bigtrain.planner.formula import span_bytes
from bigtrain.recompute.policy import Span, keep_last_on_device


def overhead(job: Job, n, spans: list[Span]) -> float:
    """Estimated extra time of the step under `spans`, as a fraction of the no-recompute step.
    n: this rank's parameter counts (memory.Params)."""
    hw, sh, m = job.cfg.hardware, job.shape, job.cfg.model
    flops = hw.peak_tflops * 1e12 * hw.mfu
    S, t = sh.b * sh.s, job.tp
    attn_fwd = 4 * S * sh.s * m.dim / t  # q k^T and probs v over the full square (as flops_per_token)
    mlp_fwd = 2 * S * 3 * m.dim * m.hidden / t
    block_fwd = _block_fwd(job, n)
    step = 3 * (m.n_layers * block_fwd + 2 * S * n.vocab) / flops
    hbm, tpbw = hw.memory_bandwidth * 1e9, hw.tp_bandwidth * 1e9
    Sr = S // t if sh.sp else S
    min_bytes = parse_bytes(job.cfg.recompute.offload_min_size)
    extra = 0.0
    spans = keep_last_on_device(spans)  # as apply_recompute runs them
    for i, span in enumerate(spans):
        k = span.stop - span.start
        fwd_time = k * block_fwd / flops
        next_fwd = (spans[i + 1].stop - spans[i + 1].start) * block_fwd / flops if i + 1 < len(spans) else 0.0
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
            elif name == "pointwise":
                extra += k * _pointwise_bytes(job) / hbm
        if span.partition and t > 1 and not sh.sp:
            gather = 4 * S * m.dim * (t - 1) / t / tpbw
            nxt = spans[i + 1] if i + 1 < len(spans) else None
            piece_on_device = not span.offload or 4 * -(-S * m.dim // t) < min_bytes
            if nxt is not None and nxt.checkpointed and nxt.partition and piece_on_device:
                # started by the next span's replay (Stash.prefetch): hidden behind that span's
                # recompute and backward, about three of its forwards
                extra += max(0.0, gather - 3 * next_fwd)
            else:
                extra += gather  # the first of backward, or after an unpartitioned span: exposed
    extra += sum(d2h + h2d for _, d2h, h2d in copy_exposure(job, n, spans).values())
    return extra / step


def copy_exposure(job: Job, n, spans: list[Span]) -> dict[str, tuple[float, float, float]]:
    """Per offloaded span's label (after keep_last_on_device): (one-way copy seconds, exposed
    device->host seconds, exposed host->device seconds) for one micro-batch. Device->host runs
    during this span's and the next one's forward (two spans of copies in flight); host->device
    is prefetched from the start of the next span's backward: its replay (if checkpointed) and
    its backward, about twice its forward."""
    hw, sh = job.cfg.hardware, job.shape
    flops = hw.peak_tflops * 1e12 * hw.mfu
    block_fwd = _block_fwd(job, n)
    min_bytes = parse_bytes(job.cfg.recompute.offload_min_size)
    spans = keep_last_on_device(spans)
    out = {}
    for i, span in enumerate(spans):
        if not span.offload:
            continue
        fwd = (span.stop - span.start) * block_fwd / flops
        nxt = spans[i + 1] if i + 1 < len(spans) else None
        next_fwd = (nxt.stop - nxt.start) * block_fwd / flops if nxt is not None else 0.0
        next_bwd = (next_fwd if nxt is not None and nxt.checkpointed else 0.0) + 2 * next_fwd
        moved = span_bytes(sh, span, min_bytes)[1] / (hw.host_bandwidth * 1e9)
        out[span.label] = (moved, max(0.0, moved - fwd - next_fwd), max(0.0, moved - next_bwd))
    return out


def _block_fwd(job: Job, n) -> float:
    """One block's forward FLOPs on this rank: its matmuls and attention's two s x s products."""
    sh, m = job.shape, job.cfg.model
    S = sh.b * sh.s
    return 2 * S * n.per_block + 4 * S * sh.s * m.dim / job.tp  # n.per_block is already this rank's share


def _pointwise_bytes(job: Job) -> float:
    """Bytes one block's elementwise replay reads and writes (recompute.modules pointwise): the two
    RMSNorms and two residual adds on the fp32 stream, RoPE on q and k, the SwiGLU product and,
    in its backward, silu(gate) once more (SwiGLU.lean), the casts of the matmul inputs
    (bigtrain.recompute.pointwise)."""
    sh, m, t = job.shape, job.cfg.model, job.tp
    S = sh.b * sh.s
    Sr = S // t if sh.sp else S
    kv = m.kv_heads * m.head_dim
    stream = 2 * (4 + 4 + sh.elem) * Sr * m.dim + 2 * 3 * 4 * Sr * m.dim  # norms (in, weight, out), adds
    rope = 2 * sh.elem * S * (m.dim + kv) / t  # read and write q and k
    swiglu = 5 * sh.elem * S * m.hidden / t  # read gate and up, write the product; read gate, write silu
    return stream + rope + swiglu
