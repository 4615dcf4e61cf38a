"""Where the training loop meets what runs it: Ray Train workers, or this process alone.

    from cnnray.train.loop import run_worker
    from cnnray.train.session import LocalSession
    session = LocalSession(cfg)                 # local mode: no Ray imported at all
    diverged = run_worker(cfg, session)         # Ray Train workers use RaySession()
    result = fit_local(cfg, dataset)            # the driver's local mode: that, as a Result

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

Local mode also keeps Ray Train's checkpoint bookkeeping itself (`LocalCheckpoints`): Ray
Train's own local mode would only remember the last checkpoint, and give nothing back from
earlier runs. It keeps the best `keep` checkpoints by validation accuracy plus the latest,
each folder moved into place whole and the snapshot rewritten atomically, in Ray Train's
layout: either path can resume a run the other one started (`--resume`), and readers see
one layout. `fit_local` is the driver's local mode: the loop here, then what Ray Train's
`Result` gives, from those checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from cnnray.config import TrainConfig
from cnnray.errors import CheckpointError, TrainingError, root_cause
from cnnray.files import atomic_write_json
from cnnray.train.run_dir import SNAPSHOT_FILE, local_run_dir

SCORE = "val_accuracy"  # checkpoints are ranked by it, higher is better


def format_progress(metrics: dict[str, Any], epochs: int) -> str:
    return (
        f"[cnnray] epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  "
        f"train_acc {metrics['train_accuracy']:.4f}  val_acc {metrics['val_accuracy']:.4f}  "
        f"{metrics['samples_per_second']:,.0f} samples/s  {metrics['epoch_seconds']:.1f}s"
    )


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


def train_loop_per_worker(config: dict[str, Any]) -> str | None:
    """Entry point of every Ray Train worker: `config` is `worker_data.loop_config`'s.

    Returns None, or when training diverged the one line saying where (every rank stops
    in the same epoch; rank 0's value reaches the driver as the Result's `return_value`).
    A divergence is returned, not raised: Ray Train would retry an error from the last
    checkpoint, and the same run would diverge again."""
    from cnnray.tracking.train import split_tracking
    from cnnray.train.loop import run_worker
    from cnnray.train.worker_data import from_loop_config

    config, tracking = split_tracking(config)  # the MLflow run rank 0 logs to, or None
    init = config.get(INIT_CHECKPOINT)  # a checkpoint of another run to start from (PBT)
    cfg, stream_info = from_loop_config({k: v for k, v in config.items() if k != INIT_CHECKPOINT})
    return run_worker(cfg, RaySession(init_checkpoint=init), stream_info=stream_info, tracking=tracking)


def _quiet_report_log() -> None:
    """Ray 2.60 logs every report at INFO from a logger named by file path, which
    LoggingConfig(log_level) does not reach; the progress line says the same."""
    import logging

    from ray.train.v2._internal.execution import context, train_fn_utils

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(train_fn_utils.__name__).setLevel(logging.WARNING)


class LocalCheckpoints:
    """Ray Train's checkpoint bookkeeping for a local-mode run in `run_dir` (see module doc).

    Not safe for two processes writing one run at once; the driver refuses a second run in
    an existing folder unless it resumes."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        # Each entry: {"checkpoint_dir_name", "metrics", "report_index"}, in Ray's order
        # (ascending by score, then by report index: the best is last).
        self._results: list[dict[str, Any]] = []
        self._latest: str | None = None
        self._report_index = 0
        self._load()

    # --- reading -------------------------------------------------------------------------
    def _load(self) -> None:
        path = self.run_dir / SNAPSHOT_FILE
        if not path.exists():
            return
        try:
            snap = json.loads(path.read_text())
            results = snap["checkpoint_results"]
            indices = snap["checkpoint_report_indices"]
            latest = snap.get("latest_checkpoint_result")
            self._results = [
                {"checkpoint_dir_name": r["checkpoint_dir_name"], "metrics": dict(r["metrics"]), "report_index": int(i)}
                for r, i in zip(results, indices, strict=True)
            ]
            self._latest = latest["checkpoint_dir_name"] if latest else None
            self._report_index = int(snap.get("current_report_index", len(self._results)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"unreadable checkpoint list {path}: {e}") from e

    def latest(self) -> Path | None:
        """The folder of the last registered checkpoint (what a resume continues from)."""
        return self.run_dir / self._latest if self._latest else None

    def results(self) -> list[tuple[Path, dict[str, Any]]]:
        """(folder, reported metrics) of every kept checkpoint, worst first."""
        return [(self.run_dir / r["checkpoint_dir_name"], r["metrics"]) for r in self._results]

    # --- writing -------------------------------------------------------------------------
    def register(self, src: str | Path, dir_name: str, metrics: dict[str, Any]) -> Path:
        """Copy the checkpoint folder `src` to `<run_dir>/<dir_name>` (whole or not at all),
        record it as the latest, and drop checkpoints that are neither among the best
        `keep` nor the latest. Returns the kept folder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dest = self.run_dir / dir_name
        staging = Path(tempfile.mkdtemp(prefix=f".{dir_name}.", dir=self.run_dir))
        try:
            shutil.copytree(src, staging, dirs_exist_ok=True)
            if dest.exists():  # left by an attempt that stopped before it listed it
                shutil.rmtree(dest)
            os.replace(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._results = [r for r in self._results if r["checkpoint_dir_name"] != dir_name]
        self._results.append({"checkpoint_dir_name": dir_name, "metrics": metrics, "report_index": self._report_index})
        self._results.sort(key=lambda r: (r["metrics"].get(SCORE, float("-inf")), r["report_index"]))
        self._latest = dir_name
        self._report_index += 1
        dropped = [r for r in self._results[: -self.keep] if r["checkpoint_dir_name"] != dir_name]
        self._results = [r for r in self._results if r not in dropped]
        # The list first, then the deletions: a crash in between leaves stray folders,
        # never a list naming a deleted one (the order Ray's own manager keeps).
        atomic_write_json(self._snapshot(), self.run_dir / SNAPSHOT_FILE)
        for r in dropped:
            shutil.rmtree(self.run_dir / r["checkpoint_dir_name"], ignore_errors=True)
        return dest

    def _snapshot(self) -> dict[str, Any]:
        """Ray Train 2.60's `_CheckpointManagerState`, so Ray Train workers can resume it."""
        from importlib.metadata import version

        def state(r: dict[str, Any]) -> dict[str, Any]:
            return {"version": 0, "checkpoint_dir_name": r["checkpoint_dir_name"], "metrics": r["metrics"]}

        latest = next(r for r in self._results if r["checkpoint_dir_name"] == self._latest)
        return {
            # Read from the installed package: importing Ray only for this would cost local
            # mode (which runs without Ray) about as much as importing torch.
            "ray_version": version("ray"),
            "checkpoint_results": [state(r) for r in self._results],
            "checkpoint_report_indices": [r["report_index"] for r in self._results],
            "latest_checkpoint_result": state(latest),
            "pending_training_results": [],
            "pending_validation_specs": [],
            "current_report_index": self._report_index,
            "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [],
            "failed_validation_checkpoint_dir_names": [],
        }


class _FolderCheckpoint:
    """A checkpoint folder on this machine, read as a ray.train.Checkpoint is (`path`,
    `as_directory()`), so the report below handles both paths alike without Ray."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def fit_local(cfg: TrainConfig, dataset: Any, tracking: dict[str, Any] | None = None) -> Any:
    """Local mode: the loop in this process (no Ray imported), then what Ray Train's
    Result gives on workers (error, return_value, best_checkpoints, checkpoint, metrics,
    path), from the checkpoints the run kept in its run folder. An exception in the loop
    is a TrainingError naming it, as on workers. `tracking`: the MLflow run the loop logs
    each epoch to (cnnray.tracking.train), or None."""
    from types import SimpleNamespace

    from cnnray.train.loop import run_worker

    info, datasets = None, None
    if cfg.data_loader == "ray-data":  # the loop reads the whole streamed datasets (one rank)
        from cnnray.train.worker_data import stream_datasets

        info, datasets = stream_datasets(cfg)
    session = LocalSession(cfg, datasets)
    try:
        value = run_worker(cfg, session, dataset=dataset, stream_info=info, tracking=tracking)
    except Exception as e:
        raise TrainingError(f"training failed: {root_cause(e)}") from e
    kept = session.checkpoints
    latest = kept.latest()
    return SimpleNamespace(
        error=None,
        return_value=value,
        best_checkpoints=[(_FolderCheckpoint(p), m) for p, m in kept.results()],
        checkpoint=_FolderCheckpoint(latest) if latest else None,
        metrics=session.last_metrics,
        path=str(kept.run_dir),
    )
