"""Data-parallel engines: what turns a micro-batch loss into an optimizer step.

Both engines expose the same small surface so the trainer does not care which one runs:

    engine.model(x)              forward (DDP / DeepSpeed wrapper or the plain module)
    engine.accumulate(last)      context for one micro-batch; gradients sync only when last
    engine.set_lr(lr)            learning rate of the coming step
    engine.backward(loss)        backward of loss / accumulation steps
    engine.step() -> norm        sequence-parallel grad sync, clipping, optimizer step, zero grads
    engine.save(dir) / load(dir) engine-specific state inside a checkpoint directory
    engine.full_parameters()     context in which module parameters hold their full values
                                 (ZeRO-3 partitions them between steps)
    engine.loads_module_weights  True when load(dir) restores the module's weights itself

`TorchEngine` is torch DDP over the data-parallel group (or no wrapper when dp == 1) with a
torch AdamW; `DeepSpeedEngine` hands the module to `deepspeed.initialize` with ZeRO stage 1-3.
DeepSpeed is imported only when asked for: the GPU benchmark machine does not have it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bigtrain import checkpoint as ckpt
from bigtrain.config import Config
from bigtrain.errors import UserError
from bigtrain.optim import build_optimizer, set_lr
from bigtrain.parallel.dims import ParallelDims
from bigtrain.parallel.layers import is_sharded
from bigtrain.parallel.parallelize import clip_grad_norm, sync_sequence_parallel_grads
from bigtrain.safe_load import check_deepspeed_dir, deepspeed_checkpoint_engine


class TorchEngine:
    def __init__(self, module: nn.Module, dims: ParallelDims, cfg: Config, accum_steps: int, device: torch.device):
        self.module, self.dims, self.cfg, self.accum_steps = module, dims, cfg, accum_steps
        self.model = module
        if dims.dp > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Each DP group all-reduces only its own parameter shards; TP peers hold different
            # shards and never share a DDP group (see ParallelDims' rank layout).
            # gradient_as_bucket_view: gradients live inside DDP's all-reduce buckets instead of
            # beside a second, bucket-sized copy (saves 4 bytes per parameter).
            self.model = DDP(module, process_group=dims.dp_group, gradient_as_bucket_view=True,
                             device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = build_optimizer(module, cfg.optim)

    def accumulate(self, last: bool):
        """DDP all-reduces gradients only on the last micro-batch of an accumulation."""
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def step(self) -> float:
        sync_sequence_parallel_grads(self.module, self.dims)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = clip_grad_norm(self.module, clip, self.dims)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict:
        return {"optim": ckpt.optimizer_state_by_name(self.optimizer, self.module)}

    def load_state_dict(self, state: dict) -> None:
        ckpt.load_optimizer_state_by_name(self.optimizer, self.module, state["optim"])

    loads_module_weights = False

    def full_parameters(self):
        return contextlib.nullcontext()

    def save(self, directory: Path) -> None:
        """Nothing beyond the rank file: model and optimizer shards travel in state_dict()."""

    def load(self, directory: Path) -> None:
        pass


class MPU:
    """The model-parallel-unit interface DeepSpeed asks for, answered from ParallelDims, so ZeRO
    partitions over the data-parallel group and counts tensor-parallel shards correctly."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_rank(self):
        return self.dims.tp_rank

    def get_model_parallel_world_size(self):
        return self.dims.tp

    def get_model_parallel_group(self):
        return self.dims.tp_group or _self_group(self.dims)

    def get_data_parallel_rank(self):
        return self.dims.dp_rank

    def get_data_parallel_world_size(self):
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.dp_group or _self_group(self.dims)

    # newer DeepSpeed releases ask with these names too
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


def _self_group(dims: ParallelDims):
    """A group of this rank alone (DeepSpeed wants a group even where the size is 1)."""
    if not hasattr(dims, "_self_group"):
        groups = [dist.new_group([r]) for r in range(dims.world_size)]  # collective: all ranks create all
        dims._self_group = groups[dims.rank]
    return dims._self_group


class DeepSpeedEngine:
    TAG = "deepspeed"
    ZERO3_EXTRA: dict = {}
    """Extra ZeRO-3 settings merged into zero_optimization (e.g. {"stage3_param_persistence_threshold": 0},
    which the tests use so that even tiny parameters are partitioned)."""
    loads_module_weights = True  # DeepSpeed's load_checkpoint restores the module itself

    def __init__(self, module: nn.Module, dims: ParallelDims, cfg: Config, accum_steps: int, device: torch.device):
        try:
            import deepspeed
        except ImportError:
            raise UserError("parallel.engine=deepspeed needs the deepspeed package: pip install deepspeed") from None
        self.module, self.dims, self.cfg = module, dims, cfg
        for p in module.parameters():
            if is_sharded(p):  # DeepSpeed's grad-norm counts these once per TP rank, others once
                p.model_parallel = p.tensor_model_parallel = True
        if dims.sequence_parallel:
            _reduce_sequence_parallel_grads_in_backward(module, dims)
        bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
        zero = {"stage": cfg.parallel.zero_stage, **(self.ZERO3_EXTRA if cfg.parallel.zero_stage == 3 else {})}
        self._deepspeed = deepspeed
        if cfg.parallel.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": accum_steps,
            "train_batch_size": cfg.train.global_batch_size,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
            # keep our torch AdamW (with its weight-decay groups) even with optimizer offload
            "zero_force_ds_cpu_optimizer": False,
        }
        optimizer = build_optimizer(module, cfg.optim)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_config, mpu=MPU(dims), dist_init_required=False)
        # DeepSpeed's checkpoint engine loads with weights_only=False: a hostile file in a run
        # directory would run code on resume. Ours loads with weights_only=True (same file format).
        self.model.checkpoint_engine = deepspeed_checkpoint_engine(self.model._config)

    def accumulate(self, last: bool):
        return contextlib.nullcontext()  # the engine knows its accumulation boundary itself

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed counts micro-steps itself: backward (scaled by 1 / accumulation steps) and
        # step() after every micro-batch; step() only updates at the accumulation boundary.
        self.model.backward(loss)
        self.model.step()

    def step(self) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def full_parameters(self):
        """ZeRO-3 keeps 1/dp of each parameter between steps: gather them (read-only) for the
        rank file, so a checkpoint holds full tensors whatever the stage. Collective."""
        if self.cfg.parallel.zero_stage != 3:
            return contextlib.nullcontext()
        return self._deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

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
        if getattr(p, "sequence_parallel", False):
            p.register_hook(lambda g: _all_reduced(g, dims.tp_group))


def _all_reduced(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def build_engine(module: nn.Module, dims: ParallelDims, cfg: Config, accum_steps: int, device: torch.device):
    cls = DeepSpeedEngine if cfg.parallel.engine == "deepspeed" else TorchEngine
    return cls(module, dims, cfg, accum_steps, device)
