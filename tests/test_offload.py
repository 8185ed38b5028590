"""CPU offload's bookkeeping, which is the same on a GPU: the chunked host pool and its pinned
bytes, the order of reloads, the last span kept on the device, two spans of copies in flight,
one event per group, the prefetch chain across non-offloaded spans, weight casts recast rather
than kept under autocast, and the error paths (a span that raises, an in-place write to a saved
tensor). The CPU copier logs its calls in order (`_Copier.log`); events are numbered stand-ins.
Gradients are compared bitwise (torch.equal) with the run that keeps everything.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigtrain.config import ModelConfig, RecomputeConfig
from bigtrain.model import build_model, init_weights
from bigtrain.parallel.dims import ParallelDims
from bigtrain.planner.formula import Shape, block_formula, saved_tensors
from bigtrain.recompute import ActivationAccountant, apply_recompute, is_recomputing, saved
from bigtrain.recompute.policy import Span, keep_last_on_device, spans_of
from bigtrain.recompute.saved import HostPool, SavedTensors

B, S = 2, 32
GiB = 2**30


def cfg(n_layers=5, dropout=0.1) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=100,
                       max_seq_len=64, dropout=dropout)


def rc(**kw) -> RecomputeConfig:
    r = RecomputeConfig(**{"offload_min_size": "0", **kw})
    r.validate()
    return r


def model_with(r: RecomputeConfig | None, c: ModelConfig, plan=None):
    model = build_model(c)
    if r is not None:
        apply_recompute(model, ParallelDims.single(), r, spans=plan)
    return init_weights(model, seed=0)


TOKENS = torch.randint(0, 100, (B, S + 1), generator=torch.Generator().manual_seed(3))


def step(model, autocast=False):
    """One forward/backward with a fixed dropout seed: the loss and every gradient."""
    torch.manual_seed(11)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        logits = model(TOKENS[:, :-1])
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got, ref):
    assert torch.equal(got[0], ref[0])
    for name, g in ref[1].items():
        assert torch.equal(got[1][name], g), name


def logged(model):
    """Warm up (pool and copier exist after one step), then log the copier's calls."""
    step(model)
    model.block_runner.saved.copier.log = []
    return model.block_runner.saved.copier.log


# ---------------------------------------------------------------------------------------------
# Item 1: the host pool


class FakeAllocator:
    """Stands in for torch's pinned host allocator: every request is rounded up to a power of two."""

    def __init__(self):
        self.requests: list[int] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        self.requests.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    @property
    def pinned(self) -> int:
        return sum(1 << (n - 1).bit_length() for n in self.requests)


def _chunk_offset(pool: HostPool, piece: torch.Tensor) -> int:
    (chunk,) = [c for c in pool.chunks if 0 <= piece.data_ptr() - c.data_ptr() < c.numel()]
    return piece.data_ptr() - chunk.data_ptr()


def test_pool_pins_whole_chunks_and_splits_storages_across_them():
    alloc = FakeAllocator()
    pool = HostPool(alloc, chunk_bytes=4096)
    sizes = [100, 4096, 5000, 700, 9000, 1]  # smaller than, equal to, and larger than a chunk
    got = [pool.alloc(n) for n in sizes]
    for n, pieces in zip(sizes, got):
        assert [off for off, _ in pieces] == sorted(off for off, _ in pieces) and pieces[0][0] == 0
        assert sum(p.numel() for _, p in pieces) == n  # the pieces cover [0, n) in order
        assert all(_chunk_offset(pool, p) % 512 == 0 for _, p in pieces)  # aligned for DMA
        assert all(a + p.numel() == b for (a, p), (b, _) in zip(pieces, pieces[1:]))
    ranges = sorted((p.data_ptr(), p.data_ptr() + p.numel()) for pieces in got for _, p in pieces)
    assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:]))  # nothing shared
    requested = sum(-(-n // 512) * 512 for n in sizes)
    assert pool.requested == pool.peak_requested == requested
    assert set(alloc.requests) == {4096}  # only whole power-of-two chunks are asked for ...
    assert pool.pinned_bytes == alloc.pinned == len(alloc.requests) * 4096  # ... so nothing is rounded up
    assert 0 <= pool.pinned_bytes - requested < 4096  # less than one chunk over what was asked
    # The next step takes exactly the same buffers: nothing new is allocated.
    pool.reset()
    again = [pool.alloc(n) for n in sizes]
    assert [[(o, p.data_ptr()) for o, p in x] for x in again] == [[(o, p.data_ptr()) for o, p in x] for x in got]
    assert len(alloc.requests) == len(pool.chunks)


def test_pool_reserve_and_chunk_size_checks():
    alloc = FakeAllocator()
    pool = HostPool(alloc, chunk_bytes=1024)
    pool.reserve(3000)
    assert alloc.requests == [1024] * 3
    pool.alloc(3000)
    assert len(alloc.requests) == 3  # reserved at build time: the step allocates nothing
    with pytest.raises(ValueError, match="power of two"):
        HostPool(alloc, chunk_bytes=3000)


def _old_pool_pinned(sizes: list[int], chunk: int = 64 << 20) -> int:
    """What the previous pool pinned: 64 MiB chunks, a storage that does not fit in the rest of
    the current chunk skips to the next, a larger one gets its own chunk; torch rounds each
    chunk up to a power of two."""
    chunks, c, off = [], 0, 0
    for n in sizes:
        need = -(-n // 512) * 512
        while c < len(chunks) and off + need > chunks[c]:
            c, off = c + 1, 0
        if c == len(chunks):
            chunks.append(max(need, chunk))
        off += need
    return sum(1 << (x - 1).bit_length() for x in chunks)


def test_seven_b_model_pins_what_it_asks_for():
    """The review's figure: Llama-2-7B at b=1, s=4096, bf16, offload of every block (what the
    previous code copied: 32 blocks and the weight casts, 36.8 GiB)."""
    m = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008, vocab_size=32000,
                    max_seq_len=4096, dropout=0.0)
    block = saved_tensors(Shape(m, 1, 4096, elem=2, mask_bytes=1))
    before = list(block.values()) * 32
    assert round(sum(before) / GiB, 1) == 36.8
    assert _old_pool_pinned(before) / GiB == 56.0  # measured by this model of torch's allocator
    pool = HostPool(lambda n: torch.zeros(1, dtype=torch.uint8).expand(n))  # 1 GiB chunks, no real memory
    for n in before:
        pool.alloc(n)
    assert pool.pinned_bytes == 37 * GiB
    # Now: the last block stays on the device and the weight casts are recast, not copied.
    now = [n for name, n in block.items() if "weights" not in name] * 31
    pool.reset()
    for n in now:
        pool.alloc(n)
    assert pool.peak_requested > pool.requested and -(-pool.requested // GiB) == 24  # 24 of the 37 chunks used


def test_offload_across_tiny_chunks_is_bitwise_equal(monkeypatch):
    """Storages split over many 4 KiB chunks come back exactly."""
    monkeypatch.setattr(saved, "CHUNK_BYTES", 4096)
    c = cfg(3)
    ref = step(model_with(rc(), c))
    for r in (rc(offload=True), rc(granularity="full", offload=True),
              rc(granularity="selective", modules=["norm", "mlp_act"], offload=True)):
        model = model_with(r, c)
        assert_same(step(model), ref)
        assert_same(step(model), ref)  # second step: the pool is reused
        pool = model.block_runner.saved.pool
        assert pool.chunk_bytes == 4096 and len(pool.chunks) > 4


# ---------------------------------------------------------------------------------------------
# Items 2, 3, 4, 7: order of reloads, last span, copies in flight, events


def test_reloads_run_newest_first_and_groups_last_first():
    model = model_with(rc(offload=True), cfg())
    log = logged(model)
    torch.manual_seed(11)
    loss = model(TOKENS[:, :-1]).sum()
    groups = [g for g in (ref() for ref in model.block_runner.saved._groups) if g is not None]
    saved_order = [[s.pieces[0][1].data_ptr() for s in g._host.values()] for g in groups]
    forward = [x for op, x in log if op == "d2h"]
    assert forward == [p for g in saved_order for p in g]
    del log[:]
    loss.backward()
    reloads = [x for op, x in log if op == "h2d"]
    assert reloads == [p for g in reversed(saved_order) for p in reversed(g)]


def test_last_span_stays_on_the_device():
    for r in (rc(offload=True), rc(granularity="full", offload=True), rc(granularity="full", num_layers=2, offload=True)):
        plan = spans_of(r, 5)
        assert [s.offload for s in plan] == [True] * (len(plan) - 1) + [False]
    explicit = [Span(0, 1, offload=True), Span(1, 2, checkpointed=True, offload=True)]
    assert keep_last_on_device(explicit) == [explicit[0], Span(1, 2, checkpointed=True)]
    model = model_with(None, cfg(2))
    apply_recompute(model, ParallelDims.single(), rc(), spans=explicit)
    assert model.block_runner.spans[-1].offload is False
    model = model_with(rc(offload=True), cfg())
    with ActivationAccountant(model) as acc:
        model(TOKENS[:, :-1]).sum().backward()
    assert acc.report.blocks["layer 4"].host == 0 and acc.report.blocks["layer 4"].device > 0
    assert all(acc.report.blocks[f"layer {i}"].device == 0 for i in range(4))


def test_two_spans_of_copies_in_flight_and_one_event_per_group():
    model = model_with(rc(offload=True), cfg())
    log = logged(model)
    torch.manual_seed(11)
    loss = model(TOKENS[:, :-1]).sum()
    groups = [g for g in (ref() for ref in model.block_runner.saved._groups) if g is not None]
    # Collapse each group's device->host copies into one entry: the forward's order of events.
    forward, i = [], 0
    for op, x in log:
        if op == "d2h":
            if not forward or forward[-1] != ("copies", i):
                forward.append(("copies", i))
        else:
            forward.append((op, x))
            i += op == "record"
    e = [g.event for g in groups[:4]]
    assert groups[4].event is None  # the last span copies nothing
    # Each group's one event is recorded after all its copies; span k waits for span k-2's
    # event only (span k-1's copies still run while span k computes).
    assert forward == [("copies", 0), ("record", e[0]), ("copies", 1), ("record", e[1]),
                       ("wait", e[0]), ("copies", 2), ("record", e[2]),
                       ("wait", e[1]), ("copies", 3), ("record", e[3]),
                       ("wait", e[2])]
    loss.backward()


def test_repeat_saves_of_a_copied_storage_add_no_copy_or_event():
    sv = SavedTensors(nn.Linear(1, 1))
    sv.begin_forward(torch.device("cpu"))
    sv.copier.log = []
    g = sv.open_group("x", offload=True)
    def f(a):
        h = a * 2
        return (h.t() * h[:, :1].t()).sum() + h.exp().sum()  # several saves of views of h's storage

    a = torch.randn(64, 64, requires_grad=True)
    with g.hooks():
        y = f(a)
    sv.close_group(g)
    assert [op for op, _ in sv.copier.log].count("record") == 1 and sv.copier.log[-1] == ("record", g.event)
    copies = [x for op, x in sv.copier.log if op == "d2h"]
    assert len(copies) == len(set(copies)) == len(g._host)
    y.backward()
    plain = a.detach().requires_grad_()
    f(plain).backward()
    assert torch.equal(a.grad, plain.grad)


# ---------------------------------------------------------------------------------------------
# Item 5: the prefetch chain across non-offloaded spans


def test_prefetch_reaches_offloaded_spans_below_non_offloaded_ones():
    c = cfg()
    plan = [Span(0, 1, checkpointed=True, offload=True), Span(1, 2, offload=True),
            Span(2, 3, checkpointed=True), Span(3, 4, modules=("norm",)), Span(4, 5)]
    ref = step(model_with(rc(), c))
    model = model_with(None, c)
    apply_recompute(model, ParallelDims.single(), rc(), spans=plan)
    log = logged(model)

    def mark(i):
        def hook(module, args, out):
            if torch.is_grad_enabled() and not is_recomputing():
                out.register_hook(lambda g: log.append(("grad of block output", i)))
        return hook

    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(mark(i))
    got = step(model)
    assert_same(got, ref)
    backward = log[log.index(("grad of block output", 4)):]
    at = {entry: k for k, entry in enumerate(backward)}
    reloads = [k for k, (op, _) in enumerate(backward) if op == "h2d"]
    group1 = [k for k in reloads if k < at[("grad of block output", 1)]]
    group0 = [k for k in reloads if k > at[("grad of block output", 1)]]
    assert group1 and group0
    # Block 1's storages are prefetched during block 4's backward, not fetched when block 1
    # needs them; block 0's during block 1's backward, before block 0 needs them.
    assert max(group1) < at[("grad of block output", 3)]
    assert max(group0) < at[("grad of block output", 0)]


# ---------------------------------------------------------------------------------------------
# Item 6: weights under autocast


@pytest.mark.parametrize("mode", ["none", "offload", "selective_offload", "selective_mlp", "full_offload"])
def test_weight_casts_are_recast_not_kept_under_autocast(mode):
    r = {"none": rc(), "offload": rc(offload=True),
         "selective_offload": rc(granularity="selective", modules=["norm", "mlp_act"], offload=True),
         "selective_mlp": rc(granularity="selective", modules=["mlp"]),
         "full_offload": rc(granularity="full", offload=True)}[mode]
    c = cfg(3, dropout=0.0)  # the formula is exact under CPU autocast without dropout
    plain = step(model_with(None, c), autocast=True)  # autograd keeps the bf16 weights itself
    model = model_with(r, c)
    assert_same(step(model, autocast=True), plain)  # the recast is bitwise the forward's cast
    with ActivationAccountant(model) as acc, torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        model(TOKENS[:, :-1])
    sh = Shape(c, B, S, elem=2, mask_bytes=4)
    measured = {label: (b.device, b.host) for label, b in acc.report.blocks.items()}
    assert measured == {label: (d, h) for label, d, h in block_formula(sh, r)}
    if mode in ("none", "offload"):  # a block keeps all autograd saves, less the weight casts
        weights = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # wq, wo; wk, wv; w1, w2, w3 in bf16
        assert sum(measured["layer 0"]) == sum(saved_tensors(sh).values()) - weights


def test_a_parameter_changed_before_backward_is_refused():
    model = model_with(rc(offload=True), cfg(2, dropout=0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        loss = model(TOKENS[:, :-1]).float().sum()
    with torch.no_grad():
        model.layers[0].feed_forward.w1.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# Items 7 and 8: a span that raises; in-place writes to saved tensors


def test_a_span_that_raises_leaves_no_current_group():
    model = model_with(rc(granularity="selective", modules=["mlp"], offload=True), cfg(3))
    block = model.layers[1]
    original = block.forward

    def boom(*args):
        raise RuntimeError("boom")

    block.forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        model(TOKENS[:, :-1])
    assert model.block_runner.saved.current is None
    block.forward = original
    ref = step(model_with(rc(), cfg(3)))
    assert_same(step(model), ref)  # and the next step is exact


def test_in_place_write_to_a_saved_tensor_is_caught_at_span_close():
    sv = SavedTensors(nn.Linear(1, 1))
    sv.begin_forward(torch.device("cpu"))
    g = sv.open_group("layer 7", offload=True)
    a = torch.randn(8, requires_grad=True)
    with g.hooks():
        h = a * 1.0
        h.sin()  # saves h
        with torch.no_grad():
            h.add_(1.0)  # would race the asynchronous copy on a GPU
    with pytest.raises(RuntimeError, match="layer 7: .* modified in place before its span ended"):
        sv.close_group(g)
    assert sv.current is None
    sv.check_versions = False  # the check can be switched off
    g = sv.open_group("layer 8", offload=True)
    with g.hooks():
        h = a * 1.0
        h.sin()
        with torch.no_grad():
            h.add_(1.0)
    sv.close_group(g)


def test_reserve_pins_the_pool_before_the_first_step(monkeypatch):
    monkeypatch.setattr(saved, "CHUNK_BYTES", 1 << 16)
    model = model_with(rc(offload=True), cfg(3))
    sv = model.block_runner.saved
    sv.reserve(torch.device("cpu"), 1 << 20)
    chunks = list(sv.pool.chunks)
    assert len(chunks) == 16
    step(model)
    assert sv.pool.chunks == chunks and sv.pool.peak_requested <= 1 << 20  # the step allocated nothing


def test_formula_keeps_the_last_explicit_span_on_the_device():
    c = cfg(2, dropout=0.0)
    plan = [Span(0, 1, offload=True), Span(1, 2, offload=True)]
    model = model_with(None, c)
    apply_recompute(model, ParallelDims.single(), rc(), spans=plan)
    with ActivationAccountant(model) as acc:
        model(TOKENS[:, :-1])
    measured = {label: (b.device, b.host) for label, b in acc.report.blocks.items()}
    assert measured == {label: (d, h) for label, d, h in block_formula(Shape(c, B, S), rc(), plan)}
    assert measured["layer 1"][1] == 0 and measured["layer 0"][0] == 0


@pytest.mark.parametrize("modes", [["recompute.granularity=none"], ["recompute.granularity=full"],
                                   ["recompute.granularity=selective", "recompute.modules=pointwise"]])
def test_planner_pool_bytes_are_what_the_pool_hands_out(modes):
    # Shapes whose saved tensors are not multiples of the pool's 512-byte alignment (rstd is
    # 4 * 21 bytes): the plan's pinned bytes must count each storage as the pool rounds it.
    from bigtrain.config import load_config
    from bigtrain.job import resolve
    from bigtrain.model import build_model, init_weights
    from bigtrain.parallel.dims import ParallelDims
    from bigtrain.planner.formula import span_bytes, span_pool_bytes
    from bigtrain.recompute import apply_recompute

    cfg = load_config(None, ["model.dim=24", "model.n_layers=3", "model.n_heads=2", "model.n_kv_heads=1",
                             "model.ffn_hidden=40", "model.vocab_size=50", "model.dropout=0.0", "train.seq_len=7",
                             "train.micro_batch_size=3", "train.global_batch_size=3", "train.device=cpu",
                             "recompute.offload=true", "recompute.offload_min_size=0", *modes])
    job = resolve(cfg, 1, "cpu")
    model = init_weights(apply_recompute(build_model(job.cfg.model), ParallelDims.single(), job.cfg.recompute), seed=0)
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    model(tokens).sum().backward()
    spans = model.block_runner.spans
    pool = model.block_runner.saved.pool
    planned = sum(span_pool_bytes(job.shape, s, 0) for s in spans)
    assert pool.peak_requested == planned
    assert planned > sum(span_bytes(job.shape, s, 0)[1] for s in spans)  # the rounding is counted
