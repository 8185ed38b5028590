"""Named random streams for dropout under tensor parallelism (after Megatron's RNG tracker).

Two kinds of dropout exist once a layer is split:
- on replicated tensors (the residual stream without sequence parallelism): every TP rank must
  draw the SAME mask, so it uses torch's default generator, seeded identically on all ranks
  and advanced in lockstep;
- inside split regions (attention dropout on this rank's heads, dropout on this rank's
  sequence slice): ranks must draw DIFFERENT masks, so it runs under `tracker.fork("tp")`,
  a stream seeded with seed + offset + tp_rank.

`fork` swaps the named state into the default generators (CPU, and the current CUDA device's
when CUDA is in use) and swaps it back out afterwards, so code inside calls plain torch ops.
`get_states` / `set_states` capture and restore every named stream; together with
`get_default_rng_state` / `set_default_rng_state` they let recompute replay dropout exactly.

The tracker is an object (one per model, see parallelize), never a module global. CUDA states
are created lazily, only once CUDA is initialised, so the tracker can be built before the
device is known and never touches CUDA in CPU-only (or forked) processes.
"""

from __future__ import annotations

import contextlib

import torch

TP = "tp"
TP_SEED_OFFSET = 2718  # Megatron's: keeps the "tp" stream clear of the default seed's stream


def _cuda_on() -> bool:
    # is_initialized, not is_available: before CUDA is initialised no kernel has drawn from a
    # CUDA generator, and probing CUDA would break processes forked from a CUDA parent.
    return torch.cuda.is_initialized()


def get_default_rng_state() -> dict:
    """The default generators' states: CPU, and the current CUDA device's when CUDA is in use."""
    state = {"cpu": torch.get_rng_state(), "cuda": {}}
    if _cuda_on():
        idx = torch.cuda.current_device()
        state["cuda"][idx] = torch.cuda.get_rng_state(idx)
    return state


def set_default_rng_state(state: dict) -> None:
    """Restore what get_default_rng_state captured."""
    torch.set_rng_state(state["cpu"])
    for idx, s in state["cuda"].items():
        torch.cuda.set_rng_state(s, idx)


class RNGTracker:
    """Named RNG states, swapped into torch's default generators by fork(name)."""

    def __init__(self):
        self._states: dict[str, dict] = {}  # name -> {"seed", "cpu", "cuda": {device: state}}
        self._active: list[tuple[str, dict | None]] = []  # fork stack: (name, saved default state)

    @property
    def names(self) -> list[str]:
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """A new stream `name` seeded with `seed` (its CUDA state is made from the same seed)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        cpu = torch.Generator().manual_seed(seed).get_state()
        self._states[name] = {"seed": seed, "cpu": cpu, "cuda": {}}

    @contextlib.contextmanager
    def fork(self, name: str = TP):
        """Run the body with stream `name` in the default generators; its advance is kept."""
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def enter(self, name: str) -> None:
        """The first half of fork(), for forward pre-hooks (exit() is the second half)."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; streams: {self.names}")
        if self._active and self._active[-1][0] == name:
            self._active.append((name, None))  # already in this stream: nothing to swap
            return
        saved = get_default_rng_state()
        if self._active:
            # Suspending another stream: store its live state now, so that entering it again
            # further down (tp -> other -> tp) continues it instead of replaying stale draws.
            self._store(self._active[-1][0], saved["cuda"])
        self._load(name, saved["cuda"])
        self._active.append((name, saved))

    def exit(self) -> None:
        """Store the advanced stream and put back what was live before enter()."""
        name, saved = self._active.pop()
        if saved is None:
            return
        self._store(name, saved["cuda"])
        if self._active:  # resume the suspended stream from its latest state
            self._load(self._active[-1][0], saved["cuda"])
        else:
            set_default_rng_state(saved)

    def _store(self, name: str, cuda_devices) -> None:
        """The default generators' live state becomes stream `name`'s state."""
        state = self._states[name]
        state["cpu"] = torch.get_rng_state()
        for idx in cuda_devices:  # only devices swapped in by _load()
            state["cuda"][idx] = torch.cuda.get_rng_state(idx)

    def _load(self, name: str, cuda_devices) -> None:
        """Stream `name`'s state goes into the default generators (CPU and the devices in use)."""
        state = self._states[name]
        torch.set_rng_state(state["cpu"])
        for idx in cuda_devices:
            if idx not in state["cuda"]:  # first use on this device
                state["cuda"][idx] = torch.Generator(f"cuda:{idx}").manual_seed(state["seed"]).get_state()
            torch.cuda.set_rng_state(state["cuda"][idx], idx)

    def get_states(self) -> dict:
        """A copy of every named stream's state (call outside any fork)."""
        if self._active:
            raise RuntimeError(f"get_states() inside fork({self._active[-1][0]!r}): the live state is in the default generator")
        return {name: _copy(s) for name, s in self._states.items()}

    def set_states(self, states: dict) -> None:
        """Replace every named stream's state with a copy of `states` (from get_states)."""
        if self._active:
            raise RuntimeError(f"set_states() inside fork({self._active[-1][0]!r})")
        self._states = {name: _copy(s) for name, s in states.items()}


def _copy(state: dict) -> dict:
    return {"seed": state["seed"], "cpu": state["cpu"].clone(),
            "cuda": {idx: s.clone() for idx, s in state["cuda"].items()}}


def seed_rng(seed: int, dims, offset: int = TP_SEED_OFFSET) -> RNGTracker:
    """Seed the default generators with `seed` (identical on all ranks, so TP ranks draw the same
    masks on replicated tensors) and return a tracker whose "tp" stream is seeded with
    seed + offset + tp_rank (distinct per TP rank, for split regions)."""
    torch.manual_seed(seed)  # CPU and every CUDA device (lazily, if CUDA is not initialised)
    tracker = RNGTracker()
    tracker.add(TP, seed + offset + dims.tp_rank)
    return tracker
