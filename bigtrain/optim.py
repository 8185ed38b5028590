"""AdamW with weight-decay groups, and learning-rate schedules as pure functions of the step.

The schedule keeps no state: the learning rate of step k is `lr_at(k, ...)`, so resuming only needs
the step number, and a resumed run follows the same curve exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bigtrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear weights, embeddings) decay; vectors (norm weights, biases) do not."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # foreach is the fast path on both CPU and CUDA; fused is CUDA-only in older torch releases.
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.

    Linear warmup to cfg.lr over cfg.warmup_steps, then:
    - cosine: half-cosine from lr down to min_lr at the last step;
    - wsd (warmup-stable-decay): lr until the last decay_fraction of the run, then linear to min_lr;
    - constant: lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, total_steps - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps)) if cfg.decay_fraction > 0 else 0
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start or decay_steps == 0:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}")  # config validation rules this out


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
