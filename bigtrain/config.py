"""Configuration: nested dataclasses, YAML files and `key.sub=value` overrides.

Every field has a docstring right below it (the reference in README.md is generated from them by
`bigtrain config --doc`). YAML is read with `yaml.safe_load` and values are converted by the
field's declared type, so a config file never executes code. Unknown keys, wrong types and
impossible values raise `ConfigError` with the field, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import fractions
import inspect
import math
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bigtrain.errors import ConfigError
from bigtrain.parallel.dims import check_sequence


@dataclass
class ModelConfig:
    dim: int = 256
    """Hidden size h of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks L."""
    n_heads: int = 8
    """Number of query heads a; head_dim = dim / n_heads."""
    n_kv_heads: int = 0
    """Number of key/value heads for grouped-query attention; 0 means n_heads (plain multi-head)."""
    ffn_hidden: int = 0
    """Hidden size of the SwiGLU MLP; 0 means Llama's rule: 2/3 * 4 * dim rounded up to multiple_of."""
    multiple_of: int = 64
    """Rounding for the automatic ffn_hidden."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the tokenizer in data.path (meta.json)."""
    max_seq_len: int = 2048
    """Longest sequence the rotary tables are built for; train.seq_len may not exceed it."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    dropout: float = 0.0
    """Dropout probability on attention weights and on both residual branches (0 disables)."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; residual output projections get init_std / sqrt(2 * n_layers)."""

    def validate(self) -> None:
        _positive(self, "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of")
        _nonnegative(self, "n_kv_heads", "ffn_hidden", "vocab_size")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim({self.dim}) is not divisible by model.n_heads({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head_dim = model.dim({self.dim}) / model.n_heads({self.n_heads}) = "
                              f"{self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"model.n_heads({self.n_heads}) is not divisible by model.n_kv_heads({self.kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.rope_theta, model.norm_eps and model.init_std must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        h = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size t: ranks that split each layer's weights (adjacent ranks, same node)."""
    dp: int = 0
    """Data-parallel size; 0 infers world_size / tp."""
    sequence_parallel: bool = False
    """Run norms, dropout and the residual stream on 1/tp of the sequence (needs tp > 1)."""
    engine: Literal["ddp", "deepspeed"] = "ddp"
    """Data-parallel engine: torch DDP, or DeepSpeed ZeRO through deepspeed.initialize."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (1, 2 or 3) when engine is deepspeed."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states in host memory."""
    zero3_persistence_threshold: int = 100000
    """DeepSpeed ZeRO-3: parameters with fewer elements than this stay whole on every rank (DeepSpeed's stage3_param_persistence_threshold; 0 partitions every parameter)."""
    zero_bucket_size: int = 500_000_000
    """DeepSpeed: elements per gradient-reduction bucket (reduce_bucket_size) and, at stages 1-2, per all-gather bucket (allgather_bucket_size); DeepSpeed's default. Smaller buckets take less memory (bigtrain plan counts one) and overlap more, at more collectives."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto is nccl with CUDA, gloo on CPU."""
    timeout_s: float = 600.0
    """Seconds a collective waits for the other ranks before the job stops with an error naming the ranks that stopped answering (torch's default is 30 minutes)."""

    def validate(self) -> None:
        _positive(self, "tp", "timeout_s", "zero_bucket_size")
        _nonnegative(self, "dp", "zero3_persistence_threshold")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} is not allowed; choose 1, 2 or 3")


@dataclass
class RecomputeConfig:
    granularity: Literal["none", "full", "selective", "auto"] = "none"
    """Activation checkpointing: none keeps everything, full keeps only the inputs of checkpointed blocks, selective recomputes recompute.modules inside every block, auto plans from recompute.memory_budget."""
    method: Literal["uniform", "block"] = "uniform"
    """Full recompute: uniform checkpoints groups of num_layers blocks (one input kept per group); block checkpoints only the first num_layers blocks, the rest keep everything."""
    num_layers: int = 1
    """Group size (method uniform) or number of checkpointed blocks (method block)."""
    modules: list[str] = field(default_factory=lambda: ["norm", "mlp_act"])
    """Selective recompute: what is recomputed inside each block: norm (both RMSNorms), mlp_act (the SwiGLU product), core_attn (fused attention; saves little, see README), mlp (the whole MLP), pointwise (every elementwise op of the block, from kept matmul and attention outputs; combines with core_attn and mlp)."""
    offload: bool = False
    """Move the tensors kept for backward (checkpoint inputs under full; all kept activations under none or selective) to a reused host pool, copied back before their block's backward."""
    offload_min_size: str = "1MiB"
    """Offload: tensors smaller than this stay on the device (e.g. 64KiB, 0 moves everything)."""
    partition: bool = False
    """Full recompute: keep each checkpoint input as this rank's 1/tp slice, all-gathered for the replay (needs parallel.tp > 1; a no-op under sequence parallelism, whose inputs are already split)."""
    memory_budget: str = ""
    """Per-GPU memory budget for granularity auto, e.g. 70GiB."""
    host_memory_budget: str = "auto"
    """Granularity auto: host memory one rank's offloaded activations (whole pinned chunks) and offloaded optimizer states may take, e.g. 200GiB; auto: 80% of this machine's RAM divided by the ranks per node (LOCAL_WORLD_SIZE, else the job's world size, at most 8). Set it when planning on another machine than the job's."""

    def validate(self) -> None:
        _positive(self, "num_layers")
        bad = [m for m in self.modules if m not in RECOMPUTE_MODULES]
        if bad:
            raise ConfigError(f"recompute.modules has unknown {bad}; allowed: {', '.join(RECOMPUTE_MODULES)}")
        parse_bytes(self.offload_min_size, "recompute.offload_min_size")
        g = self.granularity
        if g == "auto":
            if not self.memory_budget:
                raise ConfigError("recompute.granularity=auto needs recompute.memory_budget, the memory of one "
                                  "GPU it must fit in, e.g. 70GiB")
            parse_bytes(self.memory_budget, "recompute.memory_budget")
            if self.offload:
                raise ConfigError("recompute.granularity=auto chooses offload per block itself; "
                                  "leave recompute.offload=false")
            if self.host_memory_budget != "auto":
                parse_bytes(self.host_memory_budget, "recompute.host_memory_budget")
        elif self.host_memory_budget != "auto":
            raise ConfigError(f"recompute.host_memory_budget bounds what recompute.granularity=auto offloads; "
                              f"it is only used by auto (granularity is {g})")
        if self.memory_budget and g != "auto":
            raise ConfigError(f"recompute.memory_budget is only used by recompute.granularity=auto (it is {g})")
        if self.partition and g != "full":
            raise ConfigError(f"recompute.partition=true splits the inputs kept by full recompute across the "
                              f"tensor-parallel ranks; it needs recompute.granularity=full (it is {g})")
        if g == "selective":
            if not self.modules:
                raise ConfigError("recompute.granularity=selective needs recompute.modules, a list from: "
                                  + ", ".join(RECOMPUTE_MODULES))
            if "mlp" in self.modules and "mlp_act" in self.modules:
                raise ConfigError("recompute.modules lists both mlp and mlp_act; mlp already recomputes the "
                                  "SwiGLU product: keep one")
            if len(set(self.modules)) != len(self.modules):
                raise ConfigError(f"recompute.modules={self.modules} lists a module twice")
            both = [m for m in ("norm", "mlp_act") if m in self.modules]
            if "pointwise" in self.modules and both:
                raise ConfigError(f"recompute.modules lists pointwise and {both[0]}; pointwise already recomputes "
                                  "every elementwise op (norms, SwiGLU product): drop " + both[0])


RECOMPUTE_MODULES = ("norm", "mlp_act", "core_attn", "mlp", "pointwise")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Schedule after warmup: cosine decay to min_lr, warmup-stable-decay, or constant."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    decay_fraction: float = 0.2
    """wsd only: fraction of train.steps spent in the final linear decay to min_lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def validate(self) -> None:
        _nonnegative(self, "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eps")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr({self.min_lr}) is larger than optim.lr({self.lr})")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in [0, 1]")
        for b in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, b) < 1.0:
                raise ConfigError(f"optim.{b}={getattr(self, b)} must be in [0, 1)")


@dataclass
class DataConfig:
    path: str = "data/shakespeare"
    """Directory written by `bigtrain prepare`: train.bin, val.bin, tokenizer.model, meta.json."""
    eval_batches: int = 8
    """Micro-batches of the validation split per evaluation."""
    mix: list[str] = field(default_factory=list)
    """Train on a weighted mixture of prepared directories instead of data.path: DIR:WEIGHT items, e.g. [data/web:0.7, data/code:0.3] (data.mix=data/web:0.7,data/code:0.3 on the command line); weights are relative, every source must share one tokenizer, and each sample's source is drawn from the weights with train.seed."""

    document_mask: bool = False
    """Attention stops at end-of-document tokens inside a packed sequence, and rotary positions restart at each document (block-causal attention: SDPA with a mask on the CPU, flex attention on CUDA). Needs data whose tokenizer has an EOS id (bigtrain prepare writes one after every document)."""

    def validate(self) -> None:
        _positive(self, "eval_batches")
        mixture = self.mixture()
        if mixture and os.path.normpath(self.path) not in {os.path.normpath(d) for d, _ in mixture} \
                and self.path not in ("", DataConfig.path):
            raise ConfigError(f"data.path={self.path!r} and data.mix both name the training data; with data.mix "
                              f"leave data.path unset (or name one of the mixture's directories)")

    def mixture(self) -> list[tuple[str, float]]:
        """data.mix as (directory, weight) pairs, weights as written ([] without a mixture)."""
        form = "write data.mix=DIR:WEIGHT,DIR:WEIGHT (e.g. data/web:0.7,data/code:0.3), weights > 0"
        pairs, seen = [], set()
        for i, item in enumerate(self.mix):
            path, sep, weight = item.rpartition(":")
            try:
                w = float(weight) if sep and path.strip() else None
            except ValueError:
                w = None
            if w is None:
                raise ConfigError(f"data.mix[{i}]={item!r} is not DIR:WEIGHT; {form}")
            if not (math.isfinite(w) and w > 0):
                raise ConfigError(f"data.mix[{i}]={item!r} has weight {weight.strip()!r}, not a finite number > 0; {form}")
            path = path.strip()
            if os.path.normpath(path) in seen:
                raise ConfigError(f"data.mix names {path!r} twice; list each directory once with its total weight")
            seen.add(os.path.normpath(path))
            pairs.append((path, w))
        return pairs


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for."""
    seed: int = 1234
    """Seed for weights, data order and dropout: same seed, same run."""
    out_dir: str = "runs/debug"
    """Run directory: config.yaml, metrics.jsonl and checkpoints/."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills the gap)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    save_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    resume: str = "none"
    """auto: continue from the latest complete checkpoint in out_dir (if any); none: start fresh; or a checkpoint directory."""
    eval_every: int = 0
    """Evaluate on the validation split every N steps (0: only at the end)."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: auto is bf16 autocast on CUDA and fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: the local GPU if there is one, else the CPU."""
    stop_check_every: int = 10
    """On SIGTERM/SIGUSR1 the ranks agree to stop at logging steps and every N steps (each check is a host sync)."""
    loss_chunk: int = 0
    """Compute the output layer and the loss this many positions at a time, each chunk's logits recomputed in backward: the (b, seq_len, vocab) logits and their fp32 softmax never exist whole: one chunk's logits do (fp32 ones hold their own softmax; bf16 ones an fp32 copy beside them), at one more output-layer forward per step. 0: the whole micro-batch at once. Under sequence parallelism a multiple of parallel.tp."""
    async_save: Literal["auto", "true", "false"] = "auto"
    """Write the save_every checkpoints in a background thread while training continues (parallel.engine=ddp only): the state is copied to host memory, which takes 12 bytes per parameter of this rank's shards. auto: on with DDP on CUDA when that copy fits in the host memory budget (recompute.host_memory_budget) beside offload's; off on the CPU, where the copy shares the training's memory and cores."""

    def validate(self) -> None:
        _positive(self, "steps", "micro_batch_size", "global_batch_size", "seq_len", "stop_check_every")
        _nonnegative(self, "save_every", "eval_every", "loss_chunk")
        if not 0 <= self.seed < SEED_LIMIT:  # torch.manual_seed takes < 2**64, and the "tp" stream adds an offset
            raise ConfigError(f"train.seed={self.seed} must be in [0, 2**63)")


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when an API key is configured, else disabled."""
    project: str = "bigtrain"
    """wandb project name."""
    name: str = ""
    """wandb run name; empty uses the run directory's name."""


@dataclass
class LogConfig:
    every: int = 10
    """Log metrics every N steps (1 logs every step)."""
    progress: bool = True
    """Show a progress bar with loss, lr and tokens/s (rank 0 only)."""
    peak_tflops: float = 0.0
    """Peak FLOP/s of one device in TFLOP/s for MFU; 0 looks the GPU up (MFU is null on CPU)."""
    activation_memory: bool = False
    """Print the bytes saved for backward per block after the first step."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""

    def validate(self) -> None:
        _positive(self, "every")
        _nonnegative(self, "peak_tflops")


@dataclass
class CheckpointConfig:
    keep_last: int = 3
    """Keep only the newest K complete checkpoints (0 keeps all)."""

    def validate(self) -> None:
        _nonnegative(self, "keep_last")


@dataclass
class HardwareConfig:
    gpu_memory: str = "80GiB"
    """Memory of one GPU: what `bigtrain plan` checks the layout against (--gpu-memory overrides it)."""
    peak_tflops: float = 989.0
    """Dense bf16 TFLOP/s of one GPU, for the planner's time estimates (H100/H200 SXM: 989; A100: 312)."""
    mfu: float = 0.45
    """Fraction of peak_tflops a training step reaches, for the planner's time estimates."""
    memory_bandwidth: float = 3350.0
    """GB/s of GPU memory, for the cost of recomputing elementwise modules (norms, SwiGLU product)."""
    host_bandwidth: float = 25.0
    """GB/s between one GPU and host memory in each direction, for the cost of offload."""
    tp_bandwidth: float = 150.0
    """GB/s of all-gather bus bandwidth inside a tensor-parallel group, for the cost of partition."""

    def validate(self) -> None:
        _positive(self, "peak_tflops", "mfu", "memory_bandwidth", "host_bandwidth", "tp_bandwidth")
        if self.mfu > 1:
            raise ConfigError(f"hardware.mfu={self.mfu} must be in (0, 1]")
        parse_bytes(self.gpu_memory, "hardware.gpu_memory")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Llama-style decoder."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor, sequence and data parallelism."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    """Activation checkpointing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    log: LogConfig = field(default_factory=LogConfig)
    """Console, metrics.jsonl and wandb."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint retention."""
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    """What `bigtrain plan` and recompute.granularity=auto assume about one GPU."""

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        m, t = self.model, self.train
        if t.seq_len > m.max_seq_len:
            raise ConfigError(f"train.seq_len({t.seq_len}) exceeds model.max_seq_len({m.max_seq_len}), "
                              f"the longest sequence the rotary tables cover")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size({t.global_batch_size}) is not a multiple of "
                              f"train.micro_batch_size({t.micro_batch_size})")
        if t.async_save == "true" and self.parallel.engine == "deepspeed":
            raise ConfigError("train.async_save=true needs parallel.engine=ddp: DeepSpeed's own save is a "
                              "collective of the training ranks and cannot run beside training")
        if self.parallel.sequence_parallel:
            check_sequence(t.seq_len, self.parallel.tp, names=("train.seq_len", "parallel.tp"))
            if t.loss_chunk % self.parallel.tp:
                raise ConfigError(f"train.loss_chunk({t.loss_chunk}) must be a multiple of parallel.tp({self.parallel.tp}) "
                                  f"under sequence parallelism (each rank takes loss_chunk / tp positions of a chunk)")
        r = self.recompute
        if r.granularity == "full" and r.num_layers > m.n_layers:
            raise ConfigError(f"recompute.num_layers({r.num_layers}) exceeds model.n_layers({m.n_layers})")
        if r.partition and self.parallel.tp == 1:
            raise ConfigError("recompute.partition=true splits checkpoints across tensor-parallel ranks; "
                              "it needs parallel.tp > 1")
        return self


# --------------------------------------------------------------------------------------------
# Loading, overriding, saving


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults when path is None), apply `a.b=c` overrides, validate."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                              f"save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
        _merge(cfg, data, prefix="")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        set_value(cfg, key.strip(), value, from_cli=True)
    return cfg.validate()


def _merge(obj: Any, data: dict, prefix: str) -> None:
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(_field_type(obj, str(key), full), type) \
                and dataclasses.is_dataclass(_field_type(obj, str(key), full)):
            _merge(getattr(obj, key), value, prefix=f"{full}.")
        else:
            set_value(obj, str(key), value, from_cli=False, prefix=prefix)


def set_value(root: Any, key: str, value: Any, from_cli: bool, prefix: str = "") -> None:
    """Set dotted `key` below `root` to `value`, converted to the field's type."""
    obj, parts = root, key.split(".")
    for i, part in enumerate(parts):
        full = prefix + ".".join(parts[: i + 1])
        typ = _field_type(obj, part, full)
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(typ):
                raise ConfigError(f"config key {full!r} is a value, not a section")
            obj = getattr(obj, part)
        else:
            if dataclasses.is_dataclass(typ):
                raise ConfigError(f"config key {full!r} is a section; set one of its keys: "
                                  f"{', '.join(f'{full}.{n}' for n in _names(typ))}")
            setattr(obj, part, _coerce(value, typ, full, from_cli))


def _names(cls_or_obj) -> list[str]:
    return [f.name for f in dataclasses.fields(cls_or_obj)]


def _field_type(obj: Any, name: str, full: str):
    hints = typing.get_type_hints(type(obj))
    if name not in hints or name not in _names(obj):
        names = _names(obj)
        close = difflib.get_close_matches(name, names, n=1)
        section = full.rsplit(".", 1)[0] + "." if "." in full else ""
        hint = f" (did you mean {section}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {full!r}{hint}; valid keys here: {', '.join(section + n for n in names)}")
    return hints[name]


INT_LIMIT = 2**63
"""Integer keys hold signed 64-bit values."""
SEED_LIMIT = 2**63
"""train.seed is in [0, SEED_LIMIT)."""

_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(value: Any, typ: Any, key: str, from_cli: bool) -> Any:
    """`value` (from YAML or the command line) as a value of the field type `typ`, or a ConfigError."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        return _coerce_choice(value, typing.get_args(typ), key)
    if origin is list:
        (item_t,) = typing.get_args(typ)
        return [_coerce(v, item_t, f"{key}[{i}]", from_cli) for i, v in enumerate(_as_list(value, item_t, key))]
    scalar = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}.get(typ)
    if scalar is None:
        raise TypeError(f"unsupported config type {typ} for {key}")  # a bug in this module, not user input
    return scalar(value, key)


def _coerce_choice(value: Any, choices: tuple, key: str) -> Any:
    if isinstance(value, bool) and "true" in choices:  # YAML's true/false for a true/false/auto key
        value = "true" if value else "false"
    elif isinstance(value, str) and "true" in choices and value.strip().lower() in _BOOLS:
        value = "true" if _BOOLS[value.strip().lower()] else "false"
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    return value


def _as_list(value: Any, item_t: Any, key: str) -> list:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}={text!r} is not a valid list ({str(e).splitlines()[0]}); "
                                  f"write e.g. {key}=a,b or {key}=[a, b]") from None
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{key}={value!r} must be a list of {item_t.__name__}")
    return value


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLS:
        return _BOOLS[value.strip().lower()]
    raise ConfigError(f"{key}={value!r} must be a boolean (true or false)")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be an integer")
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip().replace("_", "")):
        value = int(value.strip().replace("_", ""))
    if not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer")
    if not -INT_LIMIT <= value < INT_LIMIT:  # every int ends up in a C integer somewhere
        raise ConfigError(f"{key}={value} does not fit in 64 bits; it must be in [-2**63, 2**63)")
    return value


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a number")
    number = None
    if isinstance(value, (int, float, str)):
        try:  # YAML 1.1 reads "3e-4" as a string: accept it as the number it means
            number = float(value.strip() if isinstance(value, str) else value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{key}={value!r} must be a number")
    if not math.isfinite(number):  # nan passes every `x < 0` check: refuse it here, for every float key
        raise ConfigError(f"{key}={value!r} must be a finite number (not nan or inf)")
    return number


def _coerce_str(value: Any, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{key}={value!r} must be a string")
    return str(value)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's or run directory's config)."""
    cfg = Config()
    _merge(cfg, data, prefix="")
    return cfg.validate()


# --------------------------------------------------------------------------------------------
# Field docs (the reference table in README.md)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf field below `cls`."""
    rows, docs, default = [], field_docs(cls), cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += reference(hints[f.name], key + ".")
        else:
            rows.append((key, repr(getattr(default, f.name)), docs.get(f.name, "")))
    return rows


def _positive(obj, *names):
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{_section(obj)}.{n}={getattr(obj, n)} must be > 0")


def _nonnegative(obj, *names):
    for n in names:
        if getattr(obj, n) < 0:
            raise ConfigError(f"{_section(obj)}.{n}={getattr(obj, n)} must be >= 0")


def _section(obj) -> str:
    return type(obj).__name__.removesuffix("Config").lower()


def parse_bytes(text: str, key: str = "") -> int:
    """'70GiB' -> bytes. A non-negative decimal number and a unit: B, KB/KiB, MB/MiB, GB/GiB, TB/TiB
    (no unit: bytes). Computed exactly (no float rounding or overflow); below 2**64 bytes. `key`
    (e.g. hardware.gpu_memory) names the value in errors."""
    shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:30] + "...'"
    what = f"{key}={shown}" if key else shown
    if not isinstance(text, str):
        raise ConfigError(f"{what} is not a size; write e.g. 70GiB or 80GB")
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"{what} is not a size: write a non-negative number and a unit "
                          f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 70GiB or 80GB")
    unit = (m.group(2) or "B").lower()
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    if unit not in units:  # e.g. "iB"
        raise ConfigError(f"{what} has an unknown unit {m.group(2)!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    n = int(fractions.Fraction(m.group(1)) * units[unit])
    if n >= 2**64:
        raise ConfigError(f"{what} is more than 16 EiB (2**64 bytes); is a unit wrong?")
    return n
