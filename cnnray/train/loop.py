"""The per-worker training loop that Ray Train runs on every DDP rank.

Ray appears only at the seams, behind a session (`cnnray.train.session`): rank and world
size, the device, `prepare_model` (DDP: gloo on CPU, NCCL on GPU), the checkpoint to
resume from (after a failure or with --resume) and `report` (metrics every epoch; rank 0
attaches the checkpoint). Ray Train's entry point, `session.train_loop_per_worker`, runs it
under a `RaySession`; in local mode (`cfg.local_mode`: one process) the driver calls
`run_worker` with a `LocalSession`, which keeps the checkpoints in the same layout and
prints the progress lines, without importing Ray.

`run_worker` reads as the steps of a run: data, model, optimiser, resume, then per epoch
train (epoch.py), agree across ranks (collectives.py), record and checkpoint.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnray.checkpoint import load_train_state, load_weights, save_checkpoint
from cnnray.config import TrainConfig
from cnnray.train.collectives import all_reduce_stats, divergence, validate
from cnnray.train.device import configure_torch, native_bf16, use_channels_last
from cnnray.train.epoch import EpochStats, evaluate_weights, train_epoch
from cnnray.train.optim import Lookahead
from cnnray.train.worker_data import WorkerData


@dataclass
class Progress:
    """Where the run stands: restored from the checkpoint on resume, advanced every epoch."""

    start_epoch: int = 0
    best_val: float = -1.0  # below any accuracy: the first epoch is always the best so far
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # A CPU copy of the weights of best_epoch when this attempt reached it before its last
    # epoch, for the test at the end (that epoch's checkpoint holds them, but on the storage).
    best_weights: dict[str, torch.Tensor] | None = None


@dataclass
class Training:
    """What one rank trains with: the module, its (DDP) wrapper and the optimisation."""

    net: nn.Module  # the module itself (evaluation, checkpoints)
    model: nn.Module  # what the training step calls: DDP's wrapper on workers, compiled on request
    model_args: dict[str, Any]
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scheduler: Any = None
    lookahead: Lookahead | None = None


def run_worker(cfg: TrainConfig, session: Any, dataset: Any = None, stream_info: Any = None,
               tracking: dict[str, Any] | None = None) -> str | None:
    """The loop of one rank under `session` (a `cnnray.train.session` LocalSession or
    RaySession); `dataset` is the loaded `cnnray.data.Dataset` when the caller has it
    already (local mode: the driver's pre-flight loaded it), else it is loaded here;
    `stream_info` the driver's scan of a ray-data run (`worker_data.StreamInfo`);
    `tracking` the MLflow run rank 0 logs each epoch to (cnnray.tracking.train), or None.
    Returns None, or when training diverged the one line saying where (every rank stops
    in the same epoch; rank 0's value reaches the driver as the Result's `return_value`)."""
    from cnnray.tracking.train import WorkerTracker
    from cnnray.train.allocator import keep_freed_memory
    from cnnray.train.worker_data import prepare_worker_data

    keep_freed_memory()  # every step's activations from reused memory, not fresh pages
    tracker = WorkerTracker(tracking, session.rank)  # rank 0 only: one MLflow run whatever the workers
    if cfg.elastic:  # this attempt's size: the same global batch, split over `world` ranks
        cfg = cfg.replace(workers=session.world_size)
    device = session.device()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts anyway)
    configure_torch(device, cfg.cpus_per_worker)
    data = prepare_worker_data(cfg, session.rank, session.world_size, device, ds=dataset, info=stream_info,
                               shards=session.dataset_shard)
    run = build_training(cfg, data, session, device)
    exporter = session.metrics_exporter()  # None in local mode
    progress = resume(cfg, session, run, device)
    add_schedule(cfg, run, steps_per_epoch=len(data.train), done_epochs=progress.start_epoch)
    for epoch in range(progress.start_epoch, cfg.epochs):
        diverged = run_epoch(cfg, session, run, data, progress, epoch, device, exporter)
        if diverged:  # every rank stops here, and these weights are never checkpointed
            return diverged
        tracker.log_epoch(progress.history[-1])  # the epoch's metrics (step = epoch)
    return None


def build_training(cfg: TrainConfig, data: WorkerData, session: Any, device: torch.device) -> Training:
    """The model for this data (whitened, in its memory layout, wrapped by the session),
    its optimiser and loss."""
    from cnnray.models import build_model, resolve_model_args
    from cnnray.train.optim import build_optimizer

    model_args = resolve_model_args(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.input_shape[0],
        image_size=list(data.input_shape[1:]),
        norm=cfg.norm,
        hidden_sizes=list(cfg.hidden_sizes) if cfg.hidden_sizes else None,
    )
    net = build_model(cfg.model, **model_args)
    if cfg.whiten_samples:
        # Every rank whitens with its own shard's first images; DDP's constructor (in
        # prepare_model) then gives every rank rank 0's weights. A resumed run's
        # checkpoint overwrites them below.
        net.init_whitening(data.train.first_images(cfg.whiten_samples).cpu())
    if use_channels_last(cfg.channels_last, device):
        net = net.to(memory_format=torch.channels_last)
    model = session.wrap_model(net, device)  # DDP on Ray Train workers
    if cfg.compile and device.type == "cuda":
        model = torch.compile(model)
    optimizer = build_optimizer(cfg, net, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return Training(net, model, model_args, optimizer, criterion)


def resume(cfg: TrainConfig, session: Any, run: Training, device: torch.device) -> Progress:
    """The weights, optimiser state and progress of the checkpoint the session resumes
    from (after a failure, or --resume); a fresh Progress when there is none."""
    state = None
    with session.resume_dir() as ckpt_dir:  # Ray's is only readable inside the block
        if ckpt_dir is not None:
            run.net.load_state_dict(load_weights(ckpt_dir, map_location=device))
            state = load_train_state(ckpt_dir, map_location=device)
    if state is None:
        return Progress()
    from cnnray.train.optim import load_optimizer_state

    load_optimizer_state(run.optimizer, state["optimizer"])  # the config's lr/momentum/decay stay
    progress = Progress(start_epoch=int(state["epoch"]), best_val=float(state["best_val_accuracy"]),
                        best_epoch=int(state.get("best_epoch", 0)), history=list(state.get("history", [])))
    if session.rank == 0 and cfg.verbose:
        print(f"[cnnray] resumed from the checkpoint of epoch {progress.start_epoch}", flush=True)
    return progress


def add_schedule(cfg: TrainConfig, run: Training, steps_per_epoch: int, done_epochs: int) -> None:
    """The schedule of this run's epochs, at the step the checkpoint reached: the same rates
    as the saved scheduler when --epochs is unchanged, the new total's when it grew."""
    from cnnray.train.optim import build_scheduler

    done = done_epochs * steps_per_epoch
    run.scheduler = build_scheduler(cfg, run.optimizer, steps_per_epoch, done_steps=done)
    if cfg.lookahead_every:
        run.lookahead = Lookahead(run.net, every=cfg.lookahead_every, decay=cfg.lookahead_decay,
                                  total_steps=cfg.epochs * steps_per_epoch, done_steps=done)


def run_epoch(cfg: TrainConfig, session: Any, run: Training, data: WorkerData, progress: Progress,
              epoch: int, device: torch.device, exporter: Any) -> str | None:
    """Epoch `epoch` (0-based) of every rank: train, agree, validate, report (with rank 0's
    checkpoint). Returns the divergence line, or None."""
    net, last = run.net, epoch + 1 == cfg.epochs
    data.train.set_epoch(epoch)
    # The whitening stem's bias trains for the first whiten_bias_epochs epochs only.
    frozen = [net.whiten.bias] if cfg.whiten_bias_epochs is not None and epoch >= cfg.whiten_bias_epochs else []
    local = train_epoch(run.model, data.train, run.optimizer, run.scheduler, run.criterion, device, cfg.amp,
                        frozen=frozen, lookahead=run.lookahead)
    if run.lookahead is not None:
        run.lookahead.sync()  # validate and checkpoint the averaged weights
    train = all_reduce_stats(local, device)
    diverged = divergence(epoch + 1, local, net, device)
    val = None if diverged else validate(net, data.val, device, cfg.tta)
    if val is not None and not math.isfinite(val.loss):  # all-reduced: the same on every rank
        diverged = f"training diverged in epoch {epoch + 1}: the validation loss became non-finite; lower --lr"
    if diverged:
        return diverged
    if exporter is not None:
        exporter.record(epoch + 1, local, val.accuracy)
    # Strictly better only: on ties the earlier epoch stays best (val stats are
    # all-reduced, so every rank takes the same decision).
    if val.accuracy > progress.best_val:
        progress.best_val, progress.best_epoch = val.accuracy, epoch + 1
        if data.test is not None and not last:
            progress.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    metrics = epoch_metrics(cfg, run, progress, epoch, train, val, session.world_size, device)
    if last and data.test is not None and (progress.best_epoch == epoch + 1 or progress.best_weights is not None):
        # Neither only after a resume past the best epoch: the driver then tests its checkpoint.
        weights = None if progress.best_epoch == epoch + 1 else progress.best_weights
        test = all_reduce_stats(evaluate_weights(net, weights, data.test, device, cfg.tta), device)
        metrics.update(test_accuracy=test.accuracy, test_loss=test.loss, test_samples=test.count,
                       test_epoch=progress.best_epoch)
    # The history also keeps the rate of every step (the report draws the schedule from it).
    progress.history.append({**metrics, "step_lrs": list(local.step_lrs)})
    report(cfg, session, run, data, progress, metrics, epoch)
    return None


def epoch_metrics(cfg: TrainConfig, run: Training, progress: Progress, epoch: int, train: EpochStats,
                  val: EpochStats, world: int, device: torch.device) -> dict[str, Any]:
    """What every rank reports for the epoch (the progress line, Tune, the history)."""
    return {
        "epoch": epoch + 1,
        "train_loss": train.loss,
        "train_accuracy": train.accuracy,
        "val_loss": val.loss,
        "val_accuracy": val.accuracy,
        "best_val_accuracy": progress.best_val,
        "best_epoch": progress.best_epoch,
        "samples_per_second": train.count / max(train.seconds, 1e-9),
        "epoch_seconds": train.seconds,
        "lr": run.optimizer.param_groups[0]["lr"],
        "start_epoch": progress.start_epoch,  # > 0 proves this attempt resumed from a checkpoint
        "world_size": world,
        "bf16": bool(cfg.amp and native_bf16(device)),  # training precision actually used
        "channels_last": use_channels_last(cfg.channels_last, device),
    }


def report(cfg: TrainConfig, session: Any, run: Training, data: WorkerData, progress: Progress,
           metrics: dict[str, Any], epoch: int) -> None:
    """Every rank reports (report is a barrier); only rank 0 writes the checkpoint."""
    if session.rank != 0:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="cnnray-ckpt-") as tmp:
        save_checkpoint(
            tmp,
            model_name=cfg.model,
            model_args=run.model_args,
            state_dict=run.net.state_dict(),
            data_info=data.info,
            epoch=epoch + 1,
            config=cfg.to_dict(),
            metrics=metrics,
            train_state={
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "epoch": epoch + 1,
                "best_val_accuracy": progress.best_val,
                "best_epoch": progress.best_epoch,
                "history": progress.history,
            },
            history=progress.history,
            tta=cfg.tta,
        )
        session.report(metrics, tmp, f"epoch-{epoch + 1:04d}")
