"""Optimizer and learning-rate schedule from a TrainConfig (no Ray here)."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from cnnray.config import TrainConfig


# Layers whose parameters norm_lr_scale scales: the norms' shifts (and scales, if trained).
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_lr_scale: float | None = None) -> list[dict]:
    """Decay weights of conv/linear layers only: decaying biases and norm gains only hurts.

    With `norm_lr_scale` (airbench94's "bias scaler", Jordan 2024) the norm layers'
    parameters form a third group with that multiple of the learning rate and weight
    decay weight_decay / norm_lr_scale, so that they decay by the same fraction per step
    as the weights (SGD's decay step is lr * wd * p). Each group's "lr_scale" is its
    multiple of the configured learning rate.
    """
    in_norms = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, no_decay, norms = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if norm_lr_scale is not None and id(p) in in_norms:
            norms.append(p)
        else:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if norm_lr_scale is not None:
        groups.append({"params": norms, "weight_decay": weight_decay / norm_lr_scale, "lr_scale": norm_lr_scale})
    return groups


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.norm_lr_scale)
    for group in groups:
        group["lr"] = cfg.effective_lr * group["lr_scale"]
    # Fused kernels update all parameters in one launch: a large win on GPU, absent on CPU.
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.effective_lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **fused
        )
    return torch.optim.AdamW(groups, lr=cfg.effective_lr, betas=(cfg.momentum, 0.999), **fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's optimizer state (moment buffers, step counts) but keep the
    hyperparameters `optimizer` was built with from the config (momentum or AdamW's betas,
    nesterov, weight decay, lr): torch's load_state_dict would restore the saved ones, so a
    run resumed with a new momentum (a PBT exploit, or --resume --momentum) would silently
    keep the old. The lr is then set by build_scheduler(done_steps=...)."""
    wanted = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, keep in zip(optimizer.param_groups, wanted):
        group.update(keep)


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
            group["lr"] = cfg.effective_lr * group.get("lr_scale", 1.0)
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
        peaks = [cfg.effective_lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=total, pct_start=0.25, cycle_momentum=False
        )
    if cfg.schedule == "triangle":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(triangle, total=total))
    if cfg.schedule == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    else:
        main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


# airbench94's schedule (Jordan 2024): linear from 0.2x the peak to the peak at 23% of the
# steps, then linear down to 0.07x at the end. Fractions of the configured learning rate.
TRIANGLE_START, TRIANGLE_PEAK_AT, TRIANGLE_END = 0.2, 0.23, 0.07


def triangle(step: int, total: int) -> float:
    """Multiple of the peak learning rate at `step` of `total` (the "triangle" schedule)."""
    peak = max(1, int(TRIANGLE_PEAK_AT * total))
    if step < peak:
        return TRIANGLE_START + (1.0 - TRIANGLE_START) * step / peak
    return 1.0 + (TRIANGLE_END - 1.0) * min(1.0, (step - peak) / max(1, total - peak))


class Lookahead:
    """Lookahead of the weights as airbench94 uses it (Zhang et al. 2019, "Lookahead
    Optimizer: k steps forward, 1 step back"; Jordan 2024, section 3.5).

    A slow copy of every floating-point tensor of `net.state_dict()` (weights and norm
    running statistics). `step()` after every optimizer step; every `every` steps `sync()`
    moves the slow copy towards the current weights, slow = rho * slow + (1 - rho) * net,
    and writes it back into the net. rho = decay**every * (t / total)**3: near 0 early
    (the weights move fast and averaging would only hold them back), decay**every at the
    end (strong averaging while the learning rate anneals). The training loop also syncs
    at each epoch's end, so the net then holds the averaged weights.
    """

    def __init__(self, net: nn.Module, *, every: int, decay: float, total_steps: int, done_steps: int = 0) -> None:
        if every < 1 or not 0 <= decay < 1 or total_steps < 1:
            raise ValueError(f"Lookahead needs every >= 1, 0 <= decay < 1, total_steps >= 1; got {every}, {decay}, {total_steps}")
        self.every, self.decay, self.total = every, decay, total_steps
        self.steps = done_steps
        # state_dict() tensors share storage with the net: copy_ into them updates it.
        self._fast = [t for t in net.state_dict().values() if t.is_floating_point()]
        self._slow = [t.detach().clone() for t in self._fast]

    def rho(self) -> float:
        """The slow copy's weight at the current step."""
        return self.decay**self.every * min(1.0, self.steps / self.total) ** 3

    @torch.no_grad()
    def sync(self) -> None:
        weight = 1.0 - self.rho()
        for slow, fast in zip(self._slow, self._fast):
            slow.lerp_(fast.to(slow.dtype), weight)
            fast.copy_(slow)

    def step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.sync()
