"""Data-parallel engines: what turns micro-batch losses into an optimizer step.

`Engine` is the contract the trainer relies on; `TorchEngine` is torch DDP over the
data-parallel group (no wrapper when dp == 1) with a torch AdamW, `DeepSpeedEngine` hands the
module to `deepspeed.initialize` with ZeRO stage 1-3. One optimizer step is

    engine.set_lr(lr)
    for each micro-batch:
        with engine.accumulate(last):    # gradients are synchronised only after the last
            engine.backward(loss_fn(engine.model(x)))
    grad_norm = engine.step()

DeepSpeed is imported only when asked for: the GPU benchmark machine does not have it.
"""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bigtrain import checkpoint as ckpt
from bigtrain.errors import UserError
from bigtrain.job import Job
from bigtrain.optim import build_optimizer, set_lr
from bigtrain.parallel.dims import ParallelDims
from bigtrain.parallel.layers import is_sequence_parallel, is_sharded
from bigtrain.parallel.parallelize import clip_grad_norm, grad_norm, sync_sequence_parallel_grads
from bigtrain.safe_load import check_deepspeed_dir, deepspeed_checkpoint_engine


class Engine(abc.ABC):
    """One meaning per method, whichever engine runs."""

    model: nn.Module
    """What forward calls: the DDP / DeepSpeed wrapper, or the module itself."""
    loads_module_weights: bool = False
    """True when load(directory) restores the module's weights itself (else the caller does)."""
    module_weights_file: str | None = None
    """Where save() writes TP rank {tp_rank}'s full module weights itself, relative to the checkpoint
    directory (a format string), under the state-dict key "module"; None when it does not (the
    rank files then hold them)."""

    def accumulate(self, last: bool):
        """Context around one micro-batch's forward and backward; gradients are synchronised
        across data-parallel ranks only when `last`."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def set_lr(self, lr: float) -> None:
        """Learning rate of the coming step."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Add this micro-batch's gradients (of loss / accumulation steps). Never updates weights."""

    @abc.abstractmethod
    def step(self) -> torch.Tensor | float | None:
        """Apply the accumulated gradients: synchronise, clip, update, zero them. Returns the
        global gradient norm before clipping, unread (a device tensor where the engine has one:
        reading it is a host sync, which the trainer does only at logging steps)."""

    def state_dict(self) -> dict:
        """Engine state that travels in this rank's checkpoint file."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (possibly resharded for another layout)."""

    def each_full_parameter(self):
        """(name, parameter) of the module, each holding its full value while it is the current
        one (ZeRO-3 partitions them between steps). Collective: every rank iterates to the end."""
        yield from self.module.named_parameters()

    def save(self, directory: Path) -> None:
        """Write engine files beside the rank files of a checkpoint directory. Collective."""

    def load(self, directory: Path) -> None:
        """Read what save() wrote. Collective."""


class TorchEngine(Engine):
    def __init__(self, module: nn.Module, dims: ParallelDims, job: Job, device: torch.device):
        self.module, self.dims, self.accum_steps = module, dims, job.accum
        self.grad_clip = job.cfg.optim.grad_clip
        self.model = module
        if dims.dp > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Each DP group all-reduces only its own parameter shards; TP peers hold different
            # shards and never share a DDP group (see ParallelDims' rank layout).
            # gradient_as_bucket_view: gradients live inside DDP's all-reduce buckets instead of
            # beside a second, bucket-sized copy (saves 4 bytes per parameter).
            self.model = DDP(module, process_group=dims.dp_group, gradient_as_bucket_view=True,
                             device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = build_optimizer(module, job.cfg.optim)

    def accumulate(self, last: bool):
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def step(self) -> torch.Tensor:
        sync_sequence_parallel_grads(self.module, self.dims)
        if self.grad_clip > 0:
            norm = clip_grad_norm(self.module, self.grad_clip, self.dims)
        else:
            norm = grad_norm(self.module, self.dims)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def state_dict(self) -> dict:
        return {"optim": ckpt.optimizer_state_by_name(self.optimizer, self.module)}

    def load_state_dict(self, state: dict) -> None:
        ckpt.load_optimizer_state_by_name(self.optimizer, self.module, state["optim"])


class MPU:
    """The model-parallel-unit interface DeepSpeed asks for, answered from ParallelDims, so ZeRO
    partitions over the data-parallel group and counts tensor-parallel shards correctly."""

    def __init__(self, dims: ParallelDims, self_group):
        self.dims = dims
        self.self_group = self_group  # a group of this rank alone: DeepSpeed wants one even where a size is 1

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_model_parallel_world_size(self):
        return self.dims.tp

    def get_model_parallel_group(self):
        return self.dims.tp_group or self.self_group

    def get_data_parallel_rank(self):
        return self.dims.dp_rank

    def get_data_parallel_world_size(self):
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.dp_group or self.self_group

    # newer DeepSpeed releases ask with these names too
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


class DeepSpeedEngine(Engine):
    TAG = "deepspeed"
    loads_module_weights = True  # DeepSpeed's load_checkpoint restores the module itself

    def __init__(self, module: nn.Module, dims: ParallelDims, job: Job, device: torch.device):
        try:
            import deepspeed
        except ImportError:
            raise UserError("parallel.engine=deepspeed needs the deepspeed package: pip install deepspeed") from None
        self.module, self.dims, self.zero_stage = module, dims, job.cfg.parallel.zero_stage
        for p in module.parameters():
            if is_sharded(p):  # DeepSpeed's grad-norm counts these once per TP rank, others once
                p.model_parallel = p.tensor_model_parallel = True
        if dims.sequence_parallel:
            _reduce_sequence_parallel_grads_in_backward(module, dims)
        self._deepspeed = deepspeed
        # deepspeed.initialize asserts that LOCAL_RANK is set (torchrun sets it; one process or
        # srun without torchrun do not): the one variable bigtrain writes, at DeepSpeed's request.
        os.environ.setdefault("LOCAL_RANK", str(device.index or 0))
        optimizer = build_optimizer(module, job.cfg.optim)
        mpu = MPU(dims, dims.new_self_group() if dims.world_size > 1 else dist.group.WORLD)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(job, device), mpu=mpu,
            dist_init_required=False)
        # DeepSpeed's checkpoint engine loads with weights_only=False: a hostile file in a run
        # directory would run code on resume. Ours loads with weights_only=True (same file format).
        self.model.checkpoint_engine = deepspeed_checkpoint_engine(self.model._config)
        if self.zero_stage < 3:  # (ZeRO-3's model-states files hold partitions, not the weights)
            self.module_weights_file = f"{self.TAG}/mp_rank_{{tp_rank:02d}}_model_states.pt"

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed scales by 1 / accumulation steps and counts micro-steps itself: its step()
        # must follow every micro-batch's backward, and updates only at the accumulation
        # boundary. So here, before the boundary, it only counts; step() below is the update.
        self.model.backward(loss)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()

    def step(self) -> torch.Tensor | float | None:
        self.model.step()
        return self.model.get_global_grad_norm()  # read by the trainer at logging steps

    def each_full_parameter(self):
        """ZeRO-3 keeps 1/dp of each parameter between steps: gather them (read-only) for the
        rank file one at a time, so a checkpoint holds full tensors whatever the stage and a save
        holds one gathered parameter, not the model. Collective."""
        if self.zero_stage != 3:
            yield from self.module.named_parameters()
            return
        for name, p in self.module.named_parameters():
            with self._deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, p

    def save(self, directory: Path) -> None:
        # Collective; DeepSpeed writes its partitioned optimizer states per rank under directory/TAG.
        self.model.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        if not (directory / self.TAG).is_dir():
            raise UserError(f"checkpoint {str(directory)!r} has no DeepSpeed state; it was written by "
                            f"parallel.engine=ddp — resume it with that engine")
        # Every rank refuses a hostile or corrupt file alike before any rank starts the
        # collective load (a rank that raised inside it would leave its peers waiting).
        check_deepspeed_dir(directory / self.TAG)
        self.model.load_checkpoint(str(directory), tag=self.TAG, load_module_strict=True,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)


def _reduce_sequence_parallel_grads_in_backward(module: nn.Module, dims: ParallelDims) -> None:
    """DeepSpeed reduces and partitions gradients inside backward, so the TP all-reduce of the
    sequence-parallel norm weights cannot wait for the step: do it as each gradient arrives."""
    for p in module.parameters():
        if is_sequence_parallel(p):
            p.register_hook(lambda g: _all_reduced(g, dims.tp_group))


def _all_reduced(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def deepspeed_config(job: Job, device: torch.device) -> dict:
    """DeepSpeed's config for this job: ZeRO stage, batch arithmetic, clipping, bf16."""
    cfg = job.cfg
    zero = {"stage": cfg.parallel.zero_stage, "reduce_bucket_size": cfg.parallel.zero_bucket_size}
    if cfg.parallel.zero_stage < 3:
        zero["allgather_bucket_size"] = cfg.parallel.zero_bucket_size
    if cfg.parallel.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.parallel.zero3_persistence_threshold
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": job.accum,
        "train_batch_size": cfg.train.global_batch_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": job.bf16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        # keep our torch AdamW (with its weight-decay groups) even with optimizer offload
        "zero_force_ds_cpu_optimizer": False,
    }


def build_engine(module: nn.Module, dims: ParallelDims, job: Job, device: torch.device) -> Engine:
    cls = DeepSpeedEngine if job.cfg.parallel.engine == "deepspeed" else TorchEngine
    return cls(module, dims, job, device)
