"""Where the tensors kept for backward live: on the device, or in a reusable host pool.

One `SavedTensors` per model. In forward the block runner opens one `Group` per span of blocks
(usually one block). Every tensor the span keeps for backward goes through `Group.store()`:
autograd's saved tensors through saved-tensor hooks, and a checkpoint's inputs through its
`Stash` (see checkpoint.py), so both are offloaded and counted the same way. `store()`

- returns parameters and buffers untouched (they are not activations);
- keeps a tensor on the device without offload, or when it is smaller than `min_bytes`;
- otherwise copies its whole storage to the host pool, once per storage (views of it, e.g.
  the strided halves rotary embeddings save, come back as views of the same copy).

In backward, the first `load()` from a group brings all of that group's host storages back to
the device and immediately starts the copy of the group before it (prefetch), so that data is
in flight while this span recomputes and backpropagates.

On CUDA, copies run on a side stream: device->host waits for the compute stream that produced
the tensor, host->device is waited for by the compute stream before the tensor is used, and
`record_stream` keeps the caching allocator from reusing memory a pending copy still reads or
writes. On the CPU the same code path copies synchronously into the same kind of pool, so it
is what the CPU tests exercise.

Saved-tensor hooks switch off autograd's check that a saved tensor is not modified in place
before backward: under offload, an in-place write to a tensor after it was saved goes unnoticed
(the host copy is the older value). bigtrain's blocks make no such writes.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn

_ALIGN = 512  # bytes; keeps every pooled buffer aligned for fast (DMA) copies


class HostPool:
    """Host buffers reused every step: a bump allocator over chunks.

    The first step allocates the chunks it needs (pinned on CUDA, so device<->host copies are
    asynchronous); `reset()` rewinds the cursor, and a later step with the same shapes takes
    exactly the same buffers, so no host memory is allocated or pinned per step.
    """

    def __init__(self, pin: bool, chunk_bytes: int = 64 << 20):
        self.pin, self.chunk_bytes = pin, chunk_bytes
        self.chunks: list[torch.Tensor] = []  # uint8 buffers
        self._chunk, self._offset = 0, 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A (nbytes,) uint8 host buffer, valid until the next reset()."""
        need = -(-nbytes // _ALIGN) * _ALIGN
        while self._chunk < len(self.chunks) and self._offset + need > self.chunks[self._chunk].numel():
            self._chunk, self._offset = self._chunk + 1, 0
        if self._chunk == len(self.chunks):
            self.chunks.append(torch.empty(max(need, self.chunk_bytes), dtype=torch.uint8, pin_memory=self.pin))
        out = self.chunks[self._chunk][self._offset:self._offset + nbytes]
        self._offset += need
        return out

    def reset(self) -> None:
        self._chunk, self._offset = 0, 0

    @property
    def capacity(self) -> int:
        return sum(c.numel() for c in self.chunks)


class _Copier:
    """Device <-> host copies of uint8 buffers: a side stream and events on CUDA, plain copies on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def to_host(self, src: torch.Tensor, dst: torch.Tensor):
        if not self.cuda:
            dst.copy_(src)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # src is computed
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.stream)  # src's memory is not reused before the copy has read it
        return self.stream.record_event()

    def to_device(self, src: torch.Tensor) -> tuple[torch.Tensor, object]:
        # Always a fresh device tensor (a clone on the CPU): the pool is overwritten next step.
        if not self.cuda:
            return src.clone(), None
        with torch.cuda.stream(self.stream):  # after this buffer's own device->host copy
            out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            out.copy_(src, non_blocking=True)
        return out, self.stream.record_event()

    def ready(self, tensor: torch.Tensor, event) -> None:
        """Make the compute stream wait for `tensor`'s copy before using it."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        tensor.record_stream(current)  # allocated on the side stream, freed after use on this one


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage, shared by all its views (real and fake tensors alike)."""
    return t.untyped_storage()._cdata


def _bytes_view(storage: torch.UntypedStorage, device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


@dataclass
class _HostStorage:
    """One device storage copied to the host pool; `device_copy` is filled by fetch()."""
    host: torch.Tensor  # uint8
    event: object = None
    device_copy: torch.Tensor | None = None
    device_event: object = None


@dataclass
class _Offloaded:
    """What a pack hook returns for an offloaded tensor: where its storage went and the view."""
    group: "Group"
    storage: _HostStorage
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int

    def load(self) -> torch.Tensor:
        self.group.fetch()
        s = self.storage
        self.group.saved.copier.ready(s.device_copy, s.device_event)
        out = torch.empty(0, dtype=self.dtype, device=s.device_copy.device)
        return out.set_(s.device_copy.untyped_storage(), self.offset, self.shape, self.stride)


def _load(packed):
    return packed.load() if isinstance(packed, _Offloaded) else packed


class Group:
    """The tensors one span of blocks keeps for backward (see the module docstring)."""

    def __init__(self, saved: "SavedTensors", label: str, offload: bool):
        self.saved, self.label, self.offload = saved, label, offload
        self._host: dict[int, _HostStorage] = {}  # storage_key of a device storage -> its host copy
        self._pinned_sources: list[torch.Tensor] = []  # device storages kept alive until close()
        self.fetched = not offload  # nothing to fetch without offload
        self._prefetched = self.fetched
        self.last_event = None  # the newest device->host copy (CUDA), see SavedTensors.open_group

    def store(self, t: torch.Tensor):
        """Keep `t` for backward; returns t (detached) or an _Offloaded handle (see `load`)."""
        saved = self.saved
        key = storage_key(t)
        if key in saved.static or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            # A parameter or buffer, or a view of one (linear saves weight.t()): not an
            # activation. Kept as autograd would keep it (ZeRO-3 gathers parameters into new
            # storages after begin_forward, hence the isinstance checks).
            return t
        nbytes = t.untyped_storage().nbytes()
        if not self.offload or nbytes < saved.min_bytes or t.device.type != saved.device.type:
            if saved.accountant is not None:
                saved.accountant.add(self.label, key, nbytes, host=False)
            # detached: a tensor an op saves of its own output would otherwise hold that op's
            # node, which holds it (a cycle that keeps a graph alive when backward never runs)
            return t.detach()
        host = self._host.get(key)
        if host is None:
            src = _bytes_view(t.untyped_storage(), t.device)
            host = _HostStorage(saved.pool.alloc(nbytes))
            host.event = saved.copier.to_host(src, host.host)
            self._host[key] = host
            # Until this group closes, no other storage may take this one's key (it would be
            # mistaken for it): keep the storage alive until then.
            self._pinned_sources.append(src)
            if saved.accountant is not None:
                saved.accountant.add(self.label, ("host", id(self), key), nbytes, host=True)
        self.last_event = host.event
        return _Offloaded(self, host, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def load(self, packed) -> torch.Tensor:
        return _load(packed)

    def hooks(self):
        """Saved-tensor hooks that send what autograd saves in this span through store()."""
        if not self.offload and self.saved.accountant is None:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(self.store, _load)

    def close(self) -> None:
        """End of the span's forward."""
        self._pinned_sources.clear()

    def fetch(self) -> None:
        """Called by every load(): bring this group's host storages back (once) and start the
        copies of the group before it, whose backward comes next (prefetch)."""
        if self._prefetched:
            return
        self._prefetched = True
        self._start_copies()
        before = self.saved.group_before(self)
        if before is not None:
            before._start_copies()

    def _start_copies(self) -> None:
        if self.fetched:
            return
        self.fetched = True
        for s in self._host.values():
            s.device_copy, s.device_event = self.saved.copier.to_device(s.host)


class SavedTensors:
    """The model's saved-tensor manager: host pool and copier, groups of this forward."""

    def __init__(self, model: nn.Module, min_bytes: int = 0):
        self.model, self.min_bytes = model, min_bytes
        self.accountant = None  # set by ActivationAccountant while it measures
        self.device: torch.device | None = None
        self.pool: HostPool | None = None
        self.copier: _Copier | None = None
        self.static: set[int] = set()
        self._groups: list[weakref.ref] = []
        self.current: Group | None = None

    def begin_forward(self, device: torch.device) -> None:
        """Called once per model forward, before the first block."""
        if self.device is None:
            self.device = device
            self.pool = HostPool(pin=device.type == "cuda")
            self.copier = _Copier(device)
        # Parameters and buffers can be re-materialised (init_weights, DeepSpeed): look them up
        # every forward; a set of a few hundred pointers.
        # The storages are held until the next forward: a storage ZeRO-3 swaps out of a
        # parameter is freed, and an activation allocated later could take its key.
        self._static_storages = [t.untyped_storage() for t in (*self.model.parameters(), *self.model.buffers())]
        self.static = {s._cdata for s in self._static_storages}
        live = [g for g in (ref() for ref in self._groups) if g is not None]
        if all(g.fetched for g in live):
            # Every group of earlier forwards was consumed by its backward (or freed with its
            # graph): their host buffers are free again.
            self._groups = []
            if self.pool is not None:
                self.pool.reset()
        else:  # a forward whose backward has not run yet still owns pool space: keep it
            self._groups = [weakref.ref(g) for g in live]

    def open_group(self, label: str, offload: bool) -> Group:
        previous = self._groups[-1]() if self._groups else None
        if previous is not None and previous.last_event is not None:
            # At most one span's device->host copies in flight: otherwise, with host bandwidth
            # below compute speed, "offloaded" tensors would stay allocated for most of the
            # forward (their memory is only reused once their copy has run).
            torch.cuda.current_stream(self.device).wait_event(previous.last_event)
        group = Group(self, label, offload)
        self._groups.append(weakref.ref(group))
        self.current = group
        return group

    def close_group(self, group: Group) -> None:
        group.close()
        self.current = None

    def group_before(self, group: Group) -> Group | None:
        """The live group opened just before `group` in this forward, if any."""
        previous = None
        for ref in self._groups:
            g = ref()
            if g is group:
                return previous
            if g is not None:
                previous = g
        return None
