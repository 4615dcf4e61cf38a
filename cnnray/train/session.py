"""Where the training loop meets what runs it: Ray Train workers, or this process alone.

    from cnnray.train.loop import run_worker
    from cnnray.train.session import LocalSession
    session = LocalSession(cfg)                 # local mode: no Ray imported at all
    diverged = run_worker(cfg, session)         # Ray Train workers use RaySession()

The loop asks its session for its rank and world size, its device, the model wrapper,
the checkpoint to resume from, and hands it each epoch's report. `RaySession` is Ray
Train's (get_context, prepare_model, get_checkpoint, report: the controller keeps the
checkpoints and prints the progress lines). `LocalSession` is local mode's: one process,
rank 0 of 1, keeping the checkpoints itself in Ray Train's layout (`LocalCheckpoints`:
best and latest, the snapshot a Ray Train run resumes from) and printing the progress
lines. It does what Ray Train's own local mode (`ScalingConfig(num_workers=0)`) does: call
the function in this process and keep the last report; but without importing Ray, which
on the 2-core CI machine takes about as long as importing torch itself (Ray, Ray Train,
Ray Data, pandas, pyarrow: ~1/3 of a local run's start-up) and which local mode never uses.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from cnnray.config import TrainConfig
from cnnray.train.run_dir import LocalCheckpoints, local_run_dir


class LocalSession:
    """The loop's seams in this process alone (local mode): rank 0 of 1, no Ray.

    `last_metrics` holds the last report (the driver's result); the kept checkpoints are
    in `checkpoints` (also on disk, in the run folder)."""

    rank, world_size = 0, 1
    uses_ray = False

    def __init__(self, cfg: TrainConfig, datasets: dict[str, Any] | None = None) -> None:
        """`datasets`: a ray-data run's Ray Datasets by split (the driver built them; the
        only case where local mode needs a running Ray), else None."""
        run_dir = local_run_dir(cfg)
        if run_dir is None:  # resolve_run refuses this first; a direct caller gets a clear error
            raise ValueError(f"local mode keeps checkpoints here: storage_path {cfg.storage_path!r} is a URI")
        self.cfg = cfg
        self.datasets = datasets or {}
        self.checkpoints = LocalCheckpoints(run_dir, cfg.keep_checkpoints)
        self.last_metrics: dict[str, Any] | None = None

    def device(self) -> torch.device:
        """The config's choice: this process's current CUDA device with --gpu, else the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.cfg.gpu else torch.device("cpu")

    def wrap_model(self, net: nn.Module, device: torch.device) -> nn.Module:
        return net.to(device)  # one process: no DDP wrapper, nothing to synchronise

    def metrics_exporter(self) -> None:
        return None  # Ray's metrics need a running Ray, which local mode does without

    def dataset_shard(self, name: str) -> Any:
        """The whole Ray Dataset `name` (one rank: its shard is all of it)."""
        return self.datasets[name]

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        """The folder of the run's latest checkpoint (what --resume continues), or None."""
        yield self.checkpoints.latest()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        """Keep `checkpoint_dir` as `<run>/<dir_name>` (copied before the caller removes
        it), remember the metrics, print the progress line."""
        if checkpoint_dir is not None:
            self.checkpoints.register(checkpoint_dir, dir_name or f"report-{metrics.get('epoch', 0)}", metrics)
        self.last_metrics = metrics
        if self.cfg.verbose:
            from cnnray.train.loop import format_progress

            print(format_progress(metrics, self.cfg.epochs), flush=True)


# train_loop_config key of a checkpoint folder to start from when the run has none of its
# own (a PBT exploit: the donor trial's checkpoint; cnnray.tune.pbt).
INIT_CHECKPOINT = "_init_checkpoint"


class RaySession:
    """The loop's seams on a Ray Train worker (any world size)."""

    uses_ray = True

    def __init__(self, init_checkpoint: str | None = None) -> None:
        import ray.train

        self.init_checkpoint = init_checkpoint

        _quiet_report_log()
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.run_name = ctx.get_experiment_name()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap_model(self, net: nn.Module, device: torch.device) -> nn.Module:
        import ray.train.torch

        # DDP buckets gradients and overlaps their all-reduce with the backward pass;
        # gradient_as_bucket_view saves one copy of every gradient per step.
        return ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"gradient_as_bucket_view": True})

    def dataset_shard(self, name: str) -> Any:
        """This rank's DataIterator of the trainer's dataset `name` (Ray Train split it)."""
        import ray.train

        return ray.train.get_dataset_shard(name)

    def metrics_exporter(self):
        from cnnray.train.metrics import TrainMetrics

        return TrainMetrics(run=self.run_name, rank=self.rank)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        """Ray Train's checkpoint to continue from (after a failure or with --resume), as a
        local folder for the duration of the block, or None."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:  # the run's own checkpoint wins over the one it started from
            yield Path(self.init_checkpoint) if self.init_checkpoint else None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        """Every rank reports (report is a barrier); rank 0 attaches the checkpoint."""
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=dir_name)


def _quiet_report_log() -> None:
    """Ray 2.60 logs every report at INFO from a logger named by file path, which
    LoggingConfig(log_level) does not reach; the progress line says the same."""
    import logging

    from ray.train.v2._internal.execution import context, train_fn_utils

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(train_fn_utils.__name__).setLevel(logging.WARNING)
