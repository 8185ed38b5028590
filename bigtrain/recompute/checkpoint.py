"""bigtrain's checkpoint function: non-reentrant, RNG-exact, input-preserving.

    y = checkpoint(fn, stash, *args, rng=tracker)   # fn(stash, *args); fn calls stash.take()

It is torch.utils.checkpoint in non-reentrant mode (saved-tensor hooks: works with DDP and the
DeepSpeed engine, no "mark a variable ready only once"), plus what the anchors' users miss:

- **Every RNG stream is replayed.** On entry to the forward we capture the default CPU
  generator, the current CUDA device's (when CUDA is in use) and every named stream of the
  tensor-parallel tracker; the recompute runs with exactly those states and puts the live ones
  back afterwards, so dropout masks in the replay are the forward's and the streams advance as
  if nothing had been recomputed.
- **The caller's tensors are never touched.** The inputs travel in a `Stash`: in forward fn gets
  the caller's own tensors; the stash keeps a copy of what backward needs (the tensor itself, a
  host copy, or this rank's 1/tp slice) and hands fresh tensors to the recompute. Nothing is
  emptied or resized in place (DeepSpeed's partitioning empties its input).
- **Side effects run once.** `is_recomputing()` is true only inside a replay; code that records
  metrics or auxiliary values checks it.
- Tensor inputs do not go through torch's own input saving (which would keep the whole
  tensor): that is what lets a stash keep a slice or a host copy instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.utils.checkpoint as torch_checkpoint

from bigtrain.parallel.dims import ParallelDims
from bigtrain.parallel.mappings import all_gather, start_all_gather
from bigtrain.parallel.random import RNGTracker, get_default_rng_state, set_default_rng_state

_RECOMPUTING = contextvars.ContextVar("bigtrain_recomputing", default=False)


def is_recomputing() -> bool:
    """True while a checkpointed region is being re-run for backward."""
    return _RECOMPUTING.get()


def checkpoint(fn, stash: "Stash", *args, rng: RNGTracker | None = None, kept=None):
    """fn(stash, *args), recomputed in backward from what `stash` kept (see the module docstring).

    `args` are passed as they are (e.g. the rotary table, a buffer); tensors that must be kept
    for backward belong in the stash. `kept`: a pointwise.Kept, for op-level selective
    recompute (the matmul and attention outputs are kept, not recomputed; see pointwise.py).
    """
    if not torch.is_grad_enabled():
        return fn(stash, *args)
    return torch_checkpoint.checkpoint(fn, stash, *args, use_reentrant=False, preserve_rng_state=False,
                                       context_fn=functools.partial(_replay_contexts, rng, kept))


def _replay_contexts(rng: RNGTracker | None, kept=None):
    """(forward context, recompute context) for torch's checkpoint: capture, then replay, every
    RNG (and, with `kept`, keep the compute ops' outputs, then hand them to the replay)."""
    replay = _Replay(rng)
    if kept is None:
        return replay.forward(), replay
    from bigtrain.recompute.pointwise import Both
    return Both(replay.forward(), kept.forward_mode()), Both(replay, kept.replay_mode())


class _Replay:
    """Replays the RNG states captured on entry to the forward, each time it is entered: torch
    enters the same recompute context again for a second backward (retain_graph, autograd.grad)."""

    def __init__(self, rng: RNGTracker | None):
        self.rng = rng
        self.captured: tuple | None = None
        self._live: list = []

    @contextlib.contextmanager
    def forward(self):
        self.captured = (get_default_rng_state(), self.rng.get_states() if self.rng is not None else None)
        yield

    def __enter__(self):
        live = (get_default_rng_state(), self.rng.get_states() if self.rng is not None else None)
        default, named = self.captured
        set_default_rng_state(default)
        if self.rng is not None:
            self.rng.set_states(named)
        self._live.append((live, _RECOMPUTING.set(True)))

    def __exit__(self, *exc) -> bool:
        # Also when torch stops the replay early (all needed tensors recomputed): the streams
        # continue from where the forward left them, not from the replay.
        (default, named), token = self._live.pop()
        _RECOMPUTING.reset(token)
        set_default_rng_state(default)
        if self.rng is not None:
            self.rng.set_states(named)
        return False


class Stash:
    """The tensor inputs of one checkpoint, kept for its recompute.

    take() returns the caller's tensors the first time (the forward) and, afterwards (the
    recompute), fresh tensors rebuilt from what was kept, detached and with the originals'
    requires_grad. What is kept goes through the span's Group (device, or host pool under
    offload, and counted by the accountant). With `partition`, each tensor is kept as this
    rank's 1/tp of its flattened elements (zero-padded when tp does not divide it) and is
    all-gathered over the TP group for the recompute.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], group, partition: ParallelDims | None = None):
        self._live = tensors
        self._group = group
        self._partition = partition if partition is not None and partition.tp > 1 else None
        self._meta = [(t.shape, t.requires_grad) for t in tensors]
        self._kept = [group.store(self._piece(t)) if group is not None else self._piece(t) for t in tensors]
        self.before: Stash | None = None
        """The previous span's partitioned stash (set by the block runner): its recompute comes
        right after this one's, so this one's replay starts its all-gathers (`prefetch`)."""
        self._gathering: list | None = None  # (output, work) per tensor, started by prefetch()

    def take(self) -> tuple[torch.Tensor, ...]:
        if self._live is not None:
            live, self._live = self._live, None  # the forward: drop our reference to the caller's tensors
            return live
        gathering, self._gathering = self._gathering, None
        out = []
        for i, (kept, (shape, requires_grad)) in enumerate(zip(self._kept, self._meta)):
            t = self._group.load(kept) if self._group is not None else kept  # (drives the offload chain)
            if gathering is not None:  # started during the next span's backward
                full, work = gathering[i]
                work.wait()
                t = full[:shape.numel()].view(shape)
            elif self._partition is not None:
                t = self._gather(t, shape)
            out.append(t.detach().requires_grad_(requires_grad))
        if self.before is not None:
            self.before.prefetch()  # overlaps this span's recompute and backward
        return tuple(out)

    def prefetch(self) -> None:
        """Start the all-gathers of a partitioned stash's pieces now, ahead of its recompute, when
        they are on the device (an offloaded piece's reload is prefetched by the offload chain)."""
        if self._partition is None or self._live is not None or self._gathering is not None:
            return
        if not all(isinstance(k, torch.Tensor) for k in self._kept):
            return
        self._gathering = [start_all_gather(k, self._partition.tp_group) for k in self._kept]

    def _piece(self, t: torch.Tensor) -> torch.Tensor:
        if self._partition is None:
            return t.detach()
        tp, rank = self._partition.tp, self._partition.tp_rank
        flat = t.detach().reshape(-1)  # (n,)
        per_rank = -(-flat.numel() // tp)
        start = min(rank * per_rank, flat.numel())
        stop = min(start + per_rank, flat.numel())
        piece = flat.new_zeros(per_rank)  # (ceil(n / tp),): a copy, never a view of the caller's tensor
        piece[:stop - start].copy_(flat[start:stop])
        return piece

    def _gather(self, piece: torch.Tensor, shape) -> torch.Tensor:
        full = all_gather(piece, 0, self._partition.tp_group)  # (tp * ceil(n / tp),), rank order
        return full[:shape.numel()].view(shape)

