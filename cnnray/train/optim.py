"""Optimizer and learning-rate schedule from a TrainConfig (no Ray here)."""

from __future__ import annotations

import torch
from torch import nn

from cnnray.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weights of conv/linear layers only: decaying biases and norm gains only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # Fused kernels update all parameters in one launch: a large win on GPU, absent on CPU.
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.effective_lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **fused
        )
    return torch.optim.AdamW(groups, lr=cfg.effective_lr, betas=(cfg.momentum, 0.999), **fused)


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-batch schedule over the whole run (`scheduler.step()` after every optimizer step)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if cfg.schedule == "onecycle":
        # Smith's one-cycle: warm up for 25% of the run, then anneal to ~0. Momentum
        # cycling is off so that `momentum` means the same thing under every schedule.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.effective_lr, total_steps=total, pct_start=0.25, cycle_momentum=False
        )
    if cfg.schedule == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    else:
        main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
