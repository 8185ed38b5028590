"""Activation recompute side by side: bigtrain's modes against torch.utils.checkpoint and DeepSpeed.

    .venv/bin/python bench/recompute.py [--config configs/llama-125m.yaml] [--seq 256] [--batch 1]
        [--steps 3] [--budget 690] [--tp2-layers 4] [--skip-tp2] [--skip-deepspeed] [--out FILE]
        [key.sub=value ...]

One invocation measures everything and prints one Markdown report (also written to --out):

1. One process, the config's model (CPU fp32 by default; bf16 autocast on CUDA), every bigtrain
   recompute mode plus `torch.utils.checkpoint` per block: bytes kept for backward (bigtrain's
   ActivationAccountant, and its analytical formula), peak memory (MemTracker; on CUDA also
   torch.cuda.max_memory_allocated), FLOPs relative to no recompute (FlopCounterMode), step time
   relative to no recompute, and the gradients against no recompute.
2. tp=2 on 2 gloo ranks (always on the CPU): bigtrain none / full / full+partition /
   full+partition+offload against `deepspeed.checkpointing` with partition_activations (with and
   without checkpoint_in_cpu), each wrapping every block through `model.block_runner`.
3. A verdict computed from those numbers.

How it is measured (the report repeats the essentials):
- All models of a section share the same parameter tensors (built once, seed 0), so the modes
  differ only in their recompute policy, and memory holds one copy of the weights.
- Every mode first runs one untimed measurement step (which is also its warm-up): the
  accountant (or, for foreign checkpoints, an outer saved_tensors_hooks count of unique
  storages) around the forward, MemTracker around forward + backward. Offload modes run the
  accountant in a step of its own first, which also allocates their host pool; the
  MemTracker step then registers the pool as "Other" so it can be told apart.
- Then one untimed warm-up round and `--steps` timed forward+backward rounds, interleaved: round
  1 of every mode, then round 2, ..., so that load from other processes hits all modes alike. Median per mode; the ratio's
  range is over the per-round ratios. Each timed step also records how many cores other
  processes used meanwhile (/proc/stat): on a shared 2-core machine a 2-thread step slows down
  several-fold whenever another process holds a core, so the report also gives the medians of
  the uncontended steps, and the verdict uses the rounds where neither compared mode was contended.
- FLOPs are counted with FlopCounterMode under sdpa_kernel(MATH) (the CPU flash kernel has no
  FLOP formula) on a FakeTensorMode copy of each model: the same ops are dispatched but nothing
  is computed, so counting costs no step time.
- DeepSpeed is imported lazily; when it is missing (e.g. on the GPU machine) its rows are
  skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib.metadata
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.utils.checkpoint as torch_checkpoint  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bigtrain.config import ModelConfig, RecomputeConfig, load_config  # noqa: E402
from bigtrain.model import build_model, init_weights  # noqa: E402
from bigtrain.parallel.dims import ParallelDims  # noqa: E402
from bigtrain.parallel.loss import chunked_cross_entropy, cross_entropy  # noqa: E402
from bigtrain.parallel.parallelize import parallelize  # noqa: E402
from bigtrain.parallel.random import seed_rng  # noqa: E402
from bigtrain.planner.formula import Shape, block_formula  # noqa: E402
from bigtrain.recompute import ActivationAccountant, apply_recompute  # noqa: E402
from throughput import cpu_model  # noqa: E402  (bench/ is on sys.path: it is this script's folder)

MiB = 2.0 ** 20
SEED = 0
T0 = time.perf_counter()
_QUIET = False  # set in tp=2 ranks other than 0


def log(msg: str) -> None:
    if _QUIET:
        return
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Modes


@dataclass
class Mode:
    name: str
    rc: RecomputeConfig | None  # bigtrain policy; None for a foreign checkpoint
    foreign: str | None = None  # "torch", "ds_partition", "ds_partition_cpu"
    formula_rc: RecomputeConfig | None = None  # what the formula compares a foreign mode with

    @property
    def offload(self) -> bool:
        return self.rc is not None and self.rc.offload


def rc(min_size: str = "0", **kw) -> RecomputeConfig:
    r = RecomputeConfig(offload_min_size=min_size, **kw)
    r.validate()
    return r


def tp1_modes(n_layers: int, min_size: str) -> list[Mode]:
    block_n = max(1, n_layers // 2)
    uniform_n = min(2, n_layers)
    return [
        Mode("none", rc(min_size)),
        Mode("full", rc(min_size, granularity="full")),
        Mode(f"full uniform num_layers={uniform_n}", rc(min_size, granularity="full", num_layers=uniform_n)),
        Mode(f"full method=block num_layers={block_n}", rc(min_size, granularity="full", method="block",
                                                           num_layers=block_n)),
        Mode("selective [norm, mlp_act]", rc(min_size, granularity="selective", modules=["norm", "mlp_act"])),
        Mode("selective [core_attn]", rc(min_size, granularity="selective", modules=["core_attn"])),
        Mode("selective [mlp]", rc(min_size, granularity="selective", modules=["mlp"])),
        Mode("selective [norm, mlp]", rc(min_size, granularity="selective", modules=["norm", "mlp"])),
        Mode("offload (granularity none)", rc(min_size, offload=True)),
        Mode("full + offload", rc(min_size, granularity="full", offload=True)),
        Mode("selective [norm, mlp_act] + offload", rc(min_size, granularity="selective",
                                                       modules=["norm", "mlp_act"], offload=True)),
        Mode("selective [pointwise]", rc(min_size, granularity="selective", modules=["pointwise"])),
        Mode("selective [pointwise] + offload", rc(min_size, granularity="selective", modules=["pointwise"],
                                                   offload=True)),
        Mode("torch.utils.checkpoint per block", None, "torch", rc(min_size, granularity="full")),
        # torchtitan's "op" selective checkpoint: per block, keep the outputs of the matmuls and
        # fused attention, recompute every other op (torch's selective-checkpoint API)
        Mode("torch op-level selective checkpoint per block", None, "torch_op",
             rc(min_size, granularity="selective", modules=["pointwise"])),
    ]


def tp2_modes(min_size: str, deepspeed: bool) -> list[Mode]:
    modes = [
        Mode("bigtrain none", rc(min_size)),
        Mode("bigtrain full", rc(min_size, granularity="full")),
        Mode("bigtrain full + partition", rc(min_size, granularity="full", partition=True)),
        Mode("bigtrain full + partition + offload", rc(min_size, granularity="full", partition=True, offload=True)),
    ]
    if deepspeed:
        modes += [
            Mode("DeepSpeed partition_activations + checkpoint_in_cpu", None, "ds_partition_cpu",
                 rc(min_size, granularity="full", partition=True, offload=True)),
            Mode("DeepSpeed partition_activations", None, "ds_partition",
                 rc(min_size, granularity="full", partition=True)),
        ]
    return modes


# --------------------------------------------------------------------------------------------
# Foreign checkpoints, installed through model.block_runner on a model without apply_recompute


class TorchCheckpointRunner:
    """torch.utils.checkpoint (non-reentrant) around every block."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x, rope):
        for layer in self.layers:
            x = torch_checkpoint.checkpoint(layer, x, rope, use_reentrant=False)
        return x


_OP_SAVE = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            *[getattr(torch.ops.aten, n).default for n in (
                "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
              if hasattr(torch.ops.aten, n)]]


class TorchOpSACRunner:
    """torch.utils.checkpoint (non-reentrant) around every block with torch's selective
    checkpoint: the outputs of mm/addmm/bmm and fused attention are saved, every other op is
    recomputed (torchtitan's "op" mode, without its every-other-mm rule: no extra matmuls)."""

    def __init__(self, layers):
        self.layers = layers
        self.context_fn = functools.partial(torch_checkpoint.create_selective_checkpoint_contexts, _OP_SAVE)

    def __call__(self, x, rope):
        for layer in self.layers:
            x = torch_checkpoint.checkpoint(layer, x, rope, use_reentrant=False, context_fn=self.context_fn)
        return x


def _call_block(layer, rope, x):
    return layer(x, rope)


class DeepSpeedRunner:
    """deepspeed.checkpointing.checkpoint around every block; (re)configures DeepSpeed's module-level
    settings at the start of every forward, so two variants can be interleaved step by step.
    The rotary table goes in through the closure: DeepSpeed would partition (and empty) every
    floating-point tensor argument, and the same table is shared by all blocks."""

    def __init__(self, layers, dsc, mpu, cpu: bool):
        self.layers, self.dsc, self.mpu, self.cpu = layers, dsc, mpu, cpu

    def __call__(self, x, rope):
        self.dsc.configure(self.mpu, partition_activations=True, checkpoint_in_cpu=self.cpu)
        for layer in self.layers:
            x = self.dsc.checkpoint(functools.partial(_call_block, layer, rope), x)
        return x


# --------------------------------------------------------------------------------------------
# Building models that share one set of weights


def share_params(model: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Point every parameter slot of `model` (a meta model of the same structure) at `ref`'s
    Parameter of the same name; tied weights stay tied since ref returns the same object."""
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[pname] = ref.get_parameter(f"{mname}.{pname}" if mname else pname)
    model.rope = ref.rope
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if meta:
        raise RuntimeError(f"share_params left meta tensors: {meta[:5]}")


def build(cfg: ModelConfig, dims: ParallelDims, mode: Mode, device, ref=None, ds=None):
    """The model of `mode`: plain -> TP -> recompute policy -> weights (ref's, or fresh from SEED)."""
    model = build_model(cfg)  # meta
    if dims.tp > 1:
        parallelize(model, dims, rng=seed_rng(SEED, dims))
    if mode.rc is not None:
        apply_recompute(model, dims, mode.rc)
    if ref is None:
        init_weights(model, seed=SEED, device=device)
    else:
        share_params(model, ref)
    if mode.foreign == "torch":
        model.block_runner = TorchCheckpointRunner(model.layers)
    elif mode.foreign == "torch_op":
        model.block_runner = TorchOpSACRunner(model.layers)
    elif mode.foreign in ("ds_partition", "ds_partition_cpu"):
        dsc, mpu = ds
        model.block_runner = DeepSpeedRunner(model.layers, dsc, mpu, cpu=mode.foreign == "ds_partition_cpu")
    model.train()
    return model


# --------------------------------------------------------------------------------------------
# Measuring


class SavedStorageCounter:
    """Outer saved_tensors_hooks: bytes of the unique storages autograd saves (params/buffers
    excluded). It sees what autograd saves at its level, not what a checkpoint keeps elsewhere
    (torch's checkpoint saves its inputs through autograd, DeepSpeed's reentrant one on ctx)."""

    def __init__(self, model):
        self.static = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.nbytes, self._seen, self._cm = 0, set(), None

    def __enter__(self):
        self.nbytes, self._seen = 0, set()
        self._cm = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)

    def _pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.static and key not in self._seen:
            self._seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        return t


class InputProbe:
    """Keeps a reference to the block stack's input (the top-level dropout's output), as a caller
    that reuses it (a residual) would, to check that the checkpoint leaves it intact: numel and
    float64 sum before, after forward and after backward."""

    def __init__(self, model):
        self.x, self.rows = None, []
        self._h = model.dropout.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.x is None:
            self.x = out
            self.record()

    def record(self):
        x = self.x.detach()
        # the sum stays a tensor until read: no device synchronisation inside a timed step
        self.rows.append((x.numel(), torch.sum(x, dtype=torch.float64) if x.numel() else None))

    def close(self):
        self._h.remove()
        self.x = None
        self.rows = [(n, None if t is None else float(t)) for n, t in self.rows]

    @property
    def intact(self) -> bool:
        return len({(n, None if t is None else float(t)) for n, t in self.rows}) == 1

    def describe(self) -> str:
        if not self.rows:
            return "-"
        n = " → ".join(str(r[0]) for r in self.rows)
        return f"{n} ({'intact' if self.intact else 'CHANGED'})"


class PeakTracker(MemTracker):
    """MemTracker that also keeps each category's own maximum over time: MemTracker's "peak"
    snapshot is the breakdown at the moment of the peak *total*, when the activations may
    already be mostly freed (hooks into MemTracker's private _update_peak_stats)."""

    def __init__(self):
        super().__init__()
        self.max_by_cat: dict = {}
        self.act_peak_at = ""  # where the activations' maximum was reached: phase and innermost module

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        for dev, snap in self._curr_mem_snap.items():
            m = self.max_by_cat.setdefault(dev, {})
            for k, v in snap.items():
                if v > m.get(k, 0):
                    m[k] = v
                    if getattr(k, "value", k) == "Activation":
                        inner = max(self._mod_tracker.parents, key=len, default="")
                        self.act_peak_at = f"{'backward' if self._mod_tracker.is_bw else 'forward'}, in {inner}"


class OtherLoad:
    """CPU time other processes used while a step ran, in cores (Linux /proc; None elsewhere):
    all CPUs' busy time from /proc/stat minus this process's own (and its sibling ranks')."""

    def __init__(self, pids: list[int] | None = None):
        self.pids = pids or [os.getpid()]
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(v) - v[3] - v[4]

    def _own(self) -> int:
        total = 0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
        return total

    def start(self):
        try:
            self._t, self._b, self._o = time.perf_counter(), self._busy(), self._own()
        except (OSError, ValueError, IndexError):
            self._t = None

    def stop(self) -> float | None:
        if self._t is None:
            return None
        try:
            wall = time.perf_counter() - self._t
            other = (self._busy() - self._b) - (self._own() - self._o)
        except (OSError, ValueError, IndexError):
            return None
        if wall < 25 / self.hz:  # /proc counts in clock ticks: too coarse for a short step
            return None
        return max(0.0, other / self.hz / wall)


CLEAN_LOAD = 0.25  # cores used by other processes below which a timed step counts as uncontended


def _snap_by_name(snap: dict, device: torch.device) -> dict[str, int]:
    for dev, cats in snap.items():
        if torch.device(dev).type == device.type:
            return {getattr(k, "value", k): v for k, v in cats.items()}
    return {}


class Bench:
    """Tokens, step functions and measurements of one section (one process or one rank)."""

    def __init__(self, cfg: ModelConfig, dims: ParallelDims, device, b: int, s: int, autocast: bool,
                 loss_chunk: int = 0):
        self.cfg, self.dims, self.device, self.b, self.s = cfg, dims, device, b, s
        self.autocast = autocast
        self.loss_chunk = loss_chunk  # train.loss_chunk's head: forward returns the loss itself
        g = torch.Generator().manual_seed(3)
        self.tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g).to(device)
        self.params: dict[str, torch.nn.Parameter] = {}
        self.load = OtherLoad()

    def _ac(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def barrier(self):
        if self.dims.tp > 1:
            dist.barrier()

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None

    def forward(self, model):
        with self._ac():
            if self.loss_chunk:  # the output layer and the loss in chunks, inside forward
                return model(self.tokens[:, :-1], None, functools.partial(
                    chunked_cross_entropy, targets=self.tokens[:, 1:], chunk=self.loss_chunk,
                    group=self.dims.tp_group, vocab_size=self.cfg.vocab_size,
                    sequence_parallel=self.dims.sequence_parallel))
            return model(self.tokens[:, :-1])

    def loss(self, logits):
        if self.loss_chunk:
            return logits  # forward already returned the loss
        with self._ac():
            return cross_entropy(logits, self.tokens[:, 1:], self.dims.tp_group, self.cfg.vocab_size)

    def timed_step(self, model, probe: InputProbe | None = None) -> tuple[float, float | None]:
        """(seconds, other processes' CPU load in cores) of one forward+backward."""
        self.zero_grad()
        gc.collect()
        self.barrier()
        self.sync()
        self.load.start()
        t = time.perf_counter()
        logits = self.forward(model)
        if probe is not None:
            probe.record()  # one numel and one sum: negligible next to a step
        self.loss(logits).backward()
        self.sync()
        dt = time.perf_counter() - t
        load = self.load.stop()
        if probe is not None:
            probe.record()
        return dt, load

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.params.items() if p.grad is not None}

    def grad_diff(self, ref: dict[str, torch.Tensor]) -> float | str:
        worst = 0.0
        for n, p in self.params.items():
            if (p.grad is None) != (n not in ref):
                return f"grad of {n} {'missing' if p.grad is None else 'unexpected'}"
            if p.grad is not None:
                worst = max(worst, (p.grad.float() - ref[n].float()).abs().max().item())
        return worst

    def measure(self, mode: Mode, model) -> dict:
        """The untimed measurement step (see the module docstring); also the mode's warm-up."""
        out: dict = {}
        acc_report = None
        if mode.offload:
            # A step of its own for the accountant: it also allocates the host pool, which the
            # MemTracker step below then registers as "Other". It needs its backward: hooks
            # that return the saved tensor itself make a graph that saves its own outputs keep
            # itself alive (a reference cycle) until backward frees the saved tensors; the
            # pool is only reused once every group of the previous forward was fetched.
            self.zero_grad()
            with ActivationAccountant(model) as acc:
                logits = self.forward(model)
            acc_report = acc.report
            self.loss(logits).backward()
            del logits, acc
            gc.collect()
        self.zero_grad()
        gc.collect()
        self.barrier()
        mt = PeakTracker()
        mt.track_external(model)
        pool = getattr(getattr(model.block_runner, "saved", None), "pool", None)
        if pool is not None and pool.chunks:
            mt.track_external(*pool.chunks)
        counter = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with mt:
            if mode.rc is not None and acc_report is None:
                ctx = ActivationAccountant(model)
            elif mode.rc is None:
                ctx = counter = SavedStorageCounter(model)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                logits = self.forward(model)
            if isinstance(ctx, ActivationAccountant):
                acc_report = ctx.report
            loss = self.loss(logits)
            fwd = _snap_by_name(mt.get_tracker_snapshot("current"), self.device)
            loss.backward()
            del logits, loss
        self.sync()
        peak = _snap_by_name(mt.get_tracker_snapshot("peak"), self.device)
        most = _snap_by_name(mt.max_by_cat, self.device)
        out["mt_fwd_act"] = fwd.get("Activation", 0)
        out["mt_peak_act"] = most.get("Activation", 0)  # the category's own maximum over the step
        out["mt_peak_act_at"] = mt.act_peak_at
        out["mt_peak_total"] = peak.get("Total", 0)
        out["mt_peak_other"] = peak.get("Other", 0)  # the host pool on the CPU
        out["pool"] = pool.capacity if pool is not None else 0
        if self.device.type == "cuda":
            out["cuda_max_alloc"] = torch.cuda.max_memory_allocated()
        if acc_report is not None:
            out["acc_blocks"] = [(label, b.device, b.host) for label, b in acc_report.blocks.items()]
            out["acc_outside"] = acc_report.outside.device + acc_report.outside.host
        if counter is not None:
            out["hooks_bytes"] = counter.nbytes
        return out

    def shape(self) -> Shape:
        elem = 2 if self.autocast else 4
        return Shape(self.cfg, self.b, self.s, self.dims.tp, False, elem=elem,
                     mask_bytes=1 if self.device.type == "cuda" else elem,
                     math_attention=self.cfg.dropout > 0 and self.device.type == "cpu",
                     loss_chunk=self.loss_chunk if self.loss_chunk < self.s else 0)

    def formula(self, r: RecomputeConfig) -> list[tuple[str, int, int]]:
        return block_formula(self.shape(), r)

    def outside_formula(self, r: RecomputeConfig | None) -> int | None:
        """The formula's bytes kept outside the blocks by the forward under bigtrain policy r
        (None: a peer's, around a plain model), the loss excluded (the accountant here wraps the
        model's forward only), when this bigtrain version has it."""
        try:
            from bigtrain.planner.formula import outside_tensors
            from bigtrain.parallel.dims import padded_vocab
        except ImportError:
            return None
        vocab = padded_vocab(self.cfg.vocab_size, self.dims.tp)
        try:  # the final norm runs again after a pointwise last span
            from bigtrain.recompute.policy import final_norm_recomputed, spans_of

            recomputed = r is not None and final_norm_recomputed(spans_of(r, self.cfg.n_layers))
            items = outside_tensors(self.shape(), vocab, recomputed)
        except ImportError:
            items = outside_tensors(self.shape(), vocab)
        return sum(n for name, n in items.items() if not name.startswith("loss."))


def count_flops(cfg: ModelConfig, dims: ParallelDims, mode: Mode, b: int, s: int) -> int:
    """FlopCounterMode over one forward+backward of a fake-tensor copy of the mode's model
    (FakeTensorMode: the same ops are dispatched, on CPU-typed tensors without data, so nothing
    is computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = build_model(cfg, device="cpu")  # fake parameters: no memory, no init needed
        if mode.rc is not None:
            apply_recompute(model, dims, mode.rc)
        if mode.foreign == "torch":
            model.block_runner = TorchCheckpointRunner(model.layers)
        elif mode.foreign == "torch_op":
            model.block_runner = TorchOpSACRunner(model.layers)
        model.train()
        tokens = torch.zeros(b, s + 1, dtype=torch.long)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
    return fc.get_total_flops()


def run_modes(bench: Bench, modes: list[Mode], steps: int, ds=None, on_error=None,
              deadline: float | None = None) -> tuple[dict[str, dict], dict]:
    """Build every mode's model (shared weights), measure each once, then time them interleaved.
    Returns (name -> figures, {"rounds": done, "cut": why or None}). A mode whose build or
    measurement raises gets {"error": ...} when on_error allows it (DeepSpeed rows), else the
    error propagates. Rounds after the first are skipped when the previous round's duration says
    the next would end after `deadline` (perf_counter time); all ranks follow rank 0."""
    res: dict[str, dict] = {}
    models: dict[str, torch.nn.Module] = {}
    ref_model = None
    ref_grads = None
    for mode in modes:
        log(f"  measure: {mode.name}")
        try:
            model = build(bench.cfg, bench.dims, mode, bench.device, ref=ref_model, ds=ds)
            if ref_model is None:
                ref_model = model
                bench.params = dict(model.named_parameters())
            r = bench.measure(mode, model)
            failed = False
        except Exception as e:  # noqa: BLE001 -- reported in the row (DeepSpeed variants only)
            if on_error is None or mode.foreign not in ("ds_partition", "ds_partition_cpu"):
                raise
            r, failed = {"error": on_error(e)}, True
        if bench.dims.tp > 1:  # both ranks drop a mode that failed on either
            flag = torch.tensor([1.0 if failed else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not failed:
                r, failed = {"error": "failed on the other rank"}, True
        if not failed:
            if ref_grads is None:
                ref_grads = bench.grads()
                r["grad_diff"] = 0.0
            else:
                r["grad_diff"] = bench.grad_diff(ref_grads)
            models[mode.name] = model
        bench.zero_grad()
        res[mode.name] = r
    del ref_grads
    gc.collect()
    times = {name: [] for name in models}
    loads = {name: [] for name in models}
    gc.disable()
    cut = None
    try:
        # One untimed warm-up round, interleaved like the timed ones: after the measurement steps
        # the first timed round was measured 20-50% slower, most for the modes that come first
        # (the process's memory settles), which per-mode warm-up alone does not remove.
        log("  warm-up round (untimed)")
        for model in models.values():
            bench.timed_step(model)
        for rep in range(steps):
            if rep > 0 and deadline is not None:
                stop = time.perf_counter() + last_round > deadline
                if bench.dims.tp > 1:  # rank 0 decides for both
                    flag = torch.tensor([1.0 if stop else 0.0])
                    dist.broadcast(flag, src=0)
                    stop = bool(flag.item())
                if stop:
                    cut = (f"stopped after {rep} of {steps} rounds: one round took {last_round:.0f} s and the "
                           f"time budget (--budget) would have been exceeded")
                    log("  " + cut)
                    break
            log(f"  timed round {rep + 1}/{steps}")
            round_start = time.perf_counter()
            for name, model in models.items():
                probe = InputProbe(model) if rep == 0 else None
                try:
                    dt, load = bench.timed_step(model, probe)
                    times[name].append(dt)
                    loads[name].append(load)
                finally:
                    if probe is not None:
                        probe.close()
                        res[name]["input"], res[name]["input_intact"] = probe.describe(), probe.intact
            last_round = time.perf_counter() - round_start
            log("    " + ", ".join(f"{n}: {t[-1]:.3f}s (other load {_fmt_load(loads[n][-1])})"
                                  for n, t in times.items()))
    finally:
        gc.enable()
        bench.zero_grad()
    for name, t in times.items():
        res[name]["times"] = t
        res[name]["loads"] = loads[name]
    return res, {"rounds": len(next(iter(times.values()), [])), "cut": cut}


def _fmt_load(x) -> str:
    return "?" if x is None else f"{x:.2f}"


# --------------------------------------------------------------------------------------------
# Section 2: the tp=2 worker


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    where = traceback.extract_tb(e.__traceback__)
    if where:
        f = where[-1]
        msg += f" (at {Path(f.filename).name}:{f.lineno})"
    return msg[:600]


def tp2_worker(rank: int, world: int, spec: dict) -> dict:
    global _QUIET
    _QUIET = rank != 0
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)
    dims = ParallelDims.build(world, rank, tp=2)
    cfg = spec["cfg"]
    ds, ds_note = None, spec["ds_note"]
    if spec["deepspeed"]:
        try:
            import deepspeed
            import deepspeed.ops

            compat = getattr(deepspeed.ops, "__compatible_ops__", {})
            if "deepspeed_shm_comm" in compat:
                compat["deepspeed_shm_comm"] = False  # skips a 34 s C++ build
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
            deepspeed.init_distributed(dist_backend="gloo")
            from deepspeed import checkpointing as dsc
            from bigtrain.engines import MPU

            ds = (dsc, MPU(dims, dims.new_self_group()))
        except Exception as e:  # noqa: BLE001
            ds_note = f"DeepSpeed could not be set up: {_short_error(e)}"
    bench = Bench(cfg, dims, torch.device("cpu"), spec["b"], spec["s"], autocast=False)
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    bench.load = OtherLoad(pids)  # the other rank is not "other load"
    modes = tp2_modes(spec["min_size"], deepspeed=ds is not None)
    # perf_counter is per process: turn the parent's remaining budget into this rank's deadline
    deadline = time.perf_counter() + spec["budget_left"] if spec["budget_left"] is not None else None
    res, timing = run_modes(bench, modes, spec["steps"], ds=ds, on_error=_short_error, deadline=deadline)
    for mode in modes:
        r = res[mode.name]
        r["formula"] = bench.formula(mode.rc or mode.formula_rc)
        r["outside_formula"] = bench.outside_formula(mode.rc)
    return {"res": res, "modes": [m.name for m in modes], "ds_note": ds_note, "timing": timing,
            "foreign": {m.name: m.foreign for m in modes}} if rank == 0 else {}


# --------------------------------------------------------------------------------------------
# Report


def mib(n) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:.3f}" if abs(n) < 10 * MiB else f"{n / MiB:.1f}"


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def clean_times(r: dict) -> list[float]:
    return [t for t, l in zip(r.get("times", []), r.get("loads", [])) if l is not None and l < CLEAN_LOAD]


def time_stats(res: dict, base: str) -> dict[str, dict]:
    """name -> median s, ratio of medians vs base, per-round ratio range, and the same over the
    uncontended steps."""
    out = {}
    b = res[base].get("times")
    cb = clean_times(res[base])
    for name, r in res.items():
        t = r.get("times")
        if not t or not b:
            continue
        per_round = [x / y for x, y in zip(t, b)]
        st = {"median": statistics.median(t), "ratio": statistics.median(t) / statistics.median(b),
              "lo": min(per_round), "hi": max(per_round), "loads": r.get("loads", [])}
        c = clean_times(r)
        st["clean_n"] = len(c)
        if c:
            st["clean_median"] = statistics.median(c)
            st["clean_ratio"] = statistics.median(c) / statistics.median(cb) if cb else None
        out[name] = st
    return out


def raw_times(res: dict, names: list[str]) -> str:
    parts = [f"{n}: " + " / ".join(f"{t:.3f} ({_fmt_load(l)})" for t, l in zip(res[n]["times"], res[n]["loads"]))
             for n in names if res[n].get("times")]
    return ("Raw step times per round, s (cores used by other processes meanwhile): " + "; ".join(parts) + ".")


def kept_per_layer(r: dict, base: dict, n_layers: int) -> dict:
    """Kept bytes for backward: accountant (bigtrain) or outer hooks (foreign), first span and sum;
    and the MemTracker estimate per layer from the activations alive after forward."""
    k: dict = {}
    if "acc_blocks" in r:
        label, d, h = r["acc_blocks"][0]
        k.update(first_label=label, first_dev=d, first_host=h,
                 sum_dev=sum(x[1] for x in r["acc_blocks"]), sum_host=sum(x[2] for x in r["acc_blocks"]),
                 source="accountant")
    elif "hooks_bytes" in r and "acc_outside" in base:
        per = (r["hooks_bytes"] - base["acc_outside"]) / n_layers
        k.update(first_label="per layer", first_dev=per, first_host=0, sum_dev=per * n_layers, sum_host=0,
                 source="hooks")
    if "mt_fwd_act" in r and "mt_fwd_act" in base and "acc_blocks" in base:
        base_layers = sum(x[1] + x[2] for x in base["acc_blocks"])
        k["mt_per_layer"] = (r["mt_fwd_act"] - base["mt_fwd_act"] + base_layers) / n_layers
    return k


def section_rows(res: dict, names: list[str], n_layers: int, foreign: dict, flops: dict | None,
                 on_cuda: bool) -> tuple[list[str], list[str]]:
    base_name = names[0]
    base = res[base_name]
    ts = time_stats(res, base_name)
    t1 = ["| mode | span | kept, first span: device / host MiB | formula, first span | kept, all layers: "
          "device / host MiB | formula, all layers | measured / formula | outside blocks MiB (formula, loss excluded) |",
          "|---|---|---|---|---|---|---|---|"]
    t2_head = ("| mode | kept/layer from MemTracker MiB | peak ACT MiB | peak total MiB | peak total excl. host pool "
               "MiB | host pool MiB |" + (" cuda max_memory_allocated MiB |" if on_cuda else "")
               + (" FLOPs vs none |" if flops else "") + " step s (median) | time vs none [per-round range] |"
               f" other load, cores (per round) | uncontended (< {CLEAN_LOAD} cores): steps, median s, vs none |"
               " grad max abs diff vs none | block-stack input numel: before → after fwd → after bwd |")
    ncols = t2_head.count("|") - 1
    t2 = [t2_head, "|" + "---|" * ncols]
    for name in names:
        r = res[name]
        if "error" in r:
            t1.append(f"| {name} | failed: {r['error']} | | | | | | |")
            t2.append(f"| {name} | failed: {r['error']} |" + " |" * (ncols - 2))
            continue
        k = kept_per_layer(r, base, n_layers)
        f = r.get("formula", [])
        f_first = f[0] if f else ("-", 0, 0)
        f_sum_d, f_sum_h = sum(x[1] for x in f), sum(x[2] for x in f)
        mark = "" if k.get("source") == "accountant" else " †"
        if k:
            meas_sum = k["sum_dev"] + k["sum_host"]
            ratio = meas_sum / (f_sum_d + f_sum_h) if f_sum_d + f_sum_h else None
            t1.append(f"| {name} | {k['first_label']} | {mib(k['first_dev'])} / {mib(k['first_host'])}{mark} | "
                      f"{mib(f_first[1])} / {mib(f_first[2])} | {mib(k['sum_dev'])} / {mib(k['sum_host'])}{mark} | "
                      f"{mib(f_sum_d)} / {mib(f_sum_h)} | {fmt_ratio(ratio)} | "
                      f"{mib(r.get('acc_outside')) if 'acc_outside' in r else '-'}"
                      f"{' (' + mib(r['outside_formula']) + ')' if r.get('outside_formula') is not None else ''} |")
        excl = r["mt_peak_total"] - r["mt_peak_other"]
        row = (f"| {name} | {mib(k.get('mt_per_layer'))} | {mib(r['mt_peak_act'])} | {mib(r['mt_peak_total'])} | "
               f"{mib(excl)} | {mib(r['pool'])} |")
        if on_cuda:
            row += f" {mib(r.get('cuda_max_alloc'))} |"
        if flops:
            fl = flops.get(name)
            row += f" {fmt_ratio(fl / flops[base_name]) if fl else '-'} |"
        if name in ts:
            st = ts[name]
            row += (f" {st['median']:.3f} | {st['ratio']:.3f} [{st['lo']:.3f}, {st['hi']:.3f}] | "
                    f"{' / '.join(_fmt_load(x) for x in st['loads'])} |")
            if st["clean_n"]:
                cr = st.get("clean_ratio")
                row += f" {st['clean_n']}, {st['clean_median']:.3f}, {fmt_ratio(cr)} |"
            else:
                row += " 0 |"
        else:
            row += " - | - | - | - |"
        gd = r.get("grad_diff")
        row += f" {gd if isinstance(gd, str) else f'{gd:.3g}'} | {r.get('input', '-')} |"
        t2.append(row)
    return t1, t2


def verdict(s1: dict | None, s2: dict | None) -> list[str]:
    out = []

    def timing(res, a, b, base):
        """a's time relative to b's from per-round ratios (interleaving puts a and b seconds apart
        in every round): the median over all rounds, and over the rounds where neither step was
        contended, which the verdict uses when there is one. Noise = half the range of the
        ratios used, at least 1% (2% assumed for a single round)."""
        ta, tb = res[a].get("times"), res[b].get("times")
        if not ta or not tb:
            return None
        q = [x / y for x, y in zip(ta, tb)]
        q_noise = max(0.01, (max(q) - min(q)) / 2)
        qm = statistics.median(q)
        text = f"all rounds: median per-round ratio {qm:.3f} (rounds {min(q):.3f}–{max(q):.3f})"
        la, lb = res[a].get("loads", []), res[b].get("loads", [])
        qc = [x / y for x, y, u, v in zip(ta, tb, la, lb)
              if u is not None and v is not None and u < CLEAN_LOAD and v < CLEAN_LOAD]
        if qc:
            ratio = statistics.median(qc)
            noise = max(0.01, (max(qc) - min(qc)) / 2) if len(qc) > 1 else 0.02
            text += (f"; rounds where neither was contended ({len(qc)}): median ratio {ratio:.3f}, noise "
                     f"±{noise * 100:.1f}%" + (" (one round: ±2% assumed)" if len(qc) == 1 else ""))
            basis = "uncontended rounds"
        else:
            ratio, noise = qm, q_noise
            known = any(u is not None and v is not None for u, v in zip(la, lb))
            why = ("no round where both were uncontended: contended timings" if known else
                   "other processes' load not measurable (no /proc, or steps under 25 clock ticks)")
            text += f", noise ±{noise * 100:.1f}% ({why})"
            basis = "all rounds"
        if ratio > 1 + noise:
            word = f"SLOWER by {(ratio - 1) * 100:.1f}%, beyond the noise"
        elif ratio < 1 - noise:
            word = f"faster ({(1 - ratio) * 100:.1f}% less time)"
        else:
            word = "no slower (within noise)"
        return text, f"on {basis}: {word}"

    if s1 is not None:
        res, names, L = s1["res"], s1["names"], s1["n_layers"]
        base = res[names[0]]
        full, tc = res.get("full"), res.get("torch.utils.checkpoint per block")
        if full and tc and "error" not in full and "error" not in tc:
            kf, kt = kept_per_layer(full, base, L), kept_per_layer(tc, base, L)
            bf = kf["first_dev"] + kf["first_host"]
            bt = kt.get("first_dev", float("nan"))
            out.append("**Section 1 — bigtrain `full` vs `torch.utils.checkpoint` per block:**")
            out.append(f"- kept bytes per layer: bigtrain {mib(bf)} MiB (accountant) vs torch {mib(bt)} MiB "
                       f"(outer saved-tensor hooks): {'no more' if bf <= bt * 1.001 else 'MORE'}; MemTracker "
                       f"estimate {mib(kf.get('mt_per_layer'))} vs {mib(kt.get('mt_per_layer'))} MiB: "
                       f"{'no more' if kf.get('mt_per_layer', 0) <= kt.get('mt_per_layer', 0) * 1.001 + 1024 else 'MORE'}.")
            pa, pb = full["mt_peak_act"], tc["mt_peak_act"]
            out.append(f"- peak activations (MemTracker): {mib(pa)} vs {mib(pb)} MiB: "
                       f"{'no more' if pa <= pb * 1.001 + 1024 else 'MORE'}; peak total {mib(full['mt_peak_total'])} vs "
                       f"{mib(tc['mt_peak_total'])} MiB.")
            tl = timing(res, "full", "torch.utils.checkpoint per block", names[0])
            if tl:
                out.append(f"- step time bigtrain full / torch checkpoint: {tl[0]} → **{tl[1]}**.")
            tn = timing(res, "full", names[0], names[0])
            if tn:
                out.append(f"- for scale, bigtrain full / none: {tn[0]} (one extra forward of the blocks is the "
                           f"expected cost; the output layer and loss are not recomputed).")
            bad = [n for n in names if isinstance(res[n].get("grad_diff"), str) or (res[n].get("grad_diff") or 0) > 0]
            out.append("- gradients: " + ("every mode bitwise equal to none." if not bad else
                                          f"differ from none in: {', '.join(bad)}."))
    if s2 is not None:
        res, names, L = s2["res"], s2["modes"], s2["n_layers"]
        base = res[names[0]]
        out.append("")
        out.append("**Section 2 — tp=2: bigtrain partitioned full recompute vs DeepSpeed:**")
        pairs = [("bigtrain full + partition + offload", "DeepSpeed partition_activations + checkpoint_in_cpu"),
                 ("bigtrain full + partition", "DeepSpeed partition_activations")]
        any_ds = False
        for a, b in pairs:
            if b not in res:
                continue
            any_ds = True
            ra, rb = res[a], res[b]
            if "error" in rb:
                out.append(f"- {b}: failed ({rb['error']}); no comparison possible.")
                continue
            ka, kb = kept_per_layer(ra, base, L), kept_per_layer(rb, base, L)
            acc = ka["first_dev"] + ka["first_host"]  # device + host: on the CPU both are the same memory
            mb = kb.get("mt_per_layer")
            same = "no more" if mb is not None and acc <= mb * 1.001 + 1024 else "MORE"
            out.append(f"- {a} vs {b}: kept per layer {mib(acc)} MiB (accountant, device + host; MemTracker "
                       f"estimate of what stays outside the host pool {mib(ka.get('mt_per_layer'))}) vs {mib(mb)} MiB "
                       f"(MemTracker estimate, all CPU memory; its saved-tensor hooks see "
                       f"{mib(kb.get('first_dev'))}): {same}; peak ACT {mib(ra['mt_peak_act'])} vs "
                       f"{mib(rb['mt_peak_act'])} MiB, peak total excl. host pool "
                       f"{mib(ra['mt_peak_total'] - ra['mt_peak_other'])} vs {mib(rb['mt_peak_total'] - rb['mt_peak_other'])} MiB.")
            tl = timing(res, a, b, names[0])
            if tl:
                out.append(f"  - step time {a} / {b}: {tl[0]} → **{tl[1]}**.")
            gd = rb.get("grad_diff")
            out.append(f"  - DeepSpeed: caller's input {rb['input']}; gradients vs bigtrain none: max abs diff "
                       f"{gd if isinstance(gd, str) else f'{gd:.3g}'}.")
        if not any_ds:
            out.append(f"- DeepSpeed rows not run ({s2.get('ds_note') or 'skipped'}); bigtrain rows only.")
    return out


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="model preset (default: configs/llama-125m.yaml on CPU, configs/llama-1b.yaml on CUDA)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 256 on CPU, the config's on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 1 on CPU, the config's on CUDA)")
    p.add_argument("--steps", type=int, default=3, help="timed rounds per mode (interleaved)")
    p.add_argument("--budget", type=float, default=690,
                   help="seconds for the whole run (0: none); when other processes slow the machine down, timed "
                        "rounds after the first are dropped (and the report says so) to stay within it; section 2 "
                        "gets at most a third")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="section 1's device")
    p.add_argument("--fp32", action="store_true", help="on CUDA: fp32 instead of bf16 autocast")
    p.add_argument("--threads", type=int, default=2, help="torch threads in section 1 on the CPU")
    p.add_argument("--offload-min-size", default="0", help="recompute.offload_min_size of the offload modes")
    p.add_argument("--tp2-layers", type=int, default=4, help="n_layers of section 2's model")
    p.add_argument("--tp2-seq", type=int, default=None, help="section 2 sequence length (default: --seq on CPU, 256 on CUDA)")
    p.add_argument("--tp2-batch", type=int, default=None, help="section 2 micro-batch (default: --batch on CPU, 1 on CUDA)")
    p.add_argument("--skip-tp1", action="store_true", help="skip section 1")
    p.add_argument("--tp1-modes", default=None,
                   help="section 1: only these modes, names separated by ';' (none is always first)")
    p.add_argument("--skip-tp2", action="store_true", help="skip section 2")
    p.add_argument("--skip-deepspeed", action="store_true", help="skip DeepSpeed's rows in section 2")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="section 1: the output layer and loss in chunks of this many positions (train.loss_chunk)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value (model.* matter here)")
    a = p.parse_args()
    if a.steps < 1:
        p.error("--steps must be >= 1")

    use_cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device("cuda" if use_cuda else "cpu")
    config = a.config or ("configs/llama-1b.yaml" if use_cuda else "configs/llama-125m.yaml")
    full_cfg = load_config(config, ["model.dropout=0", *a.overrides])
    cfg = full_cfg.model
    if cfg.vocab_size <= 0:
        p.error(f"{config} leaves model.vocab_size to the tokenizer; pass model.vocab_size=N")
    seq = a.seq or (full_cfg.train.seq_len if use_cuda else 256)
    batch = a.batch or (full_cfg.train.micro_batch_size if use_cuda else 1)
    tp2_seq = a.tp2_seq or (seq if not use_cuda else 256)
    tp2_batch = a.tp2_batch or (batch if not use_cuda else 1)
    for name, s in (("--seq", seq), ("--tp2-seq", tp2_seq)):
        if s > cfg.max_seq_len:
            p.error(f"{name} {s} exceeds model.max_seq_len({cfg.max_seq_len})")
    autocast = use_cuda and not a.fp32
    ds_version = version("deepspeed")
    want_ds = not a.skip_deepspeed
    ds_note = None
    if want_ds:
        # Section 2 runs on the CPU even on a CUDA machine: make DeepSpeed pick its CPU accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed  # noqa: F401 -- imported here, before the ranks fork, so they inherit it
        except Exception as e:  # noqa: BLE001
            want_ds, ds_note = False, f"deepspeed is not importable ({_short_error(e)}): its rows are skipped"
    else:
        ds_note = "--skip-deepspeed"

    started = datetime.datetime.now().astimezone()
    load0 = loadavg()
    lines = ["# Activation recompute benchmark", ""]
    lines.append(f"- command: `{' '.join(shlex.quote(x) for x in [sys.executable, *sys.argv])}`")
    machine_line = len(lines)  # filled in after section 2: naming the GPU initialises CUDA, not before a fork
    lines.append("")
    lines.append(f"- date: {started.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average at start: {load0}")
    lines.append(f"- config: {config} {' '.join(a.overrides)} → dim {cfg.dim}, n_layers {cfg.n_layers}, n_heads "
                 f"{cfg.n_heads}, n_kv_heads {cfg.kv_heads}, ffn_hidden {cfg.hidden}, vocab {cfg.vocab_size}, dropout "
                 f"{cfg.dropout}, tied embeddings {cfg.tie_embeddings}")
    lines.append("")

    # Section 2 runs first: its ranks are forked, best before this process holds CUDA or big models.
    s2 = None
    if not a.skip_tp2:
        from tests.multiproc import run_ranks

        cfg2 = load_config(config, ["model.dropout=0", *a.overrides, f"model.n_layers={a.tp2_layers}"]).model
        # Section 2 gets at most a third of the budget (it normally needs well under that).
        budget_left = (T0 + a.budget / 3 - time.perf_counter()) if a.budget > 0 else None
        spec = {"cfg": cfg2, "b": tp2_batch, "s": tp2_seq, "steps": a.steps, "min_size": a.offload_min_size,
                "budget_left": budget_left,
                "deepspeed": want_ds, "ds_note": ds_note,
                "threads": max(1, len(os.sched_getaffinity(0)) // 2)}
        log(f"section 2: tp=2 on 2 gloo ranks, {a.tp2_layers} layers, seq {tp2_seq}, batch {tp2_batch}")
        t = time.perf_counter()
        s2 = run_ranks(tp2_worker, 2, spec, timeout=3600)[0]
        s2["n_layers"], s2["cfg"], s2["secs"], s2["threads"] = a.tp2_layers, cfg2, time.perf_counter() - t, spec["threads"]

    gpu = f", GPU: {torch.cuda.get_device_name()}" if use_cuda else ""
    lines[machine_line] = (f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}"
                           f"{gpu}; Python {platform.python_version()}, torch {torch.__version__}, deepspeed {ds_version}")
    s1 = None
    if not a.skip_tp1:
        if device.type == "cpu":
            torch.set_num_threads(a.threads)
        log(f"section 1: {device}, {cfg.n_layers} layers, seq {seq}, batch {batch}")
        t = time.perf_counter()
        dims = ParallelDims.single()
        modes = tp1_modes(cfg.n_layers, a.offload_min_size)
        if a.tp1_modes:
            wanted = {n.strip() for n in a.tp1_modes.split(";")} | {"none"}
            unknown = wanted - {m.name for m in modes}
            if unknown:
                p.error(f"--tp1-modes: unknown {sorted(unknown)}; choose from: {'; '.join(m.name for m in modes)}")
            modes = [m for m in modes if m.name in wanted]
        bench = Bench(cfg, dims, device, batch, seq, autocast, loss_chunk=a.loss_chunk)
        deadline = T0 + a.budget - 45 if a.budget > 0 else None  # 45 s: FLOPs counting and the report
        res, timing = run_modes(bench, modes, a.steps, deadline=deadline)
        for mode in modes:
            res[mode.name]["formula"] = bench.formula(mode.rc or mode.formula_rc)
            res[mode.name]["outside_formula"] = bench.outside_formula(mode.rc)
        log("  FLOPs (fake tensors)")
        flops = {m.name: count_flops(cfg, dims, m, batch, seq) for m in modes}
        s1 = {"res": res, "names": [m.name for m in modes], "n_layers": cfg.n_layers, "flops": flops,
              "secs": time.perf_counter() - t, "timing": timing}
        del bench

    if s1 is not None:
        prec = "bf16 autocast (fp32 weights)" if autocast else "fp32"
        lines.append(f"## 1. One process: {device.type.upper()} {prec}, {cfg.n_layers} layers, seq_len {seq}, "
                     f"micro-batch {batch}" + (f", {a.threads} threads" if device.type == "cpu" else ""))
        lines.append("")
        lines.append(f"Every mode's model shares the same weights. offload_min_size = {a.offload_min_size!r} for the "
                     f"offload modes. Timed: {s1['timing']['rounds']} interleaved rounds, after one measurement step per "
                     f"mode and one untimed interleaved warm-up round ({s1['secs']:.0f} s for this section)."
                     + (f" **Rounds cut: {s1['timing']['cut']}.**" if s1['timing']['cut'] else ""))
        lines.append("")
        lines.append("**Bytes kept for backward** (bigtrain's ActivationAccountant during one forward; formula = "
                     "`block_formula`; † = outer `saved_tensors_hooks` count of unique storages minus the no-recompute "
                     "run's outside-the-blocks bytes, divided by the layers: the accountant cannot see inside torch's "
                     "checkpoint). 'First span' is layer 0, or layers 0-1 for the uniform group of 2.")
        lines.append("")
        t1, t2 = section_rows(res, s1["names"], cfg.n_layers, {}, flops, device.type == "cuda")
        lines += t1
        lines.append("")
        lines.append("**Memory, FLOPs, time, correctness.** MemTracker (torch.distributed._tools.mem_tracker) tracks every "
                     "tensor storage created inside it on each device, by category, over one forward+backward (parameters "
                     "and gradients included; the weights are registered with track_external). "
                     + ("On the CPU the offload modes' host pool is CPU memory too: it was allocated in an earlier "
                        "forward and registered as 'Other', so 'peak ACT' never includes it, 'peak total' does, and "
                        "'excl. host pool' subtracts it. " if device.type == "cpu" else
                        "On CUDA the MemTracker figures are the GPU's; the offload modes' host pool is pinned host "
                        "memory, outside them (its size is shown); 'cuda max_memory_allocated' is the allocator's own "
                        "peak over the same step. ") +
                     "'kept/layer from MemTracker' = (activations alive after forward − the same for none) / layers + "
                     "none's accountant bytes per layer: a kept-bytes figure that also sees what checkpoints hold "
                     "outside autograd. FLOPs: FlopCounterMode with sdpa_kernel(MATH) on a FakeTensorMode copy of the "
                     "model (same ops dispatched, nothing computed). Time: median of the timed rounds; ratio = median / none's median, "
                     "range = min/max of per-round ratios. 'Other load' = cores used by other processes during each "
                     f"timed step (/proc/stat minus this process); steps under {CLEAN_LOAD} cores count as uncontended. "
                     "Grad diff: max |grad − none's grad| over all parameters after the measurement step.")
        lines.append("")
        lines += t2
        lines.append("")
        lines.append(raw_times(res, s1["names"]))
        lines.append("")
        lines.append("Where each mode's peak ACT is reached (MemTracker's phase and innermost module at that moment): "
                     + "; ".join(f"{n}: {res[n].get('mt_peak_act_at') or '-'}" for n in s1["names"]) + ".")
        lines.append("")
        if autocast:
            lines.append("Note: under bf16 autocast the formula takes 2-byte matmul/attention activations, fp32 norms and "
                         "residual stream, and the bf16 weight copies the matmuls save (see bigtrain/recompute/accounting.py).")
            lines.append("")

    if s2 is not None:
        cfg2 = s2["cfg"]
        lines.append(f"## 2. tp=2 on 2 gloo ranks (CPU fp32, {s2['threads']} thread(s) per rank), n_layers reduced to "
                     f"{s2['n_layers']} (dim {cfg2.dim}, vocab {cfg2.vocab_size}), seq_len {tp2_seq}, micro-batch "
                     f"{tp2_batch}; figures of rank 0")
        lines.append("")
        note = s2.get("ds_note")
        if note:
            lines.append(f"Note: DeepSpeed rows skipped: {note}.")
            lines.append("")
        lines.append(f"DeepSpeed wraps each block with `deepspeed.checkpointing.checkpoint` through `model.block_runner` "
                     f"(configured with `configure(MPU(dims), partition_activations=True, checkpoint_in_cpu=...)` before "
                     f"each forward; the rotary table is passed by closure). Its reentrant checkpoint keeps the inputs "
                     f"on ctx attributes, which saved-tensor hooks do not see (†): MemTracker's estimate is the fair "
                     f"comparison. Formula for the DeepSpeed rows: bigtrain's full+partition(+offload). Timed: "
                     f"{s2['timing']['rounds']} interleaved rounds after a measurement step per mode and an untimed "
                     f"warm-up round ({s2['secs']:.0f} s for this section, process start "
                     f"included)." + (f" **Rounds cut: {s2['timing']['cut']}.**" if s2['timing']['cut'] else ""))
        lines.append("")
        t1, t2 = section_rows(s2["res"], s2["modes"], s2["n_layers"], s2["foreign"], None, False)
        lines += t1
        lines.append("")
        lines += t2
        lines.append("")
        lines.append(raw_times(s2["res"], s2["modes"]))
        lines.append("")

    lines.append("## 3. Verdict (computed from the figures above)")
    lines.append("")
    lines += verdict(s1, s2)
    lines.append("")
    lines.append(f"Total wall time {time.perf_counter() - T0:.0f} s; load average at end: {loadavg()}.")
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out:
        Path(a.out).write_text(report)


if __name__ == "__main__":
    main()
