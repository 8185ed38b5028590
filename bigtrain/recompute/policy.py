"""Turning a `recompute:` config section into what runs: `apply_recompute(model, dims, cfg, rng=rng)`.

Applied after tensor parallelism (the blocks' forwards then already contain the collectives and
RNG forks a replay must repeat) and before weights are materialised and data parallelism wraps
the model. Parameter names never change, so checkpoints move freely between policies.

    granularity none       blocks run plainly (offload: every saved tensor goes to the host)
    granularity full       spans of blocks run under checkpoint(); only each span's input is
                           kept: as is, as this rank's 1/tp slice (partition), on the host
                           (offload), or both. method uniform: every span has num_layers
                           blocks; method block: only the first num_layers blocks, one each.
    granularity selective  inside every block the modules named in `modules` run under
                           checkpoint(); everything else keeps its saved tensors (offload: on
                           the host). modules pointwise: each block's attention half and its
                           MLP's two stages (not its last residual add) run under
                           checkpoint(), keeping the block's input and the matmul and attention
                           outputs; every elementwise op is recomputed, one region at a time
                           (pointwise.py), and after a pointwise last span the final norm too;
                           with core_attn / mlp, those modules' matmuls run again too.
    granularity auto       a policy per block, chosen by bigtrain.planner from memory_budget.

With offload, the last span keeps its tensors on the device whatever its policy says (see
`keep_last_on_device`).

Which combinations make sense is checked in config.py (RecomputeConfig.validate and
Config.validate), before any process starts. Sequence parallelism is read from `dims`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from bigtrain.config import RecomputeConfig, parse_bytes
from bigtrain.parallel.dims import ParallelDims
from bigtrain.recompute.checkpoint import Stash, checkpoint
from bigtrain.recompute.pointwise import Kept, no_cache
from bigtrain.recompute.saved import Group, SavedTensors

# recompute.modules -> paths inside a Block
SELECTIVE_MODULES = {
    "norm": ("attention_norm", "ffn_norm"),
    "mlp_act": ("feed_forward.act",),
    "core_attn": ("attention.core_attention",),
    "mlp": ("feed_forward",),
    "pointwise": (),  # the whole block: see BlockRunner._run_pointwise
}
# With pointwise, nothing is kept inside these (they run again in the replay): always each
# half's last matmul (the out- and down-projections: only residual adds read their outputs;
# the attention's is the second half's input, kept by its stash), and the named modules.
POINTWISE_NOT_KEPT = {"pointwise": ("attention.wo", "feed_forward.w2"), "core_attn": ("attention.core_attention",),
                      "mlp": ("feed_forward",)}


@dataclass(frozen=True)
class Span:
    """Consecutive blocks [start, stop) and what they keep for backward."""
    start: int
    stop: int
    checkpointed: bool = False  # full recompute: only the span's input is kept
    modules: tuple[str, ...] = ()  # selective recompute inside each block of the span
    offload: bool = False  # what is kept goes to the host pool
    partition: bool = False  # the kept input is this rank's 1/tp slice

    @property
    def pointwise(self) -> bool:
        return "pointwise" in self.modules

    @property
    def label(self) -> str:
        return f"layer {self.start}" if self.stop - self.start == 1 else f"layers {self.start}-{self.stop - 1}"

    @property
    def policy(self) -> str:
        """A short name, e.g. full+partition+offload or selective(norm,mlp_act)."""
        name = "full" if self.checkpointed else f"selective({','.join(self.modules)})" if self.modules else "none"
        return name + ("+partition" if self.partition else "") + ("+offload" if self.offload else "")


def spans_of(cfg: RecomputeConfig, n_layers: int) -> list[Span]:
    """The spans a (non-auto) recompute config describes; auto's come from bigtrain.planner."""
    if cfg.granularity == "auto":
        raise ValueError("recompute.granularity=auto: the spans come from bigtrain.planner.choose_policy")
    off, part = cfg.offload, cfg.partition
    if cfg.granularity == "full":
        k = cfg.num_layers
        if cfg.method == "uniform":
            plan = [Span(i, min(i + k, n_layers), True, offload=off, partition=part) for i in range(0, n_layers, k)]
        else:  # method block: the first k blocks are checkpointed, the others keep everything
            plan = [Span(i, i + 1, i < k, offload=off, partition=part and i < k) for i in range(n_layers)]
    else:
        modules = tuple(cfg.modules) if cfg.granularity == "selective" else ()
        plan = [Span(i, i + 1, modules=modules, offload=off) for i in range(n_layers)]
    return keep_last_on_device(plan)


def keep_last_on_device(plan: list[Span]) -> list[Span]:
    """`plan` with the last span not offloaded (as Megatron does).

    Its backward runs first, right after the forward: offloading it would copy its tensors out
    and straight back, with nothing to hide either copy behind, and its device memory would be
    needed again at the very start of backward anyway.
    """
    if not plan or not plan[-1].offload:
        return plan
    return [*plan[:-1], replace(plan[-1], offload=False)]


class BlockRunner:
    """Runs model.layers span by span under the policy; installed as model.block_runner.

    A plain object, not an nn.Module: it refers to the blocks without re-registering them, so
    parameter names and state dicts stay those of the plain model.
    """

    def __init__(self, model: nn.Module, dims: ParallelDims, spans: list[Span], min_bytes: int, rng):
        self.layers = model.layers
        self.spans = spans
        self.dims = dims
        self.rng = rng  # the tracker whose "tp" stream parallelize() forks (None at tp=1)
        self.saved = SavedTensors(model, min_bytes=min_bytes)
        self.saved.offloading = any(span.offload for span in spans)

    def partition_for(self, span: Span) -> ParallelDims | None:
        # Under sequence parallelism a block input already is this rank's 1/tp of the sequence:
        # partitioning it again would store nothing less.
        if span.partition and self.dims.tp > 1 and not self.dims.sequence_parallel:
            return self.dims
        return None

    def __call__(self, x: torch.Tensor, pos) -> torch.Tensor:
        """x (b, s, h) -- or (b, s/tp, h) under SP -- through every block; pos: the forward's
        model.Positions (rotary angles, document mask), shared by all blocks."""
        if not torch.is_grad_enabled():  # evaluation: nothing is kept, nothing to recompute
            for layer in self.layers:
                x = layer(x, pos)
            return x
        # pos's tensors live for the whole step whatever the policy: not a span's activations
        self.saved.begin_forward(x.device, shared=pos.tensors())
        previous = None  # the previous span's stash, when it is partitioned
        for span in self.spans:
            group = self.saved.open_group(span.label, span.offload)
            try:
                with group.hooks():
                    if span.checkpointed:
                        partition = self.partition_for(span)
                        stash = Stash((x,), group, partition)
                        if partition is not None:
                            # its replay starts the previous span's all-gather (the next recompute)
                            stash.before, previous = previous, stash
                        else:
                            previous = None
                        x = checkpoint(self._run_span, stash, pos, span, rng=self.rng)
                    else:
                        previous = None
                        x = self._run_blocks(x, pos, span)
                self.saved.close_group(group)
            finally:  # a span that raises must not leave its group current (Recomputed reads it)
                self.saved.current = None
        return x

    def _run_span(self, stash: Stash, pos, span: Span) -> torch.Tensor:
        (x,) = stash.take()
        return self._run_blocks(x, pos, span)

    def _run_blocks(self, x, pos, span: Span):
        for layer in self.layers[span.start:span.stop]:
            x = self._run_pointwise(layer, x, pos) if span.pointwise else layer(x, pos)
        return x

    def _run_pointwise(self, layer, x, pos):
        """One block under op-level recompute, as checkpoint regions (Block.attention_half, then
        Block.mlp_inputs and FeedForward.down, or Block.mlp_half with mlp) so that backward
        replays one at a time. Each keeps the matmul and attention outputs inside it (a Kept);
        the first region's stash keeps x, the second's x and the attention's output (the first
        region's last matmul, not kept inside it), the third's gate and up. The last residual
        add (and its dropout, whose mask is kept as without recompute) runs outside them."""
        group = self.saved.current
        attn_out = checkpoint(self._attention_half, Stash((x,), group), layer, pos, rng=self.rng, kept=Kept(group))
        if layer.feed_forward.act.lean:
            # The MLP half in two regions (the norm and w1/w3; the product and w2): the replay
            # then never holds the norm's output and the product together, nor does the
            # forward. The second region's stash keeps gate and up, which the first region
            # keeps already (the same storages: counted and offloaded once).
            x, gate, up = checkpoint(self._mlp_inputs, Stash((x, attn_out), group), layer, rng=self.rng,
                                     kept=Kept(group))
            mlp_out = checkpoint(self._mlp_down, Stash((gate, up), group), layer, rng=self.rng, kept=Kept(group))
        else:  # pointwise with mlp: nothing inside the MLP is kept, it runs again whole
            x, mlp_out = checkpoint(self._mlp_half, Stash((x, attn_out), group), layer, rng=self.rng,
                                    kept=Kept(group))
        return x + layer.dropout(mlp_out)

    @staticmethod
    def _attention_half(stash: Stash, layer, pos):
        (x,) = stash.take()
        return layer.attention_half(x, pos)

    @staticmethod
    def _mlp_half(stash: Stash, layer):
        x, attn_out = stash.take()
        return layer.mlp_half(x, attn_out)

    @staticmethod
    def _mlp_inputs(stash: Stash, layer):
        x, attn_out = stash.take()
        return layer.mlp_inputs(x, attn_out)

    @staticmethod
    def _mlp_down(stash: Stash, layer):
        gate, up = stash.take()
        return layer.feed_forward.down(gate, up)


_IN_STASH = object()  # where a Recomputed module's tensor argument goes back in its replay


class Recomputed(nn.Module):
    """`module` run under checkpoint(): its saved tensors are dropped and rebuilt in backward.

    It takes over the module's parameter, buffer and child dicts (the same dict objects), so
    parameter names do not change ("feed_forward.w1.weight" stays that), and calls the module
    itself, hooks included: the tensor-parallel region entry and the "tp" RNG fork registered
    by parallelize() run again in the replay, as they must.
    """

    def __init__(self, module: nn.Module, saved: SavedTensors, rng):
        super().__init__()
        self._parameters, self._buffers, self._modules = module._parameters, module._buffers, module._modules
        self.__dict__["inner"] = module  # not registered: its parameters are already ours
        self.__dict__["saved"] = saved
        self.__dict__["rng"] = rng

    def forward(self, *args):
        # Tensors go into the stash (kept, offloaded, counted); anything else (core attention's
        # document mask, shared by all blocks, or None) is passed as it is.
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        others = tuple(_IN_STASH if isinstance(a, torch.Tensor) else a for a in args)
        group = self.saved.current
        if group is None and self.saved.accountant is not None:
            group = Group(self.saved, None, offload=False)  # outside the blocks (the final norm): counted there
        return checkpoint(self._replay, Stash(tensors, group), others, rng=self.rng)

    def _replay(self, stash: Stash, others: tuple):
        tensors = iter(stash.take())
        return self.inner(*(next(tensors) if a is _IN_STASH else a for a in others))

    def train(self, mode: bool = True):
        super().train(mode)
        self.inner.training = mode  # inner is not a registered child, so train() skips it
        return self

    def extra_repr(self) -> str:
        return f"recomputed {type(self.inner).__name__}"


def final_norm_recomputed(spans: list[Span]) -> bool:
    """After a pointwise last span the final norm runs under checkpoint too (op-level recompute
    covers the elementwise ops up to the output layer): it keeps only its input (the last
    block's output), not its normalised tensor and rstd; its output is the output layer's input,
    kept by it (or by the loss chunks' checkpoints)."""
    return bool(spans) and spans[-1].pointwise


def apply_recompute(model: nn.Module, dims: ParallelDims, cfg: RecomputeConfig,
                    spans: list[Span] | None = None, rng=None) -> nn.Module:
    """Install the activation-memory policy on a (tensor-parallel) Transformer, in place.

    spans: explicit spans (what granularity auto chose, see bigtrain.planner); else from `cfg`.
    rng: the RNG tracker parallelize() used (its streams are replayed); None at tp=1.
    """
    spans = keep_last_on_device(spans) if spans is not None else spans_of(cfg, len(model.layers))
    runner = BlockRunner(model, dims, spans, parse_bytes(cfg.offload_min_size), rng)
    for span in spans:
        for block in model.layers[span.start:span.stop]:
            if span.pointwise:  # core_attn / mlp then mean: nothing kept inside them
                for path in (p for name in span.modules for p in POINTWISE_NOT_KEPT.get(name, ())):
                    no_cache(block.get_submodule(path))
                # gate and up are kept: the product need not keep silu(gate) (SwiGLU.lean)
                block.feed_forward.act.lean = "mlp" not in span.modules
                continue
            for name in span.modules:
                for path in SELECTIVE_MODULES[name]:
                    block.set_submodule(path, Recomputed(block.get_submodule(path), runner.saved, runner.rng))
    if final_norm_recomputed(spans):
        model.norm = Recomputed(model.norm, runner.saved, runner.rng)
    model.block_runner = runner
    return model
