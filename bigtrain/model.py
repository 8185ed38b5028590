"""A plain Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention through fused
scaled_dot_product_attention, and a SwiGLU MLP.

Single-device code on purpose: only nn.Linear / nn.Embedding, no distributed imports. Tensor
parallelism swaps those modules for sharded ones (bigtrain/parallel); to survive that, reshapes
use -1 for head counts and the number of query heads per kv head is read off the local shapes.

Shapes: b = micro-batch, s = sequence, h = dim, d = head_dim, nh/nkv = (local) query/kv heads,
v = vocab.

Document masking (data.document_mask): `model(tokens, documents=document_ids(tokens, eos))` makes
every token attend only to earlier tokens of its own document inside the packed sequence, with
rotary positions counted from its document's start, so a document's logits in a packed batch
are its logits alone (tests/test_document_mask.py).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from bigtrain.config import ModelConfig

# What tensor parallelism records on a parameter (bigtrain.parallel): its Shard, and whether its
# gradient is a partial sum over the sequence slices. The model itself never sets them.
TP_SHARD, SEQUENCE_PARALLEL = "tp_shard", "sequence_parallel"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in (at least) fp32 for stability under bf16 autocast, return the input dtype.
        xf = _at_least_fp32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections of x compute in: autocast's where it is on, else x's."""
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return x.dtype  # (meta and other devices have no autocast)
    return torch.get_autocast_dtype(kind)


def cast_once(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, x in the autocast dtype, for several projections of the same input.

    Autocast casts every linear's input itself, and each cast copy is kept for backward: three
    copies of the attention input (wq, wk, wv), two of the MLP's (w1, w3). Casting once first
    keeps one. Outside autocast: x unchanged."""
    return x.to(compute_dtype(x))


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """cos/sin of the rotary angles, (max_seq_len, head_dim // 2, 2), fp32."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (b, s, n, d) by rope: (s, d/2, 2), the
    angles of positions 0..s-1, or (b, s, d/2, 2), each token's own (document masking)."""
    xp = _at_least_fp32(x).unflatten(-1, (-1, 2))  # (b, s, n, d/2, 2)
    if rope.dim() == 3:
        rope = rope[None]  # (1, s, d/2, 2)
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]  # (b or 1, s, 1, d/2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """tokens (b, s) -> (b, s) int64: each token's document, counted from the window's start.

    An end-of-document token belongs to the document it ends; the token after it starts the
    next. (A window that starts inside a document treats its first tokens as a document of
    their own, from position 0: they cannot see the part before the window anyway.)"""
    ends = (tokens == eos_id).long()  # (b, s)
    return ends.cumsum(1) - ends


def positions_in_documents(documents: torch.Tensor) -> torch.Tensor:
    """documents (b, s) -> (b, s) int64: each token's position counted from its document's start."""
    b, s = documents.shape
    idx = torch.arange(s, device=documents.device).expand(b, s)  # (b, s)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, idx, 0).cummax(1).values  # (b, s): index of the document's first token
    return idx - first


MASK_ALIGN = 16  # elements: the row alignment CUDA's fused attention kernels want of a mask


def mask_row(s: int) -> int:
    """Elements one row of a dense (.., s, s) mask takes: s padded to MASK_ALIGN."""
    return -(-s // MASK_ALIGN) * MASK_ALIGN


class DocumentMask:
    """Block-causal attention inside a packed sequence: query i sees key j iff j <= i and both
    belong to the same document. Built once per forward and shared by every block.

    documents (b, s) int64 (document_ids). Two forms:
    - `dense`: a (b, 1, s, s) additive mask (0 where allowed, -inf elsewhere) in the attention
      dtype, for SDPA. Not a bool mask: SDPA converts a bool mask to this in every layer, and
      every layer would keep its own copy for backward.
    - `block_mask`: a flex-attention BlockMask (on CUDA, without dropout): no s x s tensor, and
      the kernel skips the blocks that are masked whole.
    """

    def __init__(self, documents: torch.Tensor, dtype: torch.dtype, flex: bool = False):
        self.documents = documents
        self.block_mask = _block_mask(documents) if flex else None
        self.dense = None if flex else self.dense_mask(dtype)

    def dense_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(b, 1, s, s) additive mask in `dtype`: a view whose rows are padded to mask_row(s)
        elements, the alignment CUDA's fused kernels want (else SDPA pads a copy per call)."""
        d = self.documents
        b, s = d.shape
        causal = torch.ones(s, s, dtype=torch.bool, device=d.device).tril()  # (s, s)
        allowed = (d[:, None, :, None] == d[:, None, None, :]) & causal  # (b, 1, s, s)
        mask = torch.zeros(b, 1, s, mask_row(s), dtype=dtype, device=d.device)[..., :s]
        return mask.masked_fill_(~allowed, float("-inf"))

    def tensors(self) -> list[torch.Tensor]:
        """What the mask holds for the whole forward (shared by the blocks: not their activations)."""
        out = [self.documents] + ([self.dense] if self.dense is not None else [])
        if self.block_mask is not None:
            out += [t for t in self.block_mask.as_tuple() if isinstance(t, torch.Tensor)]
        return out


FLEX_BLOCK = 128  # flex attention's tile: the BlockMask says, per (query tile, key tile), none/partial/full


def _block_mask(documents: torch.Tensor):
    """The flex BlockMask of the block-causal mask, made from each tile's first and last document
    id (ids never decrease along a row) in O(b (s/128)^2): create_block_mask would build the
    whole (b, s, s) mask and its temporaries first, ~11 bytes per element, every micro-batch.

    Query tile i and key tile j < i share a document iff the last id of j is the first of i; the
    tile is full when all of both tiles is that one document; the diagonal tile is partial
    (causal). A ragged last tile is never full (flex masks its tail itself)."""
    from torch.nn.attention.flex_attention import BlockMask

    def same_document_causal(b, h, q, k):
        return (k <= q) & (documents[b, q] == documents[b, k])

    b, s = documents.shape
    n = -(-s // FLEX_BLOCK)
    padded = torch.cat([documents, documents[:, -1:].expand(b, n * FLEX_BLOCK - s)], dim=1)
    tiles = padded.view(b, n, FLEX_BLOCK)
    first, last = tiles[..., 0], tiles[..., -1]  # (b, n)
    i = torch.arange(n, device=documents.device)
    below = i[None, :] < i[:, None]  # (n, n): key tile j before query tile i
    q_first, q_last = first[:, :, None], last[:, :, None]  # (b, n, 1)
    k_first, k_last = first[:, None, :], last[:, None, :]  # (b, 1, n)
    touch = (below & (k_last == q_first)) | torch.eye(n, dtype=torch.bool, device=documents.device)
    full = below & (k_first == k_last) & (k_last == q_first) & (q_first == q_last)  # (b, n, n)
    if n * FLEX_BLOCK != s:
        full[:, -1, :] = False
    partial = touch & ~full

    def listed(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (b, 1, n) counts and (b, 1, n, n) indices, the listed tiles first, in order
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=same_document_causal, seq_lengths=(s, s))


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _flex_kernel(device_type: str):
    """flex_attention, compiled where it has a fused kernel (CUDA); eager elsewhere (the CPU's
    forward-only reference, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


@dataclass(frozen=True)
class Positions:
    """Where the tokens of one forward sit, shared by all blocks: the rotary angles, (s, d/2, 2)
    for positions 0..s-1 or (b, s, d/2, 2) per token, and the document mask (None: causal over
    the whole sequence)."""
    rope: torch.Tensor
    mask: DocumentMask | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held for the whole forward and backward, not by any one block."""
        return [self.rope] + (self.mask.tensors() if self.mask is not None else [])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * d, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * d, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * d, bias=False)
        self.wo = nn.Linear(cfg.n_heads * d, cfg.dim, bias=False)
        self.core_attention = CoreAttention(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        # Sizes come from the projections, not from x: under sequence parallelism x holds s/tp
        # positions and the column-parallel projections all-gather the full sequence.
        x = cast_once(x)
        q = self.wq(x)
        b, s = q.shape[:2]
        q = q.view(b, s, -1, self.head_dim)  # (b, s, nh, d)
        k = self.wk(x).view(b, s, -1, self.head_dim)  # (b, s, nkv, d)
        v = self.wv(x).view(b, s, -1, self.head_dim)  # (b, s, nkv, d)
        q, k = apply_rope(q, pos.rope), apply_rope(k, pos.rope)
        # (the mask only when there is one: hooks on core attention see (q, k, v) as before)
        masked = () if pos.mask is None else (pos.mask,)
        out = self.core_attention(q, k, v, *masked)  # (b, s, nh, d)
        return self.wo(out.flatten(2))  # (b, s, h)


class CoreAttention(nn.Module):
    """Causal attention, fused: the (s, s) scores are never stored for backward.

    A module of its own so that parallelize() can run it under the tensor-parallel RNG and
    recompute can name it (recompute.modules: core_attn)."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, mask: DocumentMask | None = None) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, n, s, d)
        p = self.dropout if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]  # let the kernel broadcast kv heads instead of materialising repeats
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        elif mask.block_mask is not None and p == 0.0 and _get_current_dispatch_mode() is None:
            out = _flex_kernel(q.device.type)(q, k, v, block_mask=mask.block_mask, enable_gqa=gqa)
        else:
            # The shared dense mask; one made here (a transient) where a dispatch mode is on
            # (pointwise recompute, the planner's fake tensors), which compiled flex cannot run under.
            dense = mask.dense if mask.dense is not None and mask.dense.dtype == q.dtype else mask.dense_mask(q.dtype)
            if gqa and q.is_cuda:
                # CUDA's fused kernels that take a mask do not broadcast kv heads (flash takes no
                # mask): without the repeat SDPA would run its math kernel, which keeps the
                # (b, h, s, s) probabilities. The same repeat enable_gqa stands for.
                rep = q.shape[1] // k.shape[1]
                k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, dropout_p=p, enable_gqa=gqa)
        return out.transpose(1, 2)  # (b, s, nh, d)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)  # down
        self.act = SwiGLU()

    def forward(self, x: torch.Tensor, inputs_only: bool = False):
        """x (b, s, h) -> (b, s, h). inputs_only: (gate, up), (b, s, ffn) each, and not the
        product and down-projection (`down`): op-level recompute runs the two stages as two
        regions (bigtrain.recompute.policy), so that x is gone before the product is made."""
        x = cast_once(x)
        if inputs_only:
            return self.w1(x), self.w3(x)
        # one expression: gate and up are not held past the product when nothing saves them
        # (recompute: mlp, full)
        return self.w2(self.act(self.w1(x), self.w3(x)))  # (b, s, h)

    def down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The second stage after inputs_only (whose caller keeps gate and up anyway)."""
        return self.w2(self.act(gate, up))  # (b, s, h)


class SwiGLU(nn.Module):
    """silu(gate) * up; a module so recompute can name it (recompute.modules: mlp_act).

    `lean` (set by op-level recompute, recompute.modules pointwise, whose matmul outputs gate
    and up are kept anyway): keep only gate and up for backward and recompute silu(gate)
    there, and make the product in silu(gate)'s own buffer, so one (b, s, ffn) tensor exists
    at a time instead of two, in the forward and in the replay. The same values and gradients,
    bitwise (the same ops as autograd's)."""

    def __init__(self):
        super().__init__()
        self.lean = False

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.lean and torch.is_grad_enabled() and gate.dtype == up.dtype and gate.shape == up.shape:
            return _LeanSwiGLU.apply(gate, up)
        return F.silu(gate) * up  # (b, s, ffn)


class _LeanSwiGLU(torch.autograd.Function):
    """silu(gate) * up saving only its inputs (see SwiGLU.lean). gate, up: (b, s, ffn), one dtype."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # (b, s, ffn): the product written over silu(gate)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # autograd's backward of F.silu(gate) * up: mul's (grad * up, grad * silu(gate)), then
        # silu's; one silu(gate)-sized temporary at a time
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = F.silu(gate).mul_(grad)
        return grad_gate, grad_up


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        x, mlp_out = self.mlp_half(x, self.attention_half(x, pos))
        return x + self.dropout(mlp_out)

    # Pointwise recompute's regions (bigtrain.recompute.pointwise): attention_half, then
    # mlp_inputs and FeedForward.down (mlp_half whole with recompute.modules mlp); each is
    # replayed on its own in backward, so only one region's elementwise outputs exist at once.
    def attention_half(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        """The attention sublayer's output (b, s, h), before its dropout and residual add."""
        return self.attention(self.attention_norm(x), pos)

    def mlp_half(self, x: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x after the attention's residual add, the MLP's output), both (b, s, h)."""
        x = x + self.dropout(attn_out)
        return x, self.feed_forward(self.ffn_norm(x))

    def mlp_inputs(self, x: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """mlp_half's first stage: (x after the attention's residual add (b, s, h), gate, up
        (b, s, ffn) each); the second is feed_forward.down(gate, up)."""
        x = x + self.dropout(attn_out)
        return x, *self.feed_forward(self.ffn_norm(x), inputs_only=True)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be resolved (> 0) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Runs self.layers when set (bigtrain.recompute.apply_recompute installs the activation-
        # memory policy here); None runs them one after the other.
        self.block_runner = None
        # Not a parameter and not saved: recomputed by init_weights / reset_rope.
        self.register_buffer("rope", rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False)

    def forward(self, tokens: torch.Tensor, documents: torch.Tensor | None = None, head=None) -> torch.Tensor:
        """tokens (b, s) -> logits (b, s, v). documents (b, s): each token's document
        (document_ids), for attention and positions that stop at document boundaries. head: a
        function of (final hidden states, output layer) that returns what forward returns
        instead of the logits (the trainer's chunked loss, train.loss_chunk): it runs inside
        forward, so that data-parallel wrappers see the whole step."""
        hidden = self.hidden_states(tokens, documents)
        return self.output(hidden) if head is None else head(hidden, self.output)

    def hidden_states(self, tokens: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (b, s) -> final normalised hidden states (b, s, h)."""
        x = self.dropout(self.tok_embeddings(tokens))  # (b, s, h)
        pos = self.positions(tokens.shape[1], documents, compute_dtype(x))
        if self.block_runner is not None:
            x = self.block_runner(x, pos)
        else:
            for layer in self.layers:
                x = layer(x, pos)
        return self.norm(x)

    def positions(self, s: int, documents: torch.Tensor | None = None, dtype=torch.float32) -> Positions:
        """The Positions of a forward over s tokens; with documents (b, s), per document, the
        mask in the attention `dtype`, as a flex BlockMask where the fused kernel can run it
        (CUDA, no attention dropout in training)."""
        if documents is None:
            return Positions(self.rope[:s])
        rope = self.rope[positions_in_documents(documents)]  # (b, s, d/2, 2)
        # Op-level recompute runs its blocks under a dispatch mode, which compiled flex cannot
        # run under: one shared dense mask then, so that every block runs the same kernel.
        pointwise = self.block_runner is not None and any(span.pointwise for span in self.block_runner.spans)
        flex = documents.is_cuda and flex_available() and not (self.training and self.cfg.dropout > 0) \
            and not pointwise
        return Positions(rope, DocumentMask(documents, dtype, flex=flex))

    def reset_rope(self, device=None) -> None:
        self.rope = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=device)


# --------------------------------------------------------------------------------------------
# Initialisation that does not depend on how the model is sharded


def param_seed(seed: int, name: str) -> int:
    """A per-parameter seed from the run seed and the parameter's name (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter `name`, on the CPU in fp32.

    Each parameter gets its own generator seeded from (seed, name), so the value does not depend
    on the order of initialisation, on which rank computes it, or on how it is later sliced.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = cfg.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std = std / math.sqrt(2 * cfg.n_layers)  # residual projections (GPT-2 / Megatron scaling)
    g = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=g)


@torch.no_grad()
def init_weights(model: Transformer, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """Materialise a (possibly meta) model on `device` and initialise it from `seed`.

    Parameters that tensor parallelism has sharded carry a Shard (bigtrain.parallel.layers)
    that cuts this rank's slice out of the full tensor; plain parameters take the full tensor.
    """
    _to_empty(model, device)
    for name, p in model.named_parameters():  # tied weights appear once
        shard = getattr(p, TP_SHARD, None)
        full = full_init(name, shard.full_shape if shard is not None else tuple(p.shape), model.cfg, seed)
        p.copy_(shard(full) if shard is not None else full)
    model.reset_rope(device=device)
    return model


def _to_empty(model: nn.Module, device) -> None:
    """Module.to_empty, keeping what it would lose: tied parameters stay one Parameter, and the
    two records tensor parallelism puts on parameters (TP_SHARD, SEQUENCE_PARALLEL) carry over."""
    slots = {}  # id(old param) -> [(module, name)], in module order
    extras = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((mod, name))
                extras[id(p)] = {k: getattr(p, k) for k in (TP_SHARD, SEQUENCE_PARALLEL) if hasattr(p, k)}
    model.to_empty(device=device)
    for key, refs in slots.items():
        first_mod, first_name = refs[0]
        new = first_mod._parameters[first_name]
        for k, v in extras[key].items():
            setattr(new, k, v)
        for mod, name in refs[1:]:
            mod._parameters[name] = new


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> Transformer:
    """Build the plain model without allocating weights (on the meta device by default)."""
    with torch.device(device):
        return Transformer(cfg)


def count_params(model: nn.Module) -> int:
    """Parameters of this rank's model, tied weights once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * L * h * s (PaLM appendix B).

    N_matmul counts the weights used in matrix multiplies (every linear layer, including the
    output projection, excluding the embedding lookup). The attention term counts QK^T and
    attention-times-V for forward and backward over the full s x s square; causal kernels that
    skip the masked half do less work, so MFU computed from this is the usual convention.
    """
    h, L, kv = cfg.dim, cfg.n_layers, cfg.kv_heads * cfg.head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * cfg.hidden  # wq, wk+wv, wo, w1+w3+w2
    n_matmul = L * per_layer + h * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * L * h * seq_len
