"""What the formula cannot see: the transients of one span's forward and backward (the
temporaries of every op, the gradients as they are made, the replay of recomputed modules),
taken from the real block code run on fake tensors (no memory, no process group) and cached
per shape and policy. The memory model (bigtrain.planner.memory) composes these over the step.

    p = span_profile(job.shape, span_key, persistent_grads)   # p.fwd_peak, p.bwd_peak, ...

All figures are bytes relative to the start of the phase: `fwd_peak` above what was live before
the span's forward (its input included), `bwd_peak` above what was live when its backward
started (its kept tensors and the incoming gradient included); `grads` is what the backward
leaves allocated (its parameters' gradients, when they were not there before).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage an op creates while it is alive, and their running maximum."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.total = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        n = st.nbytes()
        self._live[key] = n
        self.total += n
        self.peak = max(self.peak, self.total)
        weakref.finalize(st, self._drop, key)

    def _drop(self, key: int) -> None:
        self.total -= self._live.pop(key, 0)

    def restart_peak(self) -> int:
        self.peak = self.total
        return self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


@dataclass(frozen=True)
class Profile:
    fwd_peak: int  # above the live bytes before the span's forward (input included)
    bwd_peak: int  # above the live bytes at the start of its backward (its kept tensors; the incoming gradient is made inside)
    grads: int  # parameter gradients its backward leaves allocated (0 when they existed)


def span_profile(shape, blocks: int, checkpointed: bool, modules: tuple, persistent: bool,
                 held: bool = False, partition: bool = False) -> Profile:
    """See `_profile` (cached by value: the config dataclasses are not hashable)."""
    import dataclasses

    m = tuple(sorted(dataclasses.asdict(shape.model).items()))
    return _profile(SpanKey(m, shape.b, shape.s, shape.tp, shape.sp, shape.autocast, blocks, checkpointed,
                            tuple(modules), persistent, held, partition and shape.tp > 1 and not shape.sp,
                            shape.documents))


@dataclass(frozen=True)
class SpanKey:
    """What a span's profile depends on, hashable (the cache key of _profile)."""
    model_items: tuple  # the ModelConfig's fields, sorted
    b: int
    s: int
    t: int
    sp: bool
    bf16: bool
    blocks: int
    checkpointed: bool
    modules: tuple
    persistent: bool
    held: bool
    partition: bool
    documents: bool = False  # attention under a document mask (profiled with the dense one)


@functools.lru_cache(maxsize=512)
def _profile(key: SpanKey) -> Profile:
    """One span of `blocks` blocks under (checkpointed, modules), at this rank's shape, on fake
    tensors. Tensor parallelism runs rank 0's shards with the real collectives on torch's fake
    process-group backend (initialised for the profile when there is no process group: `bigtrain
    plan`; inside a distributed run, auto's planning, the collectives are identities and sequence
    parallelism is profiled as without it, so their buffers are not counted); persistent: the gradients
    exist before backward (accumulation, DDP buckets), which it then adds into. held: what the
    span keeps stays allocated until its backward ends, as an offloaded span's reloaded copies
    do (they belong to the span's group, freed with its last saved tensor); otherwise autograd
    frees each saved tensor once its node has run."""
    from bigtrain.config import ModelConfig
    from bigtrain.recompute.policy import Span

    t, partition = key.t, key.partition
    m = ModelConfig(**dict(key.model_items))
    cfg = replace(m, n_layers=key.blocks, vocab_size=8 * t)
    with _fake_tp(t, key.sp) as (dims, own_pg):
        span = Span(0, key.blocks, checkpointed=key.checkpointed, modules=key.modules,
                    partition=partition and own_pg)
        prof = _run(cfg, span, dims, key)
    if partition and not own_pg:  # kept as 1/t of the input, all-gathered whole for the replay
        d = 4 * key.b * key.s * m.dim
        prof = replace(prof, bwd_peak=prof.bwd_peak + d - d // t)
    return prof


@contextlib.contextmanager
def _fake_tp(t: int, sp: bool):
    """(dims, own_pg) for rank 0 of a tp=t group: with no process group yet (`bigtrain plan`),
    torch's fake backend, so the real collectives run (and sequence parallelism with them);
    inside a distributed run (auto's planning) a group-less layout, whose collectives are
    identities and which is profiled without sequence parallelism."""
    import torch.distributed as dist

    from bigtrain.parallel.dims import ParallelDims

    own_pg = t > 1 and not dist.is_initialized()
    if not own_pg:
        yield ParallelDims(world_size=t, rank=0, tp=t, sequence_parallel=False), False
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=t)
    try:
        yield ParallelDims.build(t, 0, tp=t, sequence_parallel=sp), True
    finally:
        dist.destroy_process_group()


def _run(cfg, span, dims, key: SpanKey) -> Profile:
    """The profile of `span` built from `cfg` at the shape, dtype and state in `key`."""
    import unittest.mock

    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    import bigtrain.parallel.random as rng_module
    from bigtrain.model import build_model
    from bigtrain.parallel.dims import ParallelDims
    from bigtrain.parallel.random import seed_rng
    from bigtrain.recompute.policy import apply_recompute

    def real_copy(state, _copy=rng_module._copy):  # RNG states stay real (a fake one cannot be set)
        with unset_fake_temporarily():
            return _copy(state)

    t, m = dims.tp, cfg
    b, s, bf16, persistent, held = key.b, key.s, key.bf16, key.persistent, key.held
    rng = seed_rng(0, dims) if dims.tp_group is not None else None
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if bf16
                else _null())
    with unittest.mock.patch.object(rng_module, "_copy", real_copy), FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(cfg, device="cpu")
        if t > 1:
            from bigtrain.parallel.parallelize import parallelize

            parallelize(model, dims, rng)
        apply_recompute(model, ParallelDims.single() if t == 1 else dims, _plain(cfg), spans=[span], rng=rng)
        model.train()
        runner = model.block_runner
        x = torch.zeros(b, s // t if dims.sequence_parallel else s, m.dim, requires_grad=True)
        # the forward's shared tensors (formula.document_tensors counts them), made before counting
        docs = torch.zeros(b, s, dtype=torch.long) if key.documents else None
        pos = model.positions(s, docs, torch.bfloat16 if bf16 else torch.float32)
        if persistent:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        live = LiveBytes()
        with live:
            start = live.restart_peak()
            holder = []

            def pack(t):
                holder.append(t)
                return len(holder) - 1

            hold = torch.autograd.graph.saved_tensors_hooks(pack, holder.__getitem__) if held else _null()
            with hold, autocast:
                y = runner(x, pos)
            fwd_peak = live.peak - start
            # The incoming gradient is made fresh inside backward, owned by autograd alone (as the
            # next span's backward hands it over): autograd may then accumulate into it in place.
            start = live.restart_peak()
            _FreshGrad.apply(y).sum().backward()
            bwd_peak = live.peak - start
            del y
            holder.clear()
            # what stays: parameter gradients (when new) and x.grad (which replaces g)
            grads = 0 if persistent else sum(p.grad.untyped_storage().nbytes() for p in model.parameters()
                                             if p.grad is not None)
    return Profile(fwd_peak, bwd_peak, grads)


class _FreshGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return torch.zeros(g.shape, dtype=g.dtype, device=g.device)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _plain(model_cfg):
    from bigtrain.config import RecomputeConfig

    return RecomputeConfig()


def head_profile(shape, persistent: bool, norm_recomputed: bool = False) -> Profile:
    """The final norm, the output layer and the loss (vocab-parallel at tp > 1), like
    `span_profile`: fwd_peak above what was live before (the norm's input excluded), bwd_peak
    above the start of backward (what they keep included), grads: the output layer's gradient.
    norm_recomputed: the final norm under checkpoint, as apply_recompute installs it after a
    pointwise span (policy.final_norm_recomputed)."""
    import dataclasses

    m = tuple(sorted(dataclasses.asdict(shape.model).items()))
    return _head(m, shape.b, shape.s, shape.tp, shape.sp, shape.autocast, persistent, shape.loss_chunk,
                 norm_recomputed)


@functools.lru_cache(maxsize=64)
def _head(model_items: tuple, b: int, s: int, t: int, sp: bool, bf16: bool, persistent: bool,
          chunk: int = 0, norm_recomputed: bool = False) -> Profile:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bigtrain.config import ModelConfig
    from bigtrain.model import build_model
    from bigtrain.parallel.loss import chunked_cross_entropy, cross_entropy

    cfg = replace(ModelConfig(**dict(model_items)), n_layers=0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if bf16 else _null()
    with _fake_tp(t, sp) as (dims, _), FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(cfg, device="cpu")
        if t > 1:
            from bigtrain.parallel.parallelize import parallelize

            parallelize(model, dims)
        if norm_recomputed:
            from bigtrain.recompute.policy import Recomputed
            from bigtrain.recompute.saved import SavedTensors

            model.norm = Recomputed(model.norm, SavedTensors(model), None)  # outside any span's group
        x = torch.zeros(b, s // t if dims.sequence_parallel else s, cfg.dim, requires_grad=True)
        targets = torch.zeros(b, s, dtype=torch.long)
        if persistent:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        live = LiveBytes()
        with live:
            start = live.restart_peak()
            if chunk:  # train.loss_chunk: as the trainer runs it, inside autocast
                with autocast:
                    loss = chunked_cross_entropy(model.norm(x), model.output, targets, chunk, dims.tp_group,
                                                 cfg.vocab_size, dims.sequence_parallel)
            else:
                with autocast:
                    logits = model.output(model.norm(x))
                loss = cross_entropy(logits, targets, group=dims.tp_group, vocab_size=cfg.vocab_size)
                del logits
            fwd_peak = live.peak - start
            start = live.restart_peak()
            loss.backward()
            bwd_peak = live.peak - start
            grads = 0 if persistent else model.output.weight.grad.untyped_storage().nbytes()
    return Profile(fwd_peak, bwd_peak, grads)
