"""Where the tensors kept for backward live: on the device, or in a reusable host pool.

One `SavedTensors` per model. In forward the block runner opens one `Group` per span of blocks
(usually one block). Every tensor the span keeps for backward goes through `Group.store()`:
autograd's saved tensors through saved-tensor hooks, and a checkpoint's inputs through its
`Stash` (see checkpoint.py), so both are offloaded and counted the same way. `store()`

- returns parameters and buffers untouched (they are not activations);
- keeps, for a cast of a parameter (the bf16 weight autocast makes for a matmul), only a handle
  to the parameter, and casts it again in backward: the same rounding of the same fp32 values,
  so bitwise the same tensor, without keeping ~2 bytes per weight per block on the device or
  copying it to the host and back;
- keeps a tensor on the device without offload, or when it is smaller than `min_bytes`;
- otherwise copies its whole storage to the host pool, once per storage (views of it, e.g.
  the strided halves rotary embeddings save, come back as views of the same copy).

In backward, the first `load()` from any group (offloaded or not) brings that group's host
storages back to the device, newest first (backward needs the last saved first), and starts
the copies of the nearest earlier group that has host storages (prefetch), so that data is in
flight while this span recomputes and backpropagates; a non-offloaded span in between does not
stop the chain, and at most one group is ever prefetched ahead.

On CUDA, copies run on a dedicated high-priority side stream (not one of torch's pooled
streams, which NCCL also draws from): device->host waits for the compute stream that produced
the tensor, host->device is waited for by the compute stream before the tensor is used, and
`record_stream` keeps the caching allocator from reusing memory a pending copy still reads or
writes. One event per group is recorded when its span closes; a span waits for the copies of
the span two before it, so at most two spans' device->host copies are in flight (bounded
memory: an offloaded tensor's device memory is only reused once its copy has run). On the CPU
the same code path copies synchronously into the same kind of pool, with numbered stand-in
events, so it is what the CPU tests exercise.

Saved-tensor hooks switch off autograd's check that a saved tensor is not modified in place
before backward. A write before the span closes would race the pending copy; `check_versions`
(on by default: one integer compare per saved tensor) turns it into an error at span close.
"""

from __future__ import annotations

import contextlib
import ctypes
import weakref
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

POOL_ALIGN = 512  # bytes; keeps every pooled buffer aligned for fast (DMA) copies
CHUNK_BYTES = 1 << 30  # host pool chunk: a power of two, so torch's pinned allocator rounds nothing up


def _aligned(nbytes: int) -> int:
    return -(-nbytes // POOL_ALIGN) * POOL_ALIGN


class HostPool:
    """Host buffers reused every step: a bump allocator over fixed power-of-two chunks.

    torch's pinned host allocator rounds every request up to a power of two (and gives each one
    its own block), so a pool of per-tensor or odd-sized chunks pins up to twice what it asks
    for. Here every chunk is exactly `chunk_bytes` (a power of two) and a storage that does not
    fit in the rest of a chunk continues in the next one (it is copied piece by piece):
    pinned bytes = chunks * chunk_bytes, less than one chunk over the aligned bytes requested.

    `allocate(nbytes)` returns a (nbytes,) uint8 host tensor (pinned on CUDA); injectable so
    the bookkeeping is testable on the CPU. The first step allocates the chunks it needs (or
    `reserve()` does, at build time); `reset()` rewinds the cursor, and a later step with the
    same shapes takes exactly the same buffers, so no host memory is allocated or pinned per step.
    """

    def __init__(self, allocate, chunk_bytes: int = CHUNK_BYTES):
        if chunk_bytes < POOL_ALIGN or chunk_bytes & (chunk_bytes - 1):
            raise ValueError(f"host pool chunk_bytes({chunk_bytes}) must be a power of two >= {POOL_ALIGN}")
        self.allocate, self.chunk_bytes = allocate, chunk_bytes
        self.chunks: list[torch.Tensor] = []  # (chunk_bytes,) uint8 each
        self._chunk, self._offset = 0, 0
        self.peak_requested = 0  # most aligned bytes handed out between two resets

    def alloc(self, nbytes: int) -> list[tuple[int, torch.Tensor]]:
        """Host space for a storage of nbytes, valid until the next reset(): (offset in the
        storage, (n,) uint8 piece) pairs covering [0, nbytes) in order, one per chunk touched."""
        pieces, done = [], 0
        while done < nbytes:
            if self._chunk == len(self.chunks):
                self.chunks.append(self.allocate(self.chunk_bytes))
            n = min(self.chunk_bytes - self._offset, nbytes - done)
            pieces.append((done, self.chunks[self._chunk][self._offset:self._offset + n]))
            done += n
            # a piece ends either at the chunk's end (a multiple of POOL_ALIGN) or at the storage's
            # end, so every piece, and its slice of the device storage, starts aligned
            self._offset += _aligned(n)
            if self._offset >= self.chunk_bytes:
                self._chunk, self._offset = self._chunk + 1, 0
        self.peak_requested = max(self.peak_requested, self.requested)
        return pieces

    @property
    def requested(self) -> int:
        """Aligned bytes handed out since the last reset()."""
        return self._chunk * self.chunk_bytes + self._offset

    def reserve(self, nbytes: int) -> None:
        """Allocate (pin) now the chunks that nbytes of storages will need: at build time, so
        that step 1 does not stall every stream on pinning (cudaHostAlloc synchronises)."""
        while self.capacity < nbytes:
            self.chunks.append(self.allocate(self.chunk_bytes))

    def reset(self) -> None:
        self._chunk, self._offset = 0, 0

    @property
    def capacity(self) -> int:
        return len(self.chunks) * self.chunk_bytes

    @property
    def pinned_bytes(self) -> int:
        """Host bytes the pool holds (pinned on CUDA): what torch's host allocator reports for
        it, since each chunk is one power-of-two request. The planner's formula for it, from the
        offloaded storages' sizes n_i: ceil(sum(ceil(n_i / 512) * 512) / chunk_bytes) * chunk_bytes."""
        return self.capacity


def _dedicated_stream(device: torch.device):
    """A CUDA stream of the highest priority that nothing else uses.

    torch.cuda.Stream() hands out one of 32 pooled streams per priority, round robin, and
    ProcessGroupNCCL draws from the same pools: a copy could queue behind a collective. So the
    stream is created through the CUDA runtime and wrapped; if the runtime library cannot be
    found, a pooled high-priority stream (NCCL uses the low-priority pool by default) is used.
    """
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        current.synchronize()  # the runtime's context exists on this thread
        _, highest = current.priority_range()  # (lowest, highest); a lower number is a higher priority
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
            try:
                cudart = ctypes.CDLL(name)  # already loaded by torch: found by its soname
            except OSError:
                continue
            create = cudart.cudaStreamCreateWithPriority
            create.argtypes, create.restype = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int], ctypes.c_int
            handle = ctypes.c_void_p()
            if create(ctypes.byref(handle), 1, highest) == 0:  # 1: cudaStreamNonBlocking, as torch's streams
                # never destroyed: one per model, alive as long as copies may use it
                return torch.cuda.ExternalStream(handle.value, device=device), "dedicated"
        return torch.cuda.Stream(device, priority=highest), "pooled high-priority"


class _Copier:
    """Device <-> host copies of uint8 buffers, and the events that order them.

    CUDA: a dedicated side stream and CUDA events. CPU: the same calls, synchronous, with
    numbered stand-in events; `log`, when a list, records every call in order (the tests read
    the order of copies and waits from it).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.stream, self.stream_kind = _dedicated_stream(device) if self.cuda else (None, "none")
        self.log: list | None = None
        self._events = 0

    def _note(self, *entry) -> None:
        if self.log is not None:
            self.log.append(entry)

    def to_host(self, src: torch.Tensor, pieces: list) -> None:
        """src (nbytes,) uint8 on the device -> the pool's pieces, (offset, piece) pairs."""
        self._note("d2h", pieces[0][1].data_ptr() if pieces else None)
        if not self.cuda:
            for off, piece in pieces:
                piece.copy_(src[off:off + piece.numel()])
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # src is computed
        with torch.cuda.stream(self.stream):
            for off, piece in pieces:
                piece.copy_(src[off:off + piece.numel()], non_blocking=True)
        src.record_stream(self.stream)  # src's memory is not reused before the copy has read it

    def to_device(self, pieces: list, nbytes: int) -> torch.Tensor:
        """A fresh (nbytes,) uint8 device tensor filled from the pieces (the pool is overwritten
        next step); on CUDA allocated and filled on the side stream, after its own
        device->host copy (same stream)."""
        self._note("h2d", pieces[0][1].data_ptr() if pieces else None)
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            for off, piece in pieces:
                out[off:off + piece.numel()].copy_(piece, non_blocking=self.cuda)
        return out

    def record(self):
        """An event after every copy queued so far."""
        self._events += 1
        self._note("record", self._events)
        return self.stream.record_event() if self.cuda else self._events

    def wait(self, event) -> None:
        """Make the compute stream wait for `event`."""
        self._note("wait", event if not self.cuda else None)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(event)

    def used_here(self, tensor: torch.Tensor) -> None:
        """`tensor`, allocated on the side stream, is used (and freed) on the compute stream."""
        if self.cuda:
            tensor.record_stream(torch.cuda.current_stream(self.device))

    def warm_up(self, nbytes: int) -> None:
        """Let the caching allocator reserve nbytes for the side stream now (at build time):
        step 1's first reloads would otherwise cudaMalloc, which can stall every stream."""
        if self.cuda and nbytes > 0:
            with torch.cuda.stream(self.stream):
                del_me = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            del del_me  # back to the side stream's pool, not to the driver


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage, shared by all its views (real and fake tensors alike)."""
    return t.untyped_storage()._cdata


def _bytes_view(storage: torch.UntypedStorage, device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


def parameter_cast_of(t: torch.Tensor) -> nn.Parameter | None:
    """The parameter `t` is a dtype cast of (or a view of such a cast), else None.

    Autocast casts a weight with `_to_copy` under autograd, so the cast's grad_fn is a
    ToCopyBackward0 whose only input is the parameter's AccumulateGrad; the matmul then saves
    the cast or a view of it (linear saves weight.t()). Only a contiguous cast of the whole
    contiguous parameter qualifies: `param.to(dtype)` rebuilds exactly that layout.
    """
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or len(fn.next_functions) != 1:
        return None
    acc = fn.next_functions[0][0]
    param = getattr(acc, "variable", None)
    if not isinstance(param, nn.Parameter) or param.dtype == base.dtype or base.storage_offset() != 0:
        return None
    if base.shape != param.shape or not (base.is_contiguous() and param.is_contiguous()) or base.device != param.device:
        return None
    return param


@dataclass
class _Recast:
    """What a pack hook returns for a cast of a parameter: the parameter and how to rebuild the view."""
    param: nn.Parameter
    version: int  # param._version at save: an in-place update before backward would change the cast
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int

    def unpack(self) -> torch.Tensor:
        if self.param._version != self.version:
            raise RuntimeError(f"a parameter of shape {tuple(self.param.shape)} was modified in place between "
                               f"forward and backward; the {self.dtype} cast saved for backward cannot be rebuilt")
        cast = self.param.detach().to(self.dtype)  # the same rounding as the forward's cast: bitwise equal
        return cast.as_strided(self.shape, self.stride, self.offset)


@dataclass
class _HostStorage:
    """One device storage copied to the host pool; `device_copy` is filled by the reload."""
    pieces: list  # (offset, (n,) uint8 host piece) pairs
    nbytes: int
    device_copy: torch.Tensor | None = None


@dataclass
class _Offloaded:
    """What a pack hook returns for an offloaded tensor: where its storage went and the view."""
    group: "Group"
    storage: _HostStorage
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int

    def unpack(self) -> torch.Tensor:
        self.group.wait_reload()
        copy = self.storage.device_copy
        out = torch.empty(0, dtype=self.dtype, device=copy.device)
        return out.set_(copy.untyped_storage(), self.offset, self.shape, self.stride)


@dataclass
class _Pending:
    """A saved tensor whose version is checked when its span closes (see check_versions)."""
    tensor: torch.Tensor
    version: int


class Group:
    """The tensors one span of blocks keeps for backward (see the module docstring)."""

    def __init__(self, saved: "SavedTensors", label: str, offload: bool):
        self.saved, self.label, self.offload = saved, label, offload
        self._host: dict[int, _HostStorage] = {}  # storage_key of a device storage -> its host copy
        self._sources: list[_Pending] = []  # offloaded tensors, held until close() (keys stay unique)
        self.event = None  # recorded at close() after this group's device->host copies
        self.reloaded = False  # host->device copies started
        self._reload_event = None
        self._reload_waited = False
        self._visited = False  # a load() from this group has run (and has started the prefetch)

    @property
    def has_copies(self) -> bool:
        return bool(self._host)

    @property
    def done(self) -> bool:
        """Nothing of this group's still needs its host buffers."""
        return not self._host or self.reloaded

    def store(self, t: torch.Tensor):
        """Keep `t` for backward; returns t (detached), a _Recast or an _Offloaded handle (see `load`)."""
        saved = self.saved
        key = storage_key(t)
        if key in saved.static or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            # A parameter or buffer, or a view of one (linear saves weight.t()): not an
            # activation. Kept as autograd would keep it (ZeRO-3 gathers parameters into new
            # storages after begin_forward, hence the isinstance checks).
            return t
        param = parameter_cast_of(t)
        if param is not None:  # not an activation either: recast in backward, not counted
            return _Recast(param, param._version, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        nbytes = t.untyped_storage().nbytes()
        if not self.offload or nbytes < saved.min_bytes or t.device.type != saved.device.type:
            if saved.accountant is not None:
                saved.accountant.add(self.label, key, nbytes, host=False)
            # detached: a tensor an op saves of its own output would otherwise hold that op's
            # node, which holds it (a cycle that keeps a graph alive when backward never runs)
            return t.detach()
        host = self._host.get(key)
        if host is None:
            src = _bytes_view(t.untyped_storage(), t.device)  # (nbytes,) uint8
            host = _HostStorage(saved.pool.alloc(nbytes), nbytes)
            saved.copier.to_host(src, host.pieces)
            self._host[key] = host
            if saved.accountant is not None:
                saved.accountant.add(self.label, ("host", id(self), key), nbytes, host=True)
        # Held until close: no other storage may take this one's key before then (it would be
        # mistaken for it), and its version is checked then.
        self._sources.append(_Pending(t.detach(), t._version))
        return _Offloaded(self, host, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def load(self, packed) -> torch.Tensor:
        """The unpack hook (and Stash.take's): every load of every group drives the prefetch."""
        self.fetch()
        return packed.unpack() if isinstance(packed, (_Offloaded, _Recast)) else packed

    def hooks(self):
        """Saved-tensor hooks that send what autograd saves in this span through store().

        Needed when offloading or measuring; under autocast (weights are recast, not kept);
        and in every span once any span offloads, so that non-offloaded spans' backward
        continues the prefetch chain."""
        saved = self.saved
        autocast = torch.amp.is_autocast_available(saved.device.type) and torch.is_autocast_enabled(saved.device.type)
        if not (self.offload or saved.offloading or autocast or saved.accountant is not None):
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(self.store, self.load)

    def close(self) -> None:
        """End of the span's forward: one event after all of its device->host copies."""
        if self.saved.check_versions:
            for p in self._sources:
                if p.tensor._version != p.version:
                    raise RuntimeError(
                        f"{self.label}: a {p.tensor.dtype} tensor of shape {tuple(p.tensor.shape)} saved for backward "
                        "was modified in place before its span ended; under offload its host copy races the write")
        self._sources.clear()
        if self._host:
            self.event = self.saved.copier.record()

    def fetch(self) -> None:
        """Bring this group's host storages back (once) and start the copies of the nearest
        earlier group that has any, whose backward comes next among the offloaded (prefetch)."""
        if self._visited:
            return
        self._visited = True
        self.reload()
        before = self.saved.offloaded_before(self)
        if before is not None:
            before.reload()  # a no-op when already prefetched: at most one group ahead

    def reload(self) -> None:
        """Start the host->device copies, newest storage first (backward needs it first)."""
        if self.reloaded or not self._host:
            return
        self.reloaded = True
        copier = self.saved.copier
        for s in reversed(self._host.values()):
            s.device_copy = copier.to_device(s.pieces, s.nbytes)
        self._reload_event = copier.record()

    def wait_reload(self) -> None:
        """The compute stream waits (once) for this group's reloads before using them."""
        if self._reload_waited:
            return
        self._reload_waited = True
        copier = self.saved.copier
        copier.wait(self._reload_event)
        for s in self._host.values():
            copier.used_here(s.device_copy)


class SavedTensors:
    """The model's saved-tensor manager: host pool and copier, groups of this forward."""

    def __init__(self, model: nn.Module, min_bytes: int = 0):
        self.model, self.min_bytes = model, min_bytes
        self.accountant = None  # set by ActivationAccountant while it measures
        self.offloading = False  # some span offloads (set by the block runner)
        self.check_versions = True  # in-place writes to saved tensors before span close raise
        self.chunk_bytes = CHUNK_BYTES  # host pool chunk (read when the pool is built)
        self.device: torch.device | None = None
        self.pool: HostPool | None = None
        self.copier: _Copier | None = None
        self.static: set[int] = set()
        self._groups: list[weakref.ref] = []
        self._in_flight: deque = deque()  # close events of groups whose device->host copies may still run
        self.current: Group | None = None

    def build(self, device: torch.device) -> None:
        """Pool and copier for `device` (once)."""
        if self.device is not None:
            return
        self.device = device
        pin = device.type == "cuda"
        self.pool = HostPool(lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=pin), self.chunk_bytes)
        self.copier = _Copier(device)

    def reserve(self, device: torch.device, host_bytes: int, reload_bytes: int = 0) -> None:
        """At build time: pin the host pool for host_bytes and reserve reload_bytes of device
        memory for the side stream (what two reloaded spans take), so step 1 does not stall."""
        self.build(device)
        self.pool.reserve(host_bytes)
        self.copier.warm_up(reload_bytes)

    def begin_forward(self, device: torch.device, shared=()) -> None:
        """Called once per model forward, before the first block. shared: tensors that the
        forward holds for all blocks (rotary angles, a document mask): like parameters, never
        stored as a block's activations (nor offloaded once per block)."""
        self.build(device)
        # Parameters and buffers can be re-materialised (init_weights, DeepSpeed): look them up
        # every forward; a set of a few hundred pointers.
        # The storages are held until the next forward: a storage ZeRO-3 swaps out of a
        # parameter is freed, and an activation allocated later could take its key.
        self._static_storages = [t.untyped_storage() for t in (*self.model.parameters(), *self.model.buffers())]
        # The shared tensors are alive for the whole forward (the only time store() runs) and
        # are not held here: the last step's mask must not outlive its backward.
        self.static = {s._cdata for s in self._static_storages} | {t.untyped_storage()._cdata for t in shared}
        self._in_flight.clear()  # the previous forward's copies precede this one's on the same stream
        live = [g for g in (ref() for ref in self._groups) if g is not None]
        if all(g.done for g in live):
            # Every group of earlier forwards was consumed by its backward (or freed with its
            # graph): their host buffers are free again.
            self._groups = []
            self.pool.reset()
        else:  # a forward whose backward has not run yet still owns pool space: keep it
            self._groups = [weakref.ref(g) for g in live]

    def open_group(self, label: str, offload: bool) -> Group:
        # At most two spans' device->host copies in flight (the previous span's, and this
        # one's): otherwise, with host bandwidth below compute speed, "offloaded" tensors would
        # stay allocated for most of the forward (their memory is only reused once their copy
        # has run). Two rather than one: the previous span's copies overlap this span's compute
        # instead of stalling its start.
        while len(self._in_flight) > 1:
            self.copier.wait(self._in_flight.popleft())
        group = Group(self, label, offload)
        self._groups.append(weakref.ref(group))
        self.current = group
        return group

    def close_group(self, group: Group) -> None:
        try:
            group.close()
        finally:
            self.current = None
        if group.event is not None:
            self._in_flight.append(group.event)

    def offloaded_before(self, group: Group) -> Group | None:
        """The nearest live group opened before `group` (same forward) that has host copies."""
        found = None
        for ref in self._groups:
            g = ref()
            if g is group:
                return found
            if g is not None and g.has_copies:
                found = g
        return None
