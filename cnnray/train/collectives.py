"""What the DDP ranks agree on after each epoch: summed statistics, rank 0's buffers, and
whether training diverged. Every rank calls each of these, in the same order, whatever its
data (a no-op in one process)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from cnnray.train.epoch import EpochStats, evaluate


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sync_buffers(net: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does before
    each training forward. Called by every rank, whatever its data, so that evaluation
    itself runs the plain module and enters no collective: a rank with fewer (or no)
    evaluation batches then cannot leave another waiting in a broadcast."""
    import torch.distributed as dist

    if not _distributed():
        return
    for buf in net.buffers():
        dist.broadcast(buf, src=0)


def validate(
    net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, tta: str = "none"
) -> EpochStats:
    """Validation statistics over all ranks: `net` must be the module itself, not its DDP
    wrapper (whose forward is a collective). Every rank enters the same collectives in the
    same order even when its shard holds no batch at all."""
    sync_buffers(net)
    return all_reduce_stats(evaluate(net, batches, device, tta), device)


def divergence(epoch: int, train: EpochStats, net: nn.Module, device: torch.device) -> str | None:
    """None while training is sound; else one line saying where it diverged, the same on
    every rank. `train` is this rank's own epoch (its first non-finite step); every rank
    must call this (one all-reduce), since one rank's NaN loss is every rank's NaN weights."""
    import torch.distributed as dist

    steps = len(train.step_lrs)
    # The first non-finite step over all ranks (`steps` if none), and whether any rank's
    # weights hold a NaN or infinity: as the maximum of the negated step and the flag.
    weights_bad = ~torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all()
    first = train.nonfinite_step if train.nonfinite_step >= 0 else steps
    flags = torch.stack([torch.tensor(-first, device=device), weights_bad.to(device, torch.int64)])
    if _distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad_step, bad_weights = -int(flags[0]), bool(flags[1])
    where = f"training diverged in epoch {epoch}"
    advice = "nothing from this epoch was kept; lower --lr (now up to {:.4g}) or raise --warmup-epochs"
    if bad_step < steps:
        return (f"{where}: the training loss became non-finite at step {bad_step + 1} of {steps}, "
                f"learning rate {train.step_lrs[bad_step]:.4g}; " + advice.format(max(train.step_lrs)))
    if bad_weights:
        return f"{where}: the weights became non-finite; " + advice.format(max(train.step_lrs, default=0.0))
    return None


def all_reduce_stats(stats: EpochStats, device: torch.device) -> EpochStats:
    """Sum counts over ranks; the epoch takes as long as its slowest rank."""
    import torch.distributed as dist

    if not _distributed():
        return stats
    sums = torch.tensor([stats.loss_sum, float(stats.correct), float(stats.count)], device=device, dtype=torch.float64)
    dist.all_reduce(sums)
    slowest = torch.tensor([stats.seconds], device=device, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return EpochStats(sums[0].item(), int(sums[1].item()), int(sums[2].item()), slowest.item(),
                      stats.nonfinite_step, stats.step_lrs)
