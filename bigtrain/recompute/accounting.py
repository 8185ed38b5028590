"""What a forward keeps for backward: measured (the accountant) and predicted (the formula).

**The accountant** counts, during one forward, every storage autograd saves for backward and
every checkpoint input a Stash keeps, once per storage, parameters and buffers excluded, split
into device-resident and host-resident (offloaded) bytes, per span of blocks (usually one
block) and outside the blocks (embedding, final norm, logits, loss):

    with ActivationAccountant(model) as acc:
        loss = loss_fn(model(x), y)
    acc.report.blocks["layer 0"].device

It sees what goes through bigtrain's saved-tensor hooks and stashes; it does not see the
transient memory of a replay in backward (one span at a time), nor allocator fragmentation.

**The formula** is our block's counterpart of Korthikanti et al.'s Table 2, derived op by op for
this model (RMSNorm, RoPE, GQA through fused SDPA, SwiGLU) and checked against the accountant
in tests/test_recompute.py. With S = b*s tokens, Sr = S/t under sequence parallelism (else S),
e = bytes per activation element (4 fp32, 2 bf16; no autocast), kv = n_kv_heads*head_dim,
f = ffn_hidden, a = n_heads, per block:

    each RMSNorm      input in fp32 4*Sr*h + rstd 4*Sr + normalised 4*Sr*h (fp32: it is saved before the cast back)
    each norm output  e*S*h       (saved by the projections; all-gathered, so full S, under SP)
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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from bigtrain.config import ModelConfig, RecomputeConfig, parse_bytes
from bigtrain.recompute.policy import keep_last_on_device, spans_of
from bigtrain.recompute.saved import storage_key


@dataclass
class BlockBytes:
    device: int = 0
    host: int = 0


@dataclass
class ActivationReport:
    """Bytes kept for backward per span of blocks (label -> BlockBytes), and outside the blocks."""
    blocks: dict[str, BlockBytes] = field(default_factory=dict)
    outside: BlockBytes = field(default_factory=BlockBytes)

    @property
    def total(self) -> BlockBytes:
        return BlockBytes(sum(b.device for b in self.blocks.values()) + self.outside.device,
                          sum(b.host for b in self.blocks.values()) + self.outside.host)


class ActivationAccountant:
    """Context manager that measures one forward's kept bytes (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = getattr(model, "module", model)  # under DDP / DeepSpeed, the wrapped module
        self.runner = self.model.block_runner
        if self.runner is None:
            raise ValueError("ActivationAccountant needs a model with bigtrain.recompute.apply_recompute applied")
        self.report = ActivationReport()
        self._seen: set = set()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ActivationAccountant":
        self.report, self._seen = ActivationReport(), set()
        # held while measuring, so that no activation can take a key of theirs (see saved.py)
        self._static_storages = [t.untyped_storage() for t in (*self.model.parameters(), *self.model.buffers())]
        self._static = {s._cdata for s in self._static_storages}
        self.runner.saved.accountant = self
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack_outside, lambda t: t))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.runner.saved.accountant = None
        self._static_storages = []

    def add(self, label: str | None, key, nbytes: int, host: bool) -> None:
        """Count a storage once (called by Group.store for everything a span keeps)."""
        if key in self._seen:
            return
        self._seen.add(key)
        where = self.report.outside if label is None else self.report.blocks.setdefault(label, BlockBytes())
        if host:
            where.host += nbytes
        else:
            where.device += nbytes

    def _pack_outside(self, t: torch.Tensor) -> torch.Tensor:
        if storage_key(t) in self._static or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t  # a parameter (or a view of one, e.g. a gathered ZeRO-3 weight): not an activation
        self.add(None, storage_key(t), t.untyped_storage().nbytes(), host=False)
        return t.detach()  # no reference cycle through an op that saves its own output


# --------------------------------------------------------------------------------------------
# The formula


@dataclass(frozen=True)
class Shape:
    """What the formula needs to know about one rank's block."""
    model: ModelConfig
    b: int  # micro-batch
    s: int  # sequence length
    tp: int = 1
    sp: bool = False
    elem: int = 4  # bytes of a matmul/attention activation: 4 in fp32, 2 under bf16 autocast
    mask_bytes: int = 4  # bytes per dropout-mask element: 1 on CUDA (bool), elem on the CPU
    math_attention: bool = False  # attention dropout on the CPU: SDPA's math kernel
    # Exact (tests/test_recompute.py) in fp32, and under bf16 autocast without dropout on the
    # CPU; CPU dropout under autocast keeps masks in mixed dtypes the formula does not follow.

    @property
    def autocast(self) -> bool:
        return self.elem < 4


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
    out["attention.input"] = e * S * h  # the norm output (all-gathered under SP), as the matmuls see it
    if sh.math_attention:
        for name in ("q_scaled", "k_expanded", "v_expanded", "output"):
            out[f"attention.core.{name}"] = e * S * h // t
        for name in ("probs", "mask", "dropped"):
            out[f"attention.core.{name}"] = e * S * a * sh.s // t
    else:
        out["attention.core.q"] = e * S * h // t
        out["attention.core.k"] = e * S * kv // t
        out["attention.core.v"] = e * S * kv // t
        out["attention.core.output"] = e * S * h // t
        out["attention.core.lse"] = 4 * S * a // t
    out["feed_forward.input"] = e * S * h
    for name in ("gate", "up", "silu", "product"):
        out[f"feed_forward.{name}"] = e * S * f // t
    if m.dropout > 0:
        out["attention.dropout_mask"] = sh.mask_bytes * Sr * h
        out["feed_forward.dropout_mask"] = sh.mask_bytes * Sr * h
    if sh.autocast:
        out["attention.weights_bf16"] = 2 * (2 * h * h + 2 * h * kv) // t
        out["feed_forward.weights_bf16"] = 2 * 3 * h * f // t
    return out


def outside_tensors(sh: Shape, vocab: int) -> dict[str, int]:
    """What the forward keeps outside the blocks: embedding, final norm, output layer, loss.

    `vocab` is the padded vocabulary (a multiple of tp). The logits themselves are not kept
    (the loss keeps its fp32 softmax instead); they are a transient, see bigtrain.planner.memory.
    """
    m, t, e = sh.model, sh.tp, sh.elem
    S = sh.b * sh.s
    Sr = S // t if sh.sp else S
    # ids: the inputs are a view of the (b, s + 1) token batch, whose whole storage is kept
    out = {"embedding.ids": 8 * sh.b * (sh.s + 1), "norm.input": 4 * Sr * m.dim, "norm.rstd": 4 * Sr,
           "norm.normalised": 4 * Sr * m.dim, "output.input": e * S * m.dim}
    if m.dropout > 0:  # on the fp32 embedding output: a 4-byte mask on the CPU, bool on CUDA
        out["embedding.dropout_mask"] = (1 if sh.mask_bytes == 1 else 4) * Sr * m.dim
    if sh.autocast:
        out["output.weight_bf16"] = 2 * vocab * m.dim // t
    if t == 1:
        out["loss.log_softmax"] = 4 * S * vocab
        out["loss.targets"] = 8 * S
        out["loss.total_weight"] = 4
    else:  # vocab-parallel cross-entropy
        out["loss.softmax"] = 4 * S * vocab // t
        out["loss.local_targets"] = 8 * S
        out["loss.elsewhere"] = S
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


def _split(tensors: dict[str, int], offload: bool, min_bytes: int) -> tuple[int, int]:
    """(device, host) bytes of a set of kept storages."""
    if not offload:
        return sum(tensors.values()), 0
    host = sum(n for n in tensors.values() if n >= min_bytes)
    return sum(tensors.values()) - host, host


def span_bytes(sh: Shape, span, min_bytes: int) -> tuple[int, int]:
    """Predicted (device, host) bytes one span keeps (see policy.Span)."""
    S = sh.b * sh.s
    Sr = S // sh.tp if sh.sp else S
    if span.checkpointed:
        n = 4 * Sr * sh.model.dim  # the residual stream is fp32
        if span.partition and sh.tp > 1 and not sh.sp:
            n = 4 * -(-(S * sh.model.dim) // sh.tp)  # 1/t of the flat input, padded
        return _split({"input": n}, span.offload, min_bytes)
    dev, host = _split(_selective(sh, list(span.modules)), span.offload, min_bytes)
    n = span.stop - span.start
    return dev * n, host * n


def block_formula(sh: Shape, r: RecomputeConfig, spans=None) -> list[tuple[str, int, int]]:
    """Predicted (span label, device bytes, host bytes) for every span of the policy: r's spans,
    or `spans` (explicit ones, e.g. chosen by granularity auto), with the last span on the
    device as apply_recompute runs it."""
    min_bytes = parse_bytes(r.offload_min_size)
    spans = keep_last_on_device(spans) if spans is not None else spans_of(r, sh.model.n_layers)
    return [(span.label, *span_bytes(sh, span, min_bytes)) for span in spans]


def format_report(report: ActivationReport, predicted: list[tuple[str, int, int]] | None = None) -> str:
    """A per-span table in MiB: measured device/host and, when given, the formula's."""
    mib = 2.0 ** 20
    pred = {label: (d, h) for label, d, h in predicted or []}
    head = "| span | device MiB | host MiB |" + (" formula device MiB | formula host MiB |" if pred else "")
    lines = [head, "|---" * (5 if pred else 3) + "|"]
    for label, b in report.blocks.items():
        row = f"| {label} | {b.device / mib:.3f} | {b.host / mib:.3f} |"
        if pred:
            d, h = pred.get(label, (0, 0))
            row += f" {d / mib:.3f} | {h / mib:.3f} |"
        lines.append(row)
    o = report.outside
    lines.append(f"| outside blocks | {o.device / mib:.3f} | {o.host / mib:.3f} |" + (" | |" if pred else ""))
    return "\n".join(lines)
