"""Every GPU figure the issues ask for, in one run on one GPU (the lent H200, or your own):

    python bench/gpu.py --out $OUT/gpu_report.md            # on a CUDA machine, ~5 min
    python bench/gpu.py --smoke --out /tmp/gpu_smoke.md     # the same code path on a CPU, tiny

1. MFU and tokens/s of the 125M and 1B presets on one GPU (bf16 autocast, no recompute);
2. for the 1B preset, per recompute mode: torch.cuda.max_memory_allocated next to the
   planner's prediction, and the step time;
3. the step time of granularity=auto against full and selective at the same memory budget;
4. how much of the offload copy time is hidden: full+offload's extra time over full, against
   the time the same bytes take to copy device->host->device without overlap;
5. offload correctness and overlap (issue 15; `--only offload` runs just this, ~2 min): each
   offload mode against none, bitwise, plain, with a sleep queued on the side stream before
   every copy, and with that sleep plus a garbage-filled allocation after every span; step 2
   under torch.cuda.set_sync_debug_mode("error"); allocator retries and all-stream syncs
   unchanged across steps; a profiler trace of step 3 with the exposed copy time per span
   next to the planner's estimate of it (bigtrain.planner.cost's offload model, per span and
   direction, at the config's hardware section); max_memory_allocated against the plan's peak,
   and the pinned host bytes (the pool's own counter, and on CUDA torch.cuda.host_memory_stats)
   against the plan's host_pinned_bytes, within PINNED_TOLERANCE.

Training data are random tokens written to a temporary directory (no tokenizer, no download).
Steps are timed with CUDA synchronisation; nothing is checkpointed.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigtrain import planner as P  # noqa: E402
from bigtrain.job import resolve  # noqa: E402
from bigtrain.config import load_config  # noqa: E402
from bigtrain.planner.cost import copy_exposure  # noqa: E402
from bigtrain.planner.memory import offload_reservation  # noqa: E402
from bigtrain.recompute.policy import keep_last_on_device, spans_of  # noqa: E402
from bigtrain.recompute.saved import CHUNK_BYTES  # noqa: E402
from bigtrain.trainer import Trainer  # noqa: E402

GiB = 2**30
MODES = {
    "none": [],
    "selective(norm,mlp_act)": ["recompute.granularity=selective", "recompute.modules=norm,mlp_act"],
    "selective(norm,mlp)": ["recompute.granularity=selective", "recompute.modules=norm,mlp"],
    "full": ["recompute.granularity=full"],
    "full+offload": ["recompute.granularity=full", "recompute.offload=true"],
}


def random_data(vocab: int, tokens: int) -> str:
    out = Path(tempfile.mkdtemp(prefix="bigtrain-gpu-data-"))
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 20)):
        rng.integers(3, vocab, n, dtype=np.uint16).tofile(out / f"{split}.bin")
    meta = {"vocab_size": vocab, "dtype": "uint16", "train_tokens": tokens, "val_tokens": tokens // 20,
            "bos_id": 1, "eos_id": 2}
    (out / "meta.json").write_text(json.dumps(meta))
    return str(out)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(config: str, overrides: list[str], steps: int) -> dict:
    """Build a Trainer, run `steps` optimizer steps; step times, peak memory, tokens/s, MFU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    tps = tokens / step
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    mfu = trainer._mfu(tps)
    plan_spans = trainer.recompute_spans or spans_of(cfg.recompute, cfg.model.n_layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    est = P.estimate(resolve(trainer.cfg, 1, device), plan_spans)
    del trainer
    return {"step_s": step, "tokens_per_s": tps, "mfu": mfu, "peak": peak, "predicted": est.peak,
            "predicted_phase": est.peak_phase, "policy": P.mixed_name(plan_spans), "kept_host": est.host}


def copy_time(nbytes: int) -> float:
    """Seconds to copy nbytes device->pinned host->device without overlap (the offload traffic)."""
    if not torch.cuda.is_available() or nbytes == 0:
        return 0.0
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        host.copy_(dev, non_blocking=True)
        dev.copy_(host, non_blocking=True)
    sync()
    return (time.perf_counter() - t0) / 3


# --------------------------------------------------------------------------------------------
# 5. Offload correctness and overlap (issue 15)

OFFLOAD_MODES = {  # name -> (recompute overrides, the first k blocks full+offload and the rest this, or None)
    "offload": (["recompute.offload=true"], None),
    "full+offload": (["recompute.granularity=full", "recompute.offload=true"], None),
    "full(2 blocks a span)+offload": (["recompute.granularity=full", "recompute.num_layers=2", "recompute.offload=true"],
                                      None),
    "selective(norm,mlp_act)+offload": (["recompute.granularity=selective", "recompute.modules=norm,mlp_act",
                                         "recompute.offload=true"], None),
    "selective(pointwise)+offload": (["recompute.granularity=selective", "recompute.modules=pointwise",
                                      "recompute.offload=true"], None),
    "offload_min_size=1MiB": (["recompute.offload=true", "recompute.offload_min_size=1MiB"], None),
    # offloaded spans below non-offloaded ones: the prefetch chain must cross them
    "full+offload x half + selective(norm,mlp_act)": ([], ("selective(norm,mlp_act)", 2)),
}
SLEEP_CYCLES = 2_000_000  # ~1 ms at ~2 GHz: a copy that starts late must still read and write the right memory
# Pinned host bytes against the plan: |measured / planned - 1| beyond this is a failure. The pool
# pins whole 1 GiB chunks, so a miss by one chunk is flagged for any pool under 100 GiB; the
# bytes the pool hands out are the plan's offloaded bytes rounded up to 512 per storage.
PINNED_TOLERANCE = 0.01


def offload_config(smoke: bool, extra: list[str]):
    """fp32, dropout 0.1, 2 micro-batches a step (the issue's correctness setting)."""
    size = ["model.n_layers=4", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
            "model.vocab_size=256", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.device=cpu"] if smoke else \
        ["train.seq_len=1024", "train.micro_batch_size=2", "train.global_batch_size=4"]
    # 2 x 1024 tokens: at most 3072 indices, CUDA's embedding backward takes its kernel without a
    # host synchronisation, so the step-2 sync check sees only what the rest of the step does
    return load_config("configs/llama-125m.yaml", [*size, "train.dtype=fp32", "model.dropout=0.1",
                                                    "data.path=unused", "recompute.offload_min_size=0", *extra])


def offload_plan(cfg, mix):
    """The spans of a mode: the config's, or the first n_layers // k blocks full+offload and the rest `rest`."""
    if mix is None:
        return spans_of(cfg.recompute, cfg.model.n_layers)
    rest, k = mix
    return keep_last_on_device(P.mixed("full+offload", cfg.model.n_layers // k, rest, cfg.model.n_layers))


class Perturb:
    """What a variant does to a model's offload machinery: a sleep queued on the side stream
    before every copy (late copies), and a NaN-filled allocation after every span (memory a
    pending copy still reads, if handed out too early, is overwritten). Installed on the
    instances, so nothing outside this run is touched."""

    def __init__(self, saved, sleep: bool, garbage: bool, label_copies: bool = False):
        self.saved, self.sleep, self.garbage, self.label_copies = saved, sleep, garbage, label_copies
        copier = saved.copier
        for name in ("to_host", "to_device"):
            setattr(copier, name, self._before_copy(getattr(copier, name)))
        open_group, close_group = saved.open_group, saved.close_group

        def opened(label, offload):
            group = open_group(label, offload)
            if self.label_copies:  # profiler ranges that name the span whose copies these are
                group.store = _labelled(group.store, f"offload d2h {label}")
                group.reload = _labelled(group.reload, f"offload h2d {label}")
            return group

        def closed(group):
            close_group(group)
            if self.garbage:
                n = sum(s.nbytes for s in group._host.values()) + (1 << 20)
                torch.full((n // 4,), float("nan"), device=saved.device)  # freed at once: reusable memory, now NaN

        saved.open_group, saved.close_group = opened, closed

    def _before_copy(self, copy):
        def run(*args):
            if self.sleep:
                with torch.cuda.stream(self.saved.copier.stream):
                    torch.cuda._sleep(SLEEP_CYCLES)
            return copy(*args)
        return run


def _labelled(fn, name):
    def run(*args):
        with torch.profiler.record_function(name):
            return fn(*args)
    return run


def offload_run(cfg, plan, variant: str, device: torch.device, trace_path: str | None = None,
                strict: bool = True) -> dict:
    """3 optimizer steps of 2 micro-batches: gradients per step, allocator counters, memory.
    `strict`: step 2's forward and backward under set_sync_debug_mode("error") (CUDA)."""
    from bigtrain.model import build_model, init_weights
    from bigtrain.parallel.dims import ParallelDims
    from bigtrain.recompute import apply_recompute

    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    host_before = _host_allocated() if cuda else None
    model = build_model(cfg.model)
    if plan is not None:
        apply_recompute(model, ParallelDims.single(), cfg.recompute, spans=plan)
    init_weights(model, seed=0, device=device)
    saved = model.block_runner.saved if plan is not None else None
    if saved is not None:
        saved.build(device)
        Perturb(saved, sleep=cuda and "sleep" in variant, garbage="garbage" in variant,
                label_copies=trace_path is not None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = cfg.train
    micro = t.global_batch_size // t.micro_batch_size
    gen = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=gen).to(device)
                for _ in range(micro)] for _ in range(3)]
    grads, counters = [], []
    for k, step in enumerate(batches):
        torch.manual_seed(100 + k)  # dropout: every device's generator, the same for every mode
        strict_now = strict and cuda and k == 1  # step 2: no hidden synchronisation anywhere in forward or backward
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA]) \
            if trace_path is not None and k == 2 and cuda else None
        if prof is not None:
            prof.__enter__()
        if strict_now:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for mb in step:
                logits = model(mb[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb[:, 1:].flatten()) / micro
                loss.backward()
        finally:
            if strict_now:
                torch.cuda.set_sync_debug_mode(0)
        if prof is not None:
            sync()
            prof.__exit__(None, None, None)
            prof.export_chrome_trace(trace_path)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        stats = torch.cuda.memory_stats() if cuda else {}
        counters.append((stats.get("num_alloc_retries"), stats.get("num_sync_all_streams")))
    out = {"grads": grads, "counters": counters, "peak": torch.cuda.max_memory_allocated() if cuda else 0,
           # pinned bytes this run allocated (its pool is alive here), from torch's host allocator
           "host_stats": _host_allocated() - host_before if host_before is not None else None}
    if saved is not None:
        out.update(pinned=saved.pool.pinned_bytes, requested=saved.pool.peak_requested, stream=saved.copier.stream_kind)
    del model, opt
    return out


def _host_allocated() -> int | None:
    """torch.cuda.host_memory_stats()'s allocated pinned bytes now (None where it is missing).
    After a synchronise, a 1-byte pinned allocation makes the host allocator process its pending
    frees (blocks whose copies' events have completed), so that earlier runs' pools are not counted."""
    if not hasattr(torch.cuda, "host_memory_stats"):
        return None
    sync()
    del_me = torch.empty(1, dtype=torch.uint8, pin_memory=True)
    del del_me
    return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)


def exposed_copy_time(trace: dict) -> dict[str, tuple[float, float]]:
    """Per profiler range "offload d2h|h2d <span>": (copy ms, ms of it with no kernel running).

    Chrome-trace events: each memcpy ("gpu_memcpy") is tied by its correlation id to the
    runtime call that queued it, which lies inside the innermost range that names its span.
    """
    ev = trace.get("traceEvents", [])
    ranges = sorted((e["ts"], e["ts"] + e["dur"], e.get("tid"), e["name"]) for e in ev
                    if e.get("cat") == "user_annotation" and e.get("name", "").startswith("offload "))
    launch = {e["args"]["correlation"]: (e["ts"], e.get("tid")) for e in ev
              if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") == "kernel"])
    out: dict[str, list[float]] = {}
    for e in ev:
        if e.get("cat") != "gpu_memcpy":
            continue
        at = launch.get(e.get("args", {}).get("correlation"))
        inside = [r for r in ranges if at is not None and r[0] <= at[0] <= r[1] and r[2] == at[1]]
        name = min(inside, key=lambda r: r[1] - r[0])[3] if inside else "offload (unattributed)"
        start, end = e["ts"], e["ts"] + e["dur"]
        covered = sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy if a < end and b > start)
        tot = out.setdefault(name, [0.0, 0.0])
        tot[0] += e["dur"] / 1e3
        tot[1] += (e["dur"] - covered) / 1e3
    return {k: (v[0], v[1]) for k, v in out.items()}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _smoke_trace() -> dict:
    """A synthetic trace for the CPU smoke run: a 10 us copy half hidden behind a kernel."""
    return {"traceEvents": [
        {"cat": "user_annotation", "name": "offload d2h layer 0", "ts": 0, "dur": 5, "tid": 1},
        {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 1, "dur": 1, "tid": 1, "args": {"correlation": 7}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 10, "dur": 10, "args": {"correlation": 7}},
        {"cat": "kernel", "name": "k", "ts": 5, "dur": 10, "args": {}}]}


def offload_checks(smoke: bool, emit) -> None:
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    cuda = device.type == "cuda"
    emit("\n## 5. Offload: correctness against none, overlap, memory against the plan\n")
    if not cuda:
        emit("CPU run: sleeps, the sync debug mode, allocator counters and the profiler are CUDA-only and "
             "skipped (the trace parser runs on a synthetic trace); the gradients are still compared bitwise.\n")
        assert exposed_copy_time(_smoke_trace()) == {"offload d2h layer 0": (0.01, 0.005)}
    cfg0 = offload_config(smoke, [])
    strict = cuda
    try:
        ref = offload_run(cfg0, None, "plain", device)
    except RuntimeError as e:  # the step synchronises without any offload: not offload's doing
        emit(f"the no-offload reference already synchronises in step 2 ({str(e).splitlines()[0][:120]}); "
             "the sync check is off below\n")
        strict = False
        ref = offload_run(cfg0, None, "plain", device, strict=False)
    emit("| mode | variant | grads == none (3 steps) | step-2 sync-free | retries, all-stream syncs per step | "
         "max allocated GiB | plan peak GiB | pinned GiB | plan host GiB (in chunks) | stream |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    failures, pinned_rows, trace_lines = [], [], []  # the last two: tables emitted after this one
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = str(Path(tmp) / "offload_trace.json")
        for mode, (extra, mix) in OFFLOAD_MODES.items():
            cfg = offload_config(smoke, extra)
            plan = offload_plan(cfg, mix)
            job = resolve(cfg, 1, device.type)
            est = P.estimate(job, plan)
            offloaded = offload_reservation(job, plan)[0]  # the plan's host bytes of one micro-batch
            for variant in ("plain", "sleep", "sleep+garbage") if cuda else ("plain", "garbage"):
                traced = variant == "plain" and mode == "full+offload" and cuda
                try:
                    r = offload_run(cfg, plan, variant, device, trace_path if traced else None, strict)
                    sync_free = "yes" if strict else "n/a"
                except RuntimeError as e:  # set_sync_debug_mode("error") raises on a synchronising call
                    failures.append(f"{mode} {variant}: {e}")
                    emit(f"| {mode} | {variant} | - | **no**: {str(e).splitlines()[0][:80]} | | | | | | |")
                    continue
                same = all(torch.equal(g[n], rg[n]) for g, rg in zip(r["grads"], ref["grads"]) for n in rg)
                steady = len({c for c in r["counters"]}) == 1
                if not same or not steady:
                    failures.append(f"{mode} {variant}: grads equal {same}, counters steady {steady} {r['counters']}")
                emit(f"| {mode} | {variant} | {'yes' if same else '**NO**'} | {sync_free} | "
                     f"{r['counters']}{'' if steady else ' **changed**'} | {r['peak'] / GiB:.2f} | {est.peak / GiB:.2f} | "
                     f"{r['pinned'] / GiB:.3f} | {est.host / GiB:.3f} ({_in_chunks(est.host) / GiB:.0f}) | "
                     f"{r['stream']} |")
                pinned_rows.append(_pinned_row(mode, variant, r, est.host_pinned, offloaded, failures))
                if mode == "full+offload" and variant == "plain":
                    planned = copy_exposure(job, P.rank_params(job), plan)
                    micro = cfg.train.global_batch_size // cfg.train.micro_batch_size
                    _emit_trace(json.loads(Path(trace_path).read_text()) if traced else None, planned, micro,
                                cfg.train.dtype, trace_lines.append)
                    if not cuda:  # the measured columns' code, on the synthetic trace (output discarded)
                        scratch = []
                        _emit_trace(_smoke_trace(), planned, micro, cfg.train.dtype, scratch.append)
                        plan_ms = micro * planned["layer 0"][1] * 1e3
                        assert f"| offload d2h layer 0 | {micro * planned['layer 0'][0] * 1e3:.4g} | {plan_ms:.4g} | " \
                               f"0.01 | 0.005 | {0.005 / plan_ms:.3f} |" in scratch, scratch
    if trace_lines:
        emit("\n### Exposed copy time per span: planner against profiler\n")
        for line in trace_lines:
            emit(line)
    emit(f"\n### Pinned host bytes against the plan (a mismatch: |measured / plan - 1| > {PINNED_TOLERANCE:.0%})\n")
    emit("pool pinned: the host pool's own counter (HostPool.pinned_bytes); host_memory_stats: the pinned bytes "
         "torch's host allocator holds for the run, " + ("allocated_bytes.current with its pool alive less before it"
                                                         if cuda else "skipped on the CPU (no pinned memory)") +
         "; pool requested: the most bytes handed out in one micro-batch, against the plan's offloaded bytes\n")
    emit("| mode | variant | plan host_pinned_bytes GiB | pool pinned GiB | pinned / plan | host_memory_stats GiB | "
         "host_memory_stats / plan | plan offloaded MiB | pool requested MiB | requested / plan |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for row in pinned_rows:
        emit(row)
    emit("\n" + ("every check passed" if not failures else "FAILED:\n" + "\n".join(f"- {f}" for f in failures)))


def _in_chunks(nbytes: int) -> int:
    """The host pool's pinned bytes for nbytes of storages (to within their 512-byte alignment)."""
    return -(-nbytes // CHUNK_BYTES) * CHUNK_BYTES


def _ratio(measured, plan) -> str:
    if measured is None:
        return "n/a"
    if plan == 0:
        return "n/a (both 0)" if measured == 0 else "n/a (plan 0)"
    return f"{measured / plan:.3f}"


def _pinned_row(mode: str, variant: str, r: dict, plan_pinned: int, plan_offloaded: int, failures: list) -> str:
    """A row of the pinned-bytes table; a mismatch beyond PINNED_TOLERANCE is a failure."""
    flags = {}
    for what, measured, plan in (("pool pinned", r["pinned"], plan_pinned),
                                 ("host_memory_stats", r["host_stats"], plan_pinned),
                                 ("pool requested", r["requested"], plan_offloaded)):
        ok = measured is None or (measured == plan if plan == 0 else abs(measured / plan - 1) <= PINNED_TOLERANCE)
        flags[what] = "" if ok else " **mismatch**"
        if not ok:
            failures.append(f"{mode} {variant}: {what} {measured} B against the plan's {plan} B")
    hs = "skipped (CPU)" if r["host_stats"] is None else f"{r['host_stats'] / GiB:.3f}"
    return (f"| {mode} | {variant} | {plan_pinned / GiB:.3f} | {r['pinned'] / GiB:.3f} | "
            f"{_ratio(r['pinned'], plan_pinned)}{flags['pool pinned']} | {hs} | "
            f"{_ratio(r['host_stats'], plan_pinned)}{flags['host_memory_stats']} | {plan_offloaded / 2**20:.4f} | "
            f"{r['requested'] / 2**20:.4f} | {_ratio(r['requested'], plan_offloaded)}{flags['pool requested']} |")


def _emit_trace(trace: dict | None, plan: dict[str, tuple[float, float, float]], micro: int, dtype: str,
                emit) -> None:
    """Step 3 of full+offload: per span and direction, the planner's copy and exposed copy time
    next to the profiler's (copy time with no kernel running); `trace` None: not measured (CPU)."""
    per = exposed_copy_time(trace) if trace is not None else None
    emit(f"step 3 of full+offload ({micro} micro-batches): copy ms and exposed ms (no kernel running) per span, "
         "planner (bigtrain.planner.cost's offload model at the config's hardware section, per micro-batch "
         f"times {micro}) against the profiler trace" + ("" if per is not None else ": not measured on CPU") + "\n")
    if per is not None and dtype != "bf16":
        emit(f"(the plan assumes hardware.peak_tflops x mfu, a bf16 rate; this run is {dtype}, so its compute is "
             "slower and hides more of the copies than planned)\n")
    emit("| range | plan copy ms | plan exposed ms | measured copy ms | measured exposed ms | "
         "measured / plan exposed |")
    emit("|---|---|---|---|---|---|")
    rows = [(f"offload {d} {label}", micro * c, micro * (e2h if d == "d2h" else h2d))
            for label, (c, e2h, h2d) in plan.items() for d in ("d2h", "h2d")]
    names = {name for name, _, _ in rows}
    rows += [(name, 0.0, 0.0) for name in sorted(per or {}) if name not in names]  # e.g. "offload (unattributed)"
    for name, copy, exposed in rows:
        if per is None:
            measured = "not measured on CPU | not measured on CPU | n/a"
        else:
            c, e = per.get(name, (0.0, 0.0))
            measured = f"{c:.4g} | {e:.4g} | {_ratio(e, exposed * 1e3)}"
        emit(f"| {name} | {copy * 1e3:.4g} | {exposed * 1e3:.4g} | {measured} |")
    plan_total = [sum(r[i] for r in rows) * 1e3 for i in (1, 2)]
    if per is None:
        measured = "not measured on CPU | not measured on CPU | n/a"
    else:
        total = [sum(v[i] for v in per.values()) for i in (0, 1)]
        measured = f"{total[0]:.4g} | {total[1]:.4g} | {_ratio(total[1], plan_total[1])}"
    emit(f"| total | {plan_total[0]:.4g} | {plan_total[1]:.4g} | {measured} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, not the GPU")
    ap.add_argument("--only", choices=["all", "offload"], default="all", help="offload: section 5 alone")
    a = ap.parse_args()
    lines = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU smoke run)"
    emit(f"# bench/gpu.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    emit(f"GPU: {gpu}; torch {torch.__version__}; command: {' '.join(sys.argv)}\n")
    small = ["model.n_layers=2", "model.dim=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=256",
             "train.seq_len=64", "train.micro_batch_size=2", "train.device=cpu"] if a.smoke else []
    data = random_data(32000 if not a.smoke else 512, 4_000_000 if not a.smoke else 50_000)
    common = [f"data.path={data}", "log.progress=false", "log.wandb.mode=disabled",
              "train.out_dir=" + tempfile.mkdtemp(prefix="bigtrain-gpu-run-"), *small,
              *(["model.vocab_size=0"] if a.smoke else [])]

    if a.only == "offload":
        offload_checks(a.smoke, emit)
        if a.out:
            Path(a.out).write_text("\n".join(lines) + "\n")
        return

    emit("## 1. MFU on one GPU (bf16 autocast, no recompute, global batch = micro-batch)\n")
    emit("| preset | micro-batch x seq | step s | tokens/s | MFU | peak GiB |")
    emit("|---|---|---|---|---|---|")
    for preset in ("configs/llama-125m.yaml", "configs/llama-1b.yaml"):
        cfg = load_config(preset, [*common])
        mb = cfg.train.micro_batch_size
        r = run(preset, [*common, f"train.global_batch_size={mb}"], a.steps)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        emit(f"| {Path(preset).stem} | {mb} x {cfg.train.seq_len} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
             f"{mfu} | {r['peak'] / GiB:.2f} |")

    emit("\n## 2. 1B preset per recompute mode: measured vs predicted peak, step time\n")
    emit("| mode | max_memory_allocated GiB | predicted GiB (phase) | predicted / measured | step s | vs none |")
    emit("|---|---|---|---|---|---|")
    one_b = [*common, "train.global_batch_size=8", "train.micro_batch_size=8"] if not a.smoke else \
        [*common, "train.global_batch_size=2"]
    results = {}
    for mode, extra in MODES.items():
        r = results[mode] = run("configs/llama-1b.yaml", [*one_b, *extra], a.steps)
        ratio = r["predicted"] / r["peak"] if r["peak"] else float("nan")
        emit(f"| {mode} | {r['peak'] / GiB:.2f} | {r['predicted'] / GiB:.2f} ({r['predicted_phase']}) | {ratio:.3f} | "
             f"{r['step_s']:.3f} | {r['step_s'] / results['none']['step_s']:.3f} |")

    emit("\n## 3. auto vs full and selective at the same budget\n")
    budget = int((results["full"]["predicted"] + results["none"]["predicted"]) / 2)
    r = run("configs/llama-1b.yaml", [*one_b, "recompute.granularity=auto", f"recompute.memory_budget={budget}B"],
            a.steps)
    emit(f"budget {budget / GiB:.2f} GiB (halfway between full's and none's predicted peaks); auto chose {r['policy']}\n")
    emit("| policy | max_memory_allocated GiB | step s |")
    emit("|---|---|---|")
    for name, res in (("auto", r), ("full", results["full"]), ("selective(norm,mlp)", results["selective(norm,mlp)"])):
        emit(f"| {name} | {res['peak'] / GiB:.2f} | {res['step_s']:.3f} |")

    emit("\n## 4. Offload: how much of the copy time is hidden\n")
    moved = results["full+offload"]["kept_host"]
    copy = copy_time(int(moved))
    extra = results["full+offload"]["step_s"] - results["full"]["step_s"]
    hidden = 1 - max(0.0, extra) / copy if copy > 0 else float("nan")
    emit(f"full+offload moves {moved / GiB:.3f} GiB per step each way; copying that device->host->device "
         f"without overlap takes {copy * 1e3:.1f} ms; full+offload's step is {extra * 1e3:+.1f} ms vs full: "
         f"{100 * hidden:.0f}% of the copy time hidden.")
    offload_checks(a.smoke, emit)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
