"""What a block keeps for backward, predicted: the formula, our block's counterpart of
Korthikanti et al.'s Table 2, derived op by op for this model (RMSNorm, RoPE, GQA through fused
SDPA, SwiGLU) and checked against the accountant (bigtrain.recompute.accounting) in
tests/test_recompute.py. With S = b*s tokens, Sr = S/t under sequence parallelism (else S),
e = bytes per activation element (4 fp32, 2 bf16; no autocast), kv = n_kv_heads*head_dim,
f = ffn_hidden, a = n_heads, per block:

    each RMSNorm      input in fp32 4*Sr*h + rstd 4*Sr + normalised 4*Sr*h (fp32, saved
                      before the cast back)
    each norm output  e*Sr*h      (saved by the projections in the compute dtype; under SP only
                      this rank's slice, cast before the all-gather, all-gathered again in backward)
    fused attention   e*S*(2h + 2kv)/t  (q, k after rotary, v, output) + lse 4*S*a/t
    SwiGLU MLP        4*e*S*f/t   (gate, up, silu(gate), product)
    dropout p > 0     mask_bytes*Sr*h per residual branch (bool on CUDA, e bytes on CPU); CPU
                      attention with dropout falls back to the math kernel, which stores the
                      s x s probabilities: q, k, v (expanded to all heads) and the output copy
                      4*e*S*h/t, plus probabilities, mask and dropped probabilities 3*e*S*a*s/t

    bf16 autocast     autograd also saves the bf16 copies of the block's linear weights,
                      2*(2h^2 + 2h*kv + 3hf)/t, but a span does not keep them: saved.py keeps a
                      handle to the parameter and casts again in backward (a replay of a
                      checkpointed span, which torch's hooks hold, still has them)

fp32, no dropout, t = 1: S * (32h + 8kv + 16f + 4a + 8) bytes; for Llama-2-7B shapes (kv = h,
f = 2.69h) that is ~83 S*h bytes per block, against 4 S*h (its fp32 input) with full recompute.
Recomputing modules removes their saved tensors and keeps their inputs instead:
norm -> rstd and the normalised tensor go; mlp_act -> silu(gate) goes; core_attn -> only the
lse goes with fused attention (its output is the out-projection's saved input anyway, and the
s x s scores were never stored); mlp -> the four MLP tensors go (and under SP the MLP's input
is kept as the 1/t slice instead of the all-gathered sequence).

pointwise (op-level: bigtrain.recompute.pointwise) keeps the block's fp32 input 4*Sr*h and the
outputs of its matmuls and attention, nothing elementwise:

    q, k, v (before RoPE)   e*S*(h + 2kv)/t
    fused attention         output e*S*h/t + lse 4*S*a/t (math kernel, CPU dropout: the scores
                            q k^T e*S*a*s/t and probabilities @ v e*S*h/t)
    out-projection          e*Sr*h (after its all-reduce / reduce-scatter: the second half's
                            input, kept by its stash; under SP this rank's slice)
    gate, up                2*e*S*f/t
    dropout p > 0           mask_bytes*Sr*h of the last residual add only (the other is replayed)

the down-projection's output is not kept (only the last residual add reads it). With core_attn
the attention terms go (the kernel runs again; so also with attention dropout in a fused CUDA
kernel, which draws it); with mlp, gate and up go (w1, w3 run again).
fp32, no dropout, t = 1: S * (16h + 8kv + 8f + 4a) bytes, against S * (32h + 8kv + 16f + 4a + 8)
without recompute.
"""


from __future__ import annotations

from bigtrain.config import RecomputeConfig, parse_bytes
from bigtrain.job import Shape  # noqa: F401 - the formula's input, defined with the job
from bigtrain.model import FLEX_BLOCK, mask_row
from bigtrain.recompute.policy import keep_last_on_device, spans_of
from bigtrain.recompute.saved import POOL_ALIGN



def saved_tensors(sh: Shape) -> dict[str, int]:
    """Every storage one block saves for backward without recompute, name -> bytes.

    Parameters are fp32, so the residual stream, the norms and the norm outputs are fp32 (4
    bytes) even under bf16 autocast; what the matmuls and attention save is `elem` bytes, and
    autocast adds the bf16 copy of every linear weight (saved by its matmul; what a replay
    holds -- a span itself keeps a handle to the parameter instead, see `_selective`).
    """
    m, t, e = sh.model, sh.tp, sh.elem
    S = sh.b * sh.s
    Sr = S // t if sh.sp else S  # residual-stream tokens on this rank
    h, kv, f, a = m.dim, m.kv_heads * m.head_dim, m.hidden, m.n_heads
    out: dict[str, int] = {}
    for norm in ("attention_norm", "ffn_norm"):
        out[f"{norm}.input"] = 4 * Sr * h
        out[f"{norm}.rstd"] = 4 * Sr
        out[f"{norm}.normalised"] = 4 * Sr * h
    # The norm output as the projections keep it: whole, in the compute dtype; under SP this
    # rank's 1/t slice (cast before the all-gather under autocast, re-gathered in backward:
    # parallel.mappings, parallel.layers).
    proj_in = e * Sr * h
    out["attention.input"] = proj_in
    if sh.math_attention:
        for name in ("q_scaled", "k_expanded", "v_expanded", "output"):
            out[f"attention.core.{name}"] = e * S * h // t
        for name in ("probs", "mask", "dropped"):
            out[f"attention.core.{name}"] = e * S * a * sh.s // t
    else:
        kv_kept = h if sh.expand_kv else kv  # a dense document mask on CUDA: the kv heads repeated
        out["attention.core.q"] = e * S * h // t
        out["attention.core.k"] = e * S * kv_kept // t
        out["attention.core.v"] = e * S * kv_kept // t
        out["attention.core.output"] = e * S * h // t
        out["attention.core.lse"] = 4 * S * a // t
    out["feed_forward.input"] = proj_in
    for name in ("gate", "up", "silu", "product"):
        out[f"feed_forward.{name}"] = e * S * f // t
    if m.dropout > 0:
        out["attention.dropout_mask"] = sh.mask_bytes * Sr * h
        out["feed_forward.dropout_mask"] = sh.mask_bytes * Sr * h
    if sh.autocast:
        out["attention.weights_bf16"] = 2 * (2 * h * h + 2 * h * kv) // t
        out["feed_forward.weights_bf16"] = 2 * 3 * h * f // t
    return out


def outside_tensors(sh: Shape, vocab: int, norm_recomputed: bool = False) -> dict[str, int]:
    """What the forward keeps outside the blocks: embedding, final norm, output layer, loss.

    `vocab` is the padded vocabulary (a multiple of tp). The logits themselves are not kept
    (the loss keeps its fp32 softmax instead); they are a transient, see bigtrain.planner.memory.
    norm_recomputed: the final norm runs again in backward (the last span is pointwise, see
    policy.final_norm_recomputed): it keeps only its input.
    """
    m, t, e = sh.model, sh.tp, sh.elem
    S = sh.b * sh.s
    Sr = S // t if sh.sp else S
    # ids: the inputs are a view of the (b, s + 1) token batch, whose whole storage is kept
    out = {"embedding.ids": 8 * sh.b * (sh.s + 1), "norm.input": 4 * Sr * m.dim, "norm.rstd": 4 * Sr,
           "norm.normalised": 4 * Sr * m.dim, "output.input": e * S * m.dim}
    if norm_recomputed:
        del out["norm.rstd"], out["norm.normalised"]
    if m.dropout > 0:  # on the fp32 embedding output: a 4-byte mask on the CPU, bool on CUDA
        out["embedding.dropout_mask"] = (1 if sh.mask_bytes == 1 else 4) * Sr * m.dim
    if sh.autocast:
        out["output.weight_bf16"] = 2 * vocab * m.dim // t
    if sh.loss_chunk:
        # train.loss_chunk: the chunks' checkpoints keep only their inputs -- views of the final
        # norm's fp32 output, and under SP each chunk's targets cut in gather order (a copy)
        for key in ("output.input", "output.weight_bf16"):
            out.pop(key, None)
        out["loss_chunks.hidden"] = 4 * Sr * m.dim
        if sh.sp and t > 1:
            out["loss_chunks.targets"] = 8 * S
    elif t == 1:
        out["loss.log_softmax"] = 4 * S * vocab
        out["loss.targets"] = 8 * S
        out["loss.total_weight"] = 4
    else:  # vocab-parallel cross-entropy
        out["loss.softmax"] = 4 * S * vocab // t
        out["loss.local_targets"] = 8 * S
        out["loss.elsewhere"] = S
    out.update(document_tensors(sh))
    return out


def document_tensors(sh: Shape) -> dict[str, int]:
    """What data.document_mask holds for the whole step (model.Positions, shared by all blocks):
    each token's document id (int64), its rotary angles (fp32 (b, s, d/2, 2)) and the mask --
    dense (b, 1, s, s) in the attention dtype, or a flex BlockMask of 128 x 128 blocks (four
    int32 index tensors of (b, 1, n, n) and four counts of (b, 1, n), n = ceil(s / 128)). (A
    model with a pointwise span holds a dense one: planner.memory.estimate clears sh.flex.)"""
    if not sh.documents:
        return {}
    b, s = sh.b, sh.s
    out = {"documents.ids": 8 * b * s, "documents.rope": 4 * b * s * sh.model.head_dim}
    if sh.flex:
        n = -(-s // FLEX_BLOCK)
        out["documents.block_mask"] = 4 * 4 * b * n * n + 4 * 4 * b * n
    else:
        out["documents.mask"] = sh.elem * b * s * mask_row(s)  # rows padded for CUDA's kernels
    return out


def _selective(sh: Shape, modules: list[str]) -> dict[str, int]:
    """What one block keeps when `modules` are recomputed (none: everything)."""
    m, t, e = sh.model, sh.tp, sh.elem
    S = sh.b * sh.s
    Sr = S // t if sh.sp else S
    kept = saved_tensors(sh)
    # the weight casts are recast in backward, not kept (see saved.parameter_cast_of)
    kept.pop("attention.weights_bf16", None)
    kept.pop("feed_forward.weights_bf16", None)
    if "norm" in modules:
        for norm in ("attention_norm", "ffn_norm"):
            del kept[f"{norm}.rstd"], kept[f"{norm}.normalised"]  # the stash keeps the input
    if "mlp_act" in modules:
        del kept["feed_forward.silu"]
    if "core_attn" in modules:
        if sh.math_attention:
            for name in ("q_scaled", "k_expanded", "v_expanded", "probs", "mask", "dropped"):
                del kept[f"attention.core.{name}"]
            kv = m.kv_heads * m.head_dim
            kept["attention.core.q"] = e * S * m.dim // t
            kept["attention.core.k"] = e * S * kv // t
            kept["attention.core.v"] = e * S * kv // t
        else:
            del kept["attention.core.lse"]
    if "mlp" in modules:
        for name in ("gate", "up", "silu", "product"):
            del kept[f"feed_forward.{name}"]
        kept["feed_forward.input"] = 4 * Sr * m.dim  # the stash keeps the MLP's own (fp32) input
    return kept


def _pointwise(sh: Shape, modules: list[str]) -> dict[str, int]:
    """What one block keeps under op-level recompute (see the module docstring)."""
    m, t, e = sh.model, sh.tp, sh.elem
    S = sh.b * sh.s
    Sr = S // t if sh.sp else S
    h, kv, f, a = m.dim, m.kv_heads * m.head_dim, m.hidden, m.n_heads
    kept = {"input": 4 * Sr * h, "attention.wq": e * S * h // t, "attention.wk": e * S * kv // t,
            "attention.wv": e * S * kv // t, "attention.wo": e * Sr * h}
    # attention dropout outside the math kernel (CUDA): the fused kernel draws it, so it runs
    # again in the replay and keeps nothing, as under core_attn
    fused_dropout = m.dropout > 0 and not sh.math_attention
    if "core_attn" not in modules and not fused_dropout:
        if sh.math_attention:
            kept["attention.core.scores"] = e * S * a * sh.s // t
            kept["attention.core.output"] = e * S * h // t
        else:
            kept["attention.core.output"] = e * S * h // t
            kept["attention.core.lse"] = 4 * S * a // t
    if "mlp" not in modules:
        kept["feed_forward.w1"] = e * S * f // t
        kept["feed_forward.w3"] = e * S * f // t
    if m.dropout > 0:
        kept["feed_forward.dropout_mask"] = sh.mask_bytes * Sr * h
    return kept


def _split(tensors: dict[str, int], offload: bool, min_bytes: int) -> tuple[int, int]:
    """(device, host) bytes of a set of kept storages."""
    if not offload:
        return sum(tensors.values()), 0
    host = sum(n for n in tensors.values() if n >= min_bytes)
    return sum(tensors.values()) - host, host


def span_bytes(sh: Shape, span, min_bytes: int) -> tuple[int, int]:
    """Predicted (device, host) bytes one span keeps (see policy.Span)."""
    tensors, copies = _span_tensors(sh, span)
    dev, host = _split(tensors, span.offload, min_bytes)
    return dev * copies, host * copies


def span_pool_bytes(sh: Shape, span, min_bytes: int) -> int:
    """Host-pool bytes one offloaded span takes: its host tensors, each rounded up to the pool's
    alignment (recompute.saved.HostPool hands out 512-byte multiples)."""
    if not span.offload:
        return 0
    tensors, copies = _span_tensors(sh, span)
    return copies * sum(-(-n // POOL_ALIGN) * POOL_ALIGN for n in tensors.values() if n >= min_bytes)


def _span_tensors(sh: Shape, span) -> tuple[dict[str, int], int]:
    """(the storages one unit of the span keeps, how many units): a checkpointed span keeps its
    input once, any other span its per-block tensors for each block."""
    S = sh.b * sh.s
    Sr = S // sh.tp if sh.sp else S
    if span.checkpointed:
        n = 4 * Sr * sh.model.dim  # the residual stream is fp32
        if span.partition and sh.tp > 1 and not sh.sp:
            n = 4 * -(-(S * sh.model.dim) // sh.tp)  # 1/t of the flat input, padded
        return {"input": n}, 1
    kept = _pointwise if "pointwise" in span.modules else _selective
    return kept(sh, list(span.modules)), span.stop - span.start


def block_formula(sh: Shape, r: RecomputeConfig, spans=None) -> list[tuple[str, int, int]]:
    """Predicted (span label, device bytes, host bytes) for every span of the policy: r's spans,
    or `spans` (explicit ones, e.g. chosen by granularity auto), with the last span on the
    device as apply_recompute runs it."""
    min_bytes = parse_bytes(r.offload_min_size)
    spans = keep_last_on_device(spans) if spans is not None else spans_of(r, sh.model.n_layers)
    return [(span.label, *span_bytes(sh, span, min_bytes)) for span in spans]
