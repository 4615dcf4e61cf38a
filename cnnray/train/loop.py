"""The per-worker training loop that Ray Train runs on every DDP rank.

Ray appears only at the seams, behind a session (`cnnray.train.session`): rank and world
size, the device, `prepare_model` (DDP: gloo on CPU, NCCL on GPU), the checkpoint to
resume from (after a failure or with --resume) and `report` (metrics every epoch; rank 0
attaches the checkpoint). `train_loop_per_worker` is Ray Train's entry point
(`RaySession`); in local mode (`cfg.local_mode`: one process) the driver calls
`run_worker` with a `LocalSession`, which keeps the checkpoints in the same layout and
prints the progress lines, without importing Ray.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from cnnray.checkpoint import load_train_state, load_weights, save_checkpoint
from cnnray.config import TrainConfig
from cnnray.models.tta import inference_layout, tta_logits
from cnnray.train.optim import Lookahead


@dataclass
class EpochStats:
    loss_sum: float  # sum of per-sample losses
    correct: int
    count: int
    seconds: float = 0.0
    # Training only: the first step (0-based) whose loss was NaN or infinite, -1 if none,
    # and the learning rate every step used (to name the one at which training diverged).
    nonfinite_step: int = -1
    step_lrs: tuple[float, ...] = ()

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls/convs run natively: CUDA GPUs with bf16, and CPUs with
    AVX512-BF16 or AMX (there bf16 + channels-last trains the lecture CNN ~2.7x faster
    per core than fp32). Elsewhere bf16 is emulated and slower, so it stays off."""
    return _native_bf16(str(device))


@functools.cache  # the hardware does not change: probe once, not on every training batch
def _native_bf16(device_name: str) -> bool:
    device = torch.device(device_name)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # torch.cpu exposes these probes only as private helpers; absent means "no".
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def use_channels_last(enabled: bool, device: torch.device) -> bool:
    """NHWC pays off with cuDNN and with oneDNN's bf16 kernels; plain fp32 CPU gains little."""
    return enabled and (device.type == "cuda" or native_bf16(device))


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for the training step where the hardware runs bf16 natively (no loss
    scaling needed: bf16 has fp32's exponent range); a no-op elsewhere."""
    if enabled and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    device: torch.device,
    amp: bool,
    *,
    frozen: Sequence[nn.Parameter] = (),
    lookahead: Lookahead | None = None,
) -> EpochStats:
    """One epoch of training. `frozen` parameters get no update this epoch (their gradient
    is dropped after DDP's all-reduce, so every rank agrees); `lookahead` steps after
    every optimizer step (see cnnray.train.optim.Lookahead)."""
    model.train()
    # A step keeps only references (its detached loss, predicted and true labels) and runs
    # one small op for them (argmax): the sums, the count and the first non-finite step
    # are computed once at the end, with one host sync per epoch. Nine tiny ops a step
    # (running sums, a where for the first NaN) cost 0.17 ms of a 7.7 ms MNIST step on
    # 2 CPU cores, and nine kernel launches a step on a GPU.
    losses: list[torch.Tensor] = []
    predictions: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    lrs = []
    start = time.perf_counter()
    for x, y in batches:
        with autocast_for(device, amp):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in frozen:
            p.grad = None  # SGD skips a parameter without a gradient: no step, no decay
        lrs.append(optimizer.param_groups[0]["lr"])  # the rate this step uses
        optimizer.step()
        scheduler.step()
        if lookahead is not None:
            lookahead.step()
        losses.append(loss.detach())
        predictions.append(logits.detach().argmax(1))
        targets.append(y)
    stats = _epoch_sums(losses, predictions, targets, device)
    stats.step_lrs = tuple(lrs)
    stats.seconds = time.perf_counter() - start  # after the sync: GPU work has finished
    return stats


def _epoch_sums(losses: Sequence[torch.Tensor], predictions: Sequence[torch.Tensor],
                targets: Sequence[torch.Tensor], device: torch.device) -> EpochStats:
    """EpochStats of an epoch's steps: step i's mean loss `losses[i]` (a scalar), its
    predicted and true labels (B_i each). The loss sum weights each step by its batch size
    B_i; nonfinite_step is the first step whose loss is NaN or infinite (-1 if none)."""
    if not losses:  # a shard with no full batch: nothing trained
        return EpochStats(0.0, 0, 0)
    sizes = [len(t) for t in targets]
    step_losses = torch.stack(losses).double()
    steps = torch.arange(len(losses), device=device, dtype=torch.float64)
    summary = torch.stack([
        (step_losses * torch.tensor(sizes, dtype=torch.float64).to(device)).sum(),
        (torch.cat(predictions) == torch.cat(targets)).sum().double(),  # exact below 2**53
        torch.where(torch.isfinite(step_losses), len(losses), steps).min(),
    ]).tolist()  # the epoch's one host sync
    first_bad = int(summary[2])
    return EpochStats(summary[0], int(summary[1]), sum(sizes),
                      nonfinite_step=-1 if first_bad == len(losses) else first_bad)


@torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad); same kernels
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    tta: str = "none",
) -> EpochStats:
    """Loss and accuracy in fp32, whatever the training precision: validation, the test
    report and a served prediction of the same image then agree exactly (all three
    average the same test-time augmentation views, `tta`: cnnray.models.tta)."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for x, y in batches:
        logits = tta_logits(model, x, tta)
        loss_sum += criterion(logits, y).double()
        correct += (logits.argmax(1) == y).sum()
        count += y.numel()
    return EpochStats(loss_sum.item(), int(correct.item()), count)


def evaluate_weights(
    net: nn.Module,
    weights: dict[str, torch.Tensor] | None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    tta: str = "none",
) -> EpochStats:
    """`evaluate` on a copy of `net` holding `weights` (None: net's own), in the layout
    Serve and the report give a rebuilt checkpoint (inference_layout), so all three give
    the same numbers."""
    model = inference_layout(copy.deepcopy(net), device)
    if weights is not None:
        model.load_state_dict(weights)
    return evaluate(model, batches, device, tta)


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


def format_progress(metrics: dict[str, Any], epochs: int) -> str:
    return (
        f"[cnnray] epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  "
        f"train_acc {metrics['train_accuracy']:.4f}  val_acc {metrics['val_accuracy']:.4f}  "
        f"{metrics['samples_per_second']:,.0f} samples/s  {metrics['epoch_seconds']:.1f}s"
    )


def train_loop_per_worker(config: dict[str, Any]) -> str | None:
    """Entry point of every Ray Train worker: `config` is `worker_data.loop_config`'s.

    Returns None, or when training diverged the one line saying where (every rank stops
    in the same epoch; rank 0's value reaches the driver as the Result's `return_value`).
    A divergence is returned, not raised: Ray Train would retry an error from the last
    checkpoint, and the same run would diverge again."""
    from cnnray.tracking.train import split_tracking
    from cnnray.train.session import RaySession
    from cnnray.train.worker_data import from_loop_config

    config, tracking = split_tracking(config)  # the MLflow run rank 0 logs to, or None
    cfg, stream_info = from_loop_config(config)  # stream_info: the driver's scan (ray-data)
    return run_worker(cfg, RaySession(), stream_info=stream_info, tracking=tracking)


def run_worker(cfg: TrainConfig, session: Any, dataset: Any = None, stream_info: Any = None,
               tracking: dict[str, Any] | None = None) -> str | None:
    """The loop of one rank under `session` (a `cnnray.train.session` LocalSession or
    RaySession); `dataset` is the loaded `cnnray.data.Dataset` when the caller has it
    already (local mode: the driver's pre-flight loaded it), else it is loaded here;
    `stream_info` the driver's scan of a ray-data run (`worker_data.StreamInfo`);
    `tracking` the MLflow run rank 0 logs each epoch to (cnnray.tracking.train), or None.
    Returns what train_loop_per_worker returns."""
    from cnnray.models import build_model, resolve_model_args
    from cnnray.train.allocator import keep_freed_memory
    from cnnray.train.optim import build_optimizer, build_scheduler
    from cnnray.train.worker_data import prepare_worker_data

    keep_freed_memory()  # every step's activations from reused memory, not fresh pages
    rank, world = session.rank, session.world_size
    from cnnray.tracking.train import WorkerTracker

    tracker = WorkerTracker(tracking, rank)  # rank 0 only: one MLflow run whatever the workers
    if cfg.elastic:  # this attempt's size: the same global batch, split over `world` ranks
        cfg = cfg.replace(workers=world)
    device = session.device()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts anyway)
    if device.type == "cpu":
        # One intra-op thread per reserved CPU: more threads than cores only thrash.
        torch.set_num_threads(cfg.cpus_per_worker or 1)
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick kernels
    data = prepare_worker_data(cfg, rank, world, device, ds=dataset, info=stream_info, shards=session.dataset_shard)

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

    exporter = session.metrics_exporter()  # None in local mode
    # best_val starts below any accuracy: the first epoch is always the best so far.
    start_epoch, best_val, best_epoch, history = 0, -1.0, 0, []
    state = None
    with session.resume_dir() as ckpt_dir:  # Ray's is only readable inside the block
        if ckpt_dir is not None:
            net.load_state_dict(load_weights(ckpt_dir, map_location=device))
            state = load_train_state(ckpt_dir, map_location=device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_val = int(state["epoch"]), float(state["best_val_accuracy"])
        best_epoch = int(state.get("best_epoch", 0))
        history = list(state.get("history", []))
        if rank == 0 and cfg.verbose:
            print(f"[cnnray] resumed from the checkpoint of epoch {start_epoch}", flush=True)
    # The schedule of this run's epochs, at the step the checkpoint reached: the same rates
    # as the saved scheduler when --epochs is unchanged, the new total's when it grew.
    scheduler = build_scheduler(cfg, optimizer, len(data.train), done_steps=start_epoch * len(data.train))
    lookahead = None
    if cfg.lookahead_every:
        lookahead = Lookahead(net, every=cfg.lookahead_every, decay=cfg.lookahead_decay,
                              total_steps=cfg.epochs * len(data.train), done_steps=start_epoch * len(data.train))

    # A CPU copy of the weights of best_epoch when this attempt reached it before its last
    # epoch, for the test at the end (that epoch's checkpoint holds them, but on the storage).
    best_weights = None
    for epoch in range(start_epoch, cfg.epochs):
        last = epoch + 1 == cfg.epochs
        data.train.set_epoch(epoch)
        # The whitening stem's bias trains for the first whiten_bias_epochs epochs only.
        frozen = [net.whiten.bias] if cfg.whiten_bias_epochs is not None and epoch >= cfg.whiten_bias_epochs else []
        local = train_epoch(model, data.train, optimizer, scheduler, criterion, device, cfg.amp,
                            frozen=frozen, lookahead=lookahead)
        if lookahead is not None:
            lookahead.sync()  # validate and checkpoint the averaged weights
        train = all_reduce_stats(local, device)
        diverged = divergence(epoch + 1, local, net, device)
        val = None if diverged else validate(net, data.val, device, cfg.tta)
        if val is not None and not math.isfinite(val.loss):  # all-reduced: the same on every rank
            diverged = f"training diverged in epoch {epoch + 1}: the validation loss became non-finite; lower --lr"
        if diverged:  # every rank stops here, and these weights are never checkpointed
            return diverged
        if exporter is not None:
            exporter.record(epoch + 1, local, val.accuracy)
        # Strictly better only: on ties the earlier epoch stays best (val stats are
        # all-reduced, so every rank takes the same decision).
        if val.accuracy > best_val:
            best_val, best_epoch = val.accuracy, epoch + 1
            if data.test is not None and not last:
                best_weights = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train.loss,
            "train_accuracy": train.accuracy,
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "best_val_accuracy": best_val,
            "best_epoch": best_epoch,
            "samples_per_second": train.count / max(train.seconds, 1e-9),
            "epoch_seconds": train.seconds,
            "lr": optimizer.param_groups[0]["lr"],
            "start_epoch": start_epoch,  # > 0 proves this attempt resumed from a checkpoint
            "world_size": world,
            "bf16": bool(cfg.amp and native_bf16(device)),  # training precision actually used
            "channels_last": use_channels_last(cfg.channels_last, device),
        }
        if last and data.test is not None and (best_epoch == epoch + 1 or best_weights is not None):
            # Neither only after a resume past the best epoch: the driver then tests its checkpoint.
            weights = None if best_epoch == epoch + 1 else best_weights
            test = all_reduce_stats(evaluate_weights(net, weights, data.test, device, cfg.tta), device)
            metrics.update(test_accuracy=test.accuracy, test_loss=test.loss, test_samples=test.count,
                           test_epoch=best_epoch)
        history.append(metrics)
        tracker.log_epoch(metrics)
        # Every rank reports (report is a barrier); only rank 0 writes the checkpoint.
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="cnnray-ckpt-") as tmp:
                save_checkpoint(
                    tmp,
                    model_name=cfg.model,
                    model_args=model_args,
                    state_dict=net.state_dict(),
                    data_info=data.info,
                    epoch=epoch + 1,
                    config=cfg.to_dict(),
                    metrics=metrics,
                    train_state={
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                        "best_val_accuracy": best_val,
                        "best_epoch": best_epoch,
                        "history": history,
                    },
                    history=history,
                    tta=cfg.tta,
                )
                session.report(metrics, tmp, f"epoch-{epoch + 1:04d}")
        else:
            session.report(metrics)
    return None
