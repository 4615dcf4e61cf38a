"""Optimizer and learning-rate schedule from a TrainConfig (no Ray here)."""

from __future__ import annotations

import warnings

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
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, done_steps: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-batch schedule over the whole run (`scheduler.step()` after every optimizer step).

    `done_steps` > 0 (a resumed run) starts the schedule there, as if this run of
    `cfg.epochs` epochs had been planned from the start: the optimizer's learning rates are
    reset to the configured peak and the schedule is replayed for `done_steps` steps. So a
    finished run resumed with more epochs follows the schedule of the new total (a one-cycle
    run that had annealed to ~0 warms back up to where the longer run would be).
    """
    if done_steps:
        # A loaded optimizer state holds the old schedule's current and initial rates.
        for group in optimizer.param_groups:
            group["lr"] = cfg.effective_lr
            group.pop("initial_lr", None)
    scheduler = _schedule(cfg, optimizer, steps_per_epoch)
    with warnings.catch_warnings():
        # Replaying without optimizer steps is intended here; torch warns about that order.
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)", category=UserWarning)
        for _ in range(done_steps):
            scheduler.step()
    return scheduler


def _schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
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
