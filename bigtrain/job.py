"""The resolved job: every fact derived from a config for one launch, validated once.

    job = resolve(cfg, world=8, device="cuda")     # no processes, no memory: a pure function

A loaded `Config` is what the user wrote (checked key by key and section by section in
config.py, rules that need nothing but the config). `resolve` adds what the launch knows --
the number of processes, the device, the data's vocabulary -- and derives, in one place, the
layout (tp, dp, sequence parallelism), gradient accumulation, the vocabulary and its padding,
the compute dtype and one rank's activation shape. The trainer (bigtrain.build), the planner,
the engines, parallelize and recompute all read the Job; none re-derives or re-checks a fact,
and the user's Config is never mutated (`job.cfg` is a resolved copy, the one written to
config.yaml and checkpoint manifests).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING
from dataclasses import dataclass

import torch

from bigtrain.config import Config
from bigtrain.data.dataset import load_meta
from bigtrain.errors import UserError
from bigtrain.parallel.dims import check_layout, check_model, padded_vocab

if TYPE_CHECKING:  # imported where used: bigtrain.planner's modules import this one (a cycle otherwise)
    from bigtrain.planner.formula import Shape


@dataclass(frozen=True)
class Job:
    cfg: Config  # the user's config with model.vocab_size resolved; never mutated
    world: int  # processes in the job
    device: str  # "cuda" or "cpu": what every rank computes on
    tp: int
    dp: int
    sp: bool  # sequence parallelism
    accum: int  # micro-batches per optimizer step on each data-parallel rank
    bf16: bool  # bf16 autocast (else fp32 throughout)
    padded_vocab: int  # vocab_size rounded up to a multiple of tp (each rank owns an equal slice)
    shape: Shape  # one rank's block activations (the memory formula's input)

    @property
    def vocab_size(self) -> int:
        return self.cfg.model.vocab_size

    def autocast(self):
        """The compute-dtype context of every forward (training, evaluation, the planner's
        simulation)."""
        if not self.bf16:
            return contextlib.nullcontext()
        # No weight-cast cache: each weight is used once per forward, and a cache would keep a
        # bf16 copy of every weight alive until the whole forward ends -- also under recompute,
        # which would otherwise drop them (the planner counts what autograd keeps, not the cache).
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16, cache_enabled=False)


def resolve(cfg: Config, world: int, device: str, meta: dict | None = None) -> Job:
    """Validate `cfg` for `world` processes on `device` and derive the Job.

    meta: the data's meta.json (the trainer has it); None reads it only when the vocabulary
    must come from it (model.vocab_size 0), so `bigtrain plan` needs no data for a preset.
    """
    tp, dp = check_layout(world, cfg.parallel.tp, cfg.parallel.dp)
    cfg = _with_vocab(cfg, meta)
    check_model(cfg.model, tp)
    t = cfg.train
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size({t.global_batch_size}) is not a multiple of "
                        f"train.micro_batch_size({t.micro_batch_size}) * dp({dp}) = {per_step}")
    from bigtrain.planner.formula import Shape  # here, not at the top: see the import there

    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device == "cuda")
    elem = 2 if bf16 else 4
    sp = cfg.parallel.sequence_parallel
    on_cpu = device == "cpu"
    # CPU dropout masks are stored in the activation dtype (bool on CUDA), and CPU attention
    # with dropout falls back to SDPA's math kernel, which keeps the probabilities.
    shape = Shape(cfg.model, t.micro_batch_size, t.seq_len, tp, sp, elem,
                  mask_bytes=elem if on_cpu else 1, math_attention=on_cpu and cfg.model.dropout > 0)
    return Job(cfg, world, device, tp, dp, sp, t.global_batch_size // per_step, bf16,
               padded_vocab(cfg.model.vocab_size, tp), shape)


def _with_vocab(cfg: Config, meta: dict | None) -> Config:
    """cfg with model.vocab_size taken from the tokenizer when it is 0 (a copy: cfg is unchanged),
    checked against the tokenizer's when the data's meta is known."""
    vocab = cfg.model.vocab_size
    if vocab == 0 and meta is None:
        meta = load_meta(cfg.data.path)  # a clear error if data.path was never prepared
    if meta is not None:
        if vocab == 0:
            vocab = int(meta["vocab_size"])
        elif vocab < meta["vocab_size"]:
            raise UserError(f"model.vocab_size({vocab}) is smaller than the tokenizer's "
                            f"vocabulary ({meta['vocab_size']}) in data.path {cfg.data.path!r}")
    if vocab == cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
