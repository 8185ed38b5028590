"""Op-level selective recompute (`recompute.modules: pointwise`): keep what the matmuls and
attention compute, recompute every elementwise op from it.

Three checkpoint regions per block, so that backward replays a part at a time and only that
part's elementwise outputs exist at once: the attention half (`Block.attention_half`: the
attention norm to the out-projection), the MLP's inputs (`Block.mlp_inputs`: the first residual
add, the MLP norm, w1 and w3) and its output (`FeedForward.down`: the SwiGLU product and the
down-projection). The block's last residual add and the dropout before it run outside them. The
first region's stash keeps the block's input, the second's the same input and the
out-projection's output, the third's gate and up (which the second keeps already: the same
storages, counted and offloaded once). While a region runs forward, a dispatch mode (`Cache`)
sees every aten op and keeps the outputs of the matmuls (mm, addmm, bmm, baddbmm) and of fused
attention (the output and its logsumexp), through the span's Group (so they are counted by the
accountant and, under offload, go to the host). In backward the replay (`Replay`) runs the
region again: a kept op returns what was kept instead of running, every other op (norms, RoPE,
SiLU and the SwiGLU product, casts, the first residual add, dropout, collectives) runs again.
The out- and down-projection are not kept: only a residual add consumes their outputs, and
torch's early stop ends the replay when that matmul's inputs are saved, before it runs (the
out-projection's output is the second region's input, kept once by its stash: after the
all-reduce or reduce-scatter, so under sequence parallelism as this rank's 1/tp slice).

The SwiGLU product saves only gate and up (`SwiGLU.lean`, bitwise autograd's): it is made in
silu(gate)'s buffer, and silu(gate) is made again in its backward, so the forward and the replay
hold one (b, s, ffn) tensor beside gate and up, not two. After a pointwise last span the final
norm runs under checkpoint as well (`policy.final_norm_recomputed`): it keeps only its input.

RNG: no random op is ever kept (bernoulli_ and friends write in place, and only the compute ops
above are kept), so the replay draws exactly the forward's random numbers in the forward's
order, from the states bigtrain's checkpoint restores. A fused attention kernel that draws
its own dropout (CUDA flash/efficient/cudnn with dropout_p > 0) is therefore not kept either:
it runs again, as under core_attn (CPU attention with dropout uses the math kernel, whose
dropout is an ordinary op: its matmuls are kept, its dropout replayed).

Combinations: with core_attn nothing computed inside the attention core is kept (the kernel
runs again from the kept q, k, v); with mlp nothing inside the MLP is kept (w1 and w3 run
again from the recomputed norm output; the MLP half is then one region, `Block.mlp_half`, and
the product keeps silu(gate) as without recompute). Both, and the out- and down-projections, are modules inside
which nothing is kept (`no_cache`), marked by forward hooks that also run in the replay.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# Ops whose outputs are kept: the matmuls and fused attention (every output, e.g. the lse).
KEPT_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    if hasattr(aten, _name):
        KEPT_OPS.add(getattr(aten, _name).default)

_NO_CACHE = contextvars.ContextVar("bigtrain_pointwise_no_cache", default=0)


def no_cache(module: torch.nn.Module) -> None:
    """Nothing computed inside `module` is kept: it runs again in the replay (forward hooks,
    so they also run in the replay and the decisions match)."""
    tokens: list = []
    module.register_forward_pre_hook(lambda m, args: tokens.append(_NO_CACHE.set(_NO_CACHE.get() + 1)))
    module.register_forward_hook(lambda m, args, out: _NO_CACHE.reset(tokens.pop()), always_call=True)


def _detach(t):
    # As torch's selective checkpoint: a detach that propagates the version counter, so the
    # tensor handed to autograd in the replay has no autograd history of its own.
    if isinstance(t, torch.Tensor):
        with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
            return t.detach()
    return t


def _draws_dropout(func, args, kwargs) -> bool:
    """A fused attention kernel with dropout_p > 0 (it draws from the generator itself). In all
    of them dropout_p is the first float argument after (query, key, value)."""
    if func in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default):
        return False
    p = kwargs.get("dropout_p")
    if p is None:
        p = next((a for a in args[3:] if isinstance(a, float)), 0.0)
    return p > 0


class Kept:
    """What one region's forward kept: per kind of KEPT_OPS, in call order, the outputs (Group
    handles) or None (run again: inside a `no_cache` module). Other ops are never counted, so
    the replay may run ops the forward did not (a stash's reload, host->device copies)."""

    def __init__(self, group):
        self.group = group
        self.entries: dict = defaultdict(list)

    def forward_mode(self) -> "Cache":
        return Cache(self)

    def replay_mode(self) -> "Replay":
        return Replay(self)


class Cache(TorchDispatchMode):
    """The forward: run every op, keep the outputs of KEPT_OPS (see the module docstring)."""

    def __init__(self, kept: Kept):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in KEPT_OPS:  # recomputed (only the kept kinds are counted, in both modes)
            return out
        # A kernel that draws dropout runs again (skipping it would shift every later draw)
        keep = _NO_CACHE.get() == 0 and not _draws_dropout(func, args, kwargs)
        group = self.kept.group
        store = group.store if group is not None else (lambda t: t)
        self.kept.entries[func].append(
            tree_map(lambda t: store(_detach(t)) if isinstance(t, torch.Tensor) else t, out) if keep else None)
        return out


class Replay(TorchDispatchMode):
    """The replay: a kept op returns what the forward kept, every other op runs again."""

    def __init__(self, kept: Kept):
        super().__init__()
        self.kept = kept
        self.counter: dict = defaultdict(int)

    def __enter__(self):
        self.counter.clear()  # entered again for a second backward through the same graph
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in KEPT_OPS:  # including what the stash and offload reloads run here
            return func(*args, **kwargs)
        i = self.counter[func]
        self.counter[func] += 1
        calls = self.kept.entries.get(func)
        if calls is None or i >= len(calls):
            raise RuntimeError(f"pointwise recompute: {func} call {i} in the replay was not seen in the forward")
        entry = calls[i]
        if entry is None:
            return func(*args, **kwargs)
        group = self.kept.group
        load = group.load if group is not None else (lambda t: t)
        return tree_map(lambda h: _detach(load(h)) if not isinstance(h, (int, float, bool, type(None))) else h, entry)


class Both:
    """Two context managers entered in order (and left in reverse), re-enterable."""

    def __init__(self, first, second):
        self.first, self.second = first, second
        self._stacks: list = []

    def __enter__(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.first)
        stack.enter_context(self.second)
        self._stacks.append(stack)

    def __exit__(self, *exc):
        return self._stacks.pop().__exit__(*exc)
