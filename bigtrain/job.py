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
from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.config import Config, ModelConfig
from bigtrain.data.mixture import data_meta
from bigtrain.data.tokenizer import check_vocab
from bigtrain.errors import UserError
from bigtrain.model import flex_available
from bigtrain.parallel.dims import check_layout, check_model, padded_vocab


@dataclass(frozen=True)
class Shape:
    """One rank's block as the activation formula (bigtrain.planner.formula) sees it."""
    model: ModelConfig
    b: int  # micro-batch
    s: int  # sequence length
    tp: int = 1
    sp: bool = False
    elem: int = 4  # bytes of a matmul/attention activation: 4 in fp32, 2 under bf16 autocast
    mask_bytes: int = 4  # bytes per dropout-mask element: 1 on CUDA (bool), elem on the CPU
    math_attention: bool = False  # attention dropout on the CPU: SDPA's math kernel
    documents: bool = False  # data.document_mask: per-token rotary angles and a block-causal mask
    flex: bool = False  # ... held as a flex BlockMask (CUDA, no dropout), else as a dense (b, 1, s, s) mask
    expand_kv: bool = False  # dense mask on CUDA with GQA: attention repeats the kv heads (model.CoreAttention)
    loss_chunk: int = 0  # train.loss_chunk when it splits the sequence (0: the output layer and loss at once)
    # Exact (tests/test_recompute.py) in fp32, and under bf16 autocast without dropout on the
    # CPU; CPU dropout under autocast keeps masks in mixed dtypes the formula does not follow.

    @property
    def autocast(self) -> bool:
        return self.elem < 4


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
    eos_id: int | None = None  # the data's end-of-document id, for data.document_mask (None: data not read)

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

    meta: the data's meta.json (the trainer has it; a data.mix's shared one, see
    bigtrain.data.mixture.data_meta); None reads it only when the vocabulary
    must come from it (model.vocab_size 0), so `bigtrain plan` needs no data for a preset.
    """
    tp, dp = check_layout(world, cfg.parallel.tp, cfg.parallel.dp, cfg.parallel.sequence_parallel)
    cfg = _with_vocab(_with_data_path(cfg), meta)
    check_model(cfg.model, tp)
    t = cfg.train
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size({t.global_batch_size}) is not a multiple of "
                        f"train.micro_batch_size({t.micro_batch_size}) * dp({dp}) = {per_step}")
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device == "cuda")
    elem = 2 if bf16 else 4
    sp = cfg.parallel.sequence_parallel
    on_cpu = device == "cpu"
    # CPU dropout masks are stored in the activation dtype (bool on CUDA), and CPU attention
    # with dropout falls back to SDPA's math kernel, which keeps the probabilities.
    documents = cfg.data.document_mask
    if documents and meta is not None and meta["eos_id"] < 0:
        raise UserError("data.document_mask=true needs an end-of-document id, but the data's tokenizer has none "
                        "(meta.json eos_id=-1); prepare the data with `bigtrain prepare` (which ends every "
                        "document with EOS) or set data.document_mask=false")
    flex = documents and not on_cpu and flex_available() and cfg.model.dropout == 0
    shape = Shape(cfg.model, t.micro_batch_size, t.seq_len, tp, sp, elem,
                  mask_bytes=elem if on_cpu else 1, math_attention=on_cpu and cfg.model.dropout > 0,
                  documents=documents, flex=flex,
                  expand_kv=documents and not on_cpu and not flex and cfg.model.kv_heads < cfg.model.n_heads,
                  loss_chunk=t.loss_chunk if t.loss_chunk < t.seq_len else 0)
    return Job(cfg, world, device, tp, dp, sp, t.global_batch_size // per_step, bf16,
               padded_vocab(cfg.model.vocab_size, tp), shape, meta["eos_id"] if meta is not None else None)


def _with_data_path(cfg: Config) -> Config:
    """With data.mix, data.path names its first source: the directory whose tokenizer.model (the
    sources share it) `bigtrain sample` and `export-hf` read from the run's config.yaml."""
    mixture = cfg.data.mixture()
    if not mixture or cfg.data.path == mixture[0][0]:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=mixture[0][0]))


def _with_vocab(cfg: Config, meta: dict | None) -> Config:
    """cfg with model.vocab_size taken from the tokenizer when it is 0 (a copy: cfg is unchanged),
    checked against the tokenizer's when the data's meta is known."""
    vocab = cfg.model.vocab_size
    if vocab == 0 and meta is None:
        meta = data_meta(cfg.data)  # a clear error if data.path (or a data.mix source) was never prepared
    if meta is not None:
        if vocab == 0:
            vocab = int(meta["vocab_size"])
        # the model's tokenizer, where the run has one (import-hf), must be the data's
        check_vocab(meta, vocab, Path(cfg.train.out_dir) / "tokenizer.model")
    if vocab == cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
