"""The driver side of a training run: local mode (the loop in this process, no Ray) or
Ray start-up and the TorchTrainer; the final report.

    from cnnray.config import TrainConfig
    from cnnray.train.driver import run_training
    summary = run_training(TrainConfig(model="cnn", dataset="mnist", workers=2, out="runs/x"))
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cnnray.checkpoint import atomic_write_json, read_meta
from cnnray.config import ConfigError, TrainConfig
from cnnray.ray_start import init_ray, joining_cluster, local_cpu_count
from cnnray.train.run_dir import local_run_dir, run_paths

RESULT_FILE = "result.json"
# Locked (flock) in the run folder from before Ray starts until the run ends: a second
# `cnnray train` with the same --out is refused at once, not after Ray made its folder.
CLAIM_FILE = ".cnnray-run"
# Config keys a resumed run cannot change: the checkpoint's weights only fit this model.
RESUME_FIXED = ("model", "norm", "hidden_sizes", "dataset")


class TrainingError(RuntimeError):
    """The run failed after Ray Train's retries; the message holds the root cause."""


def resolve_run(cfg: TrainConfig) -> TrainConfig:
    """Fill in what the config leaves to the machine: local mode (None: on for one worker
    on this machine with its storage on a local file system) and the CPUs per worker
    (None: on a local Ray the workers share all its cores; joining a cluster, 1).

    Raises ConfigError for local mode with URI storage, or with --gpu and no GPU here."""
    from cnnray.train.worker_data import resolve_loader

    joining = joining_cluster(cfg.address)
    local_storage = local_run_dir(cfg) is not None
    loader = resolve_loader(cfg)
    local_mode = cfg.local_mode
    if local_mode is None:
        local_mode = cfg.workers == 1 and not joining and local_storage
    elif local_mode and not local_storage:
        raise ConfigError(f"local_mode keeps checkpoints on this machine: storage_path {cfg.storage_path!r} is a URI")
    if local_mode and cfg.gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("gpu=True but this machine has no CUDA GPU (local mode trains here)")
    cpus = cfg.cpus_per_worker
    if cpus is None:
        cpus = 1 if joining else max(1, local_cpu_count() // cfg.workers)
    return cfg.replace(local_mode=local_mode, cpus_per_worker=cpus, data_loader=loader)


def _progress_callback(epochs: int):
    """One line per epoch, printed by the Ray Train controller after all ranks reported."""
    from ray.train.v2.api.callback import UserCallback

    from cnnray.train.loop import format_progress

    class Progress(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                print(format_progress(metrics[0], epochs), flush=True)

    return Progress()


def _run_exists(storage: str, name: str) -> bool:
    if "://" not in storage:  # a local path (TrainConfig made it absolute): no pyarrow needed
        return (Path(storage) / name).exists()
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)  # an absolute path or a URI (TrainConfig)
    info = fs.get_file_info(f"{root.rstrip('/')}/{name}")
    return info.type != pyarrow.fs.FileType.NotFound


def _evaluate_checkpoint(checkpoint: Any, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Runs as a Ray task next to the data: test-set accuracy of one checkpoint."""
    import torch

    from cnnray.checkpoint import checkpoint_tta, load_model
    from cnnray.train.loop import evaluate
    from cnnray.train.worker_data import held_out_batches

    cfg = TrainConfig.from_dict(cfg_dict)
    device = torch.device("cuda" if cfg.gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker or 1)
    with checkpoint.as_directory() as d:
        model, meta = load_model(d, map_location=device)
    # The checkpoint's test-time augmentation, as the workers' own test and Serve use it.
    stats = evaluate(model, held_out_batches(cfg, device), device, checkpoint_tta(meta))
    return {"test_accuracy": stats.accuracy, "test_loss": stats.loss, "test_samples": stats.count}


def preflight(cfg: TrainConfig) -> Any:
    """Fail fast (ConfigError/DataError), before any worker starts, on data that cannot be
    read or split into a batch per worker, and on more CPUs or GPUs than this machine has
    (a local Ray would wait for them forever). On one machine this also downloads and decodes once,
    so every worker then reads the cache. Skipped when joining a cluster (--address or
    $RAY_ADDRESS): the data may exist only there, and the cluster may scale up.

    Returns the loaded `cnnray.data.Dataset` (local mode trains on it: one load per run),
    or None when skipped or streamed (ray-data)."""
    from cnnray.train.worker_data import check_data

    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return None
    ds = check_data(cfg)
    cpus = cfg.cpus_per_worker or 1  # None (not yet resolved by resolve_run): at least one each
    fewest = cfg.min_workers or cfg.workers  # an elastic run starts with what fits
    need = fewest * cpus
    have = _local_resource("CPU")
    if need > have:
        raise ConfigError(
            f"{fewest} worker(s) x {cpus} CPU(s) need {need} CPUs but this machine's Ray "
            f"has {have:g}: lower --workers or --cpus-per-worker"
        )
    if cfg.gpu and fewest > _local_resource("GPU"):
        raise ConfigError(
            f"--gpu with {fewest} worker(s) needs {fewest} GPUs but this machine's Ray has "
            f"{_local_resource('GPU'):g}: lower --workers or drop --gpu"
        )
    return ds


def _local_resource(name: str) -> float:
    """CPUs or GPUs of the local Ray: the running one's, else what `init_ray` would start with.
    Imports no Ray (local mode never needs it); only one already imported can be running."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.cluster_resources().get(name, 0.0)
    if name == "CPU":  # the count resolve_run shares out by default
        return float(local_cpu_count())
    import torch

    return float(torch.cuda.device_count())


def lock_folder(out: Path, what: str = "cnnray train") -> int:
    """Lock `out` (created if needed) for this process: the descriptor to keep open while
    working in it. Atomic: an exclusive flock on `<out>/.cnnray-run`, which the kernel
    releases when the process ends, even on SIGKILL, so no stale lock is left behind.
    ConfigError, naming the holder, when another process holds it."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / CLAIM_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "starting"
        os.close(fd)
        raise ConfigError(f"{out} is in use by another {what} ({owner}): wait for it, or choose another --out") from None
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    return fd


def claim_run_folder(out: Path, storage: str, name: str, resume: bool) -> tuple[int, bool]:
    """Claim `out` for this run before anything else touches it (`lock_folder`): (descriptor
    to keep open while training, whether `out` already held a run). ConfigError when
    another run uses `out` now, or when `out` holds an earlier run (Ray's run folder
    exists) and `resume` is off."""
    fd = lock_folder(out)
    # Checked under the lock: whoever held it before has finished, its Ray folder is there.
    existed = _run_exists(storage, name)
    if existed and not resume:
        os.close(fd)
        raise ConfigError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    return fd, existed


def last_checkpoint_meta(storage: str, name: str) -> dict[str, Any] | None:
    """meta.json of the run's newest checkpoint that Ray Train registered (what a resume
    starts from); None when there is none, or the storage is remote (the workers read it)."""
    if "://" in storage:
        return None
    run_dir = Path(storage) / name
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not names:
        return None
    newest = max(names, key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else -1)
    return read_meta(run_dir / newest)  # epoch-NNNN (more digits past 9999)


def check_resume(cfg: TrainConfig, meta: dict[str, Any] | None, out: Path) -> None:
    """Refuse up front (ConfigError) what a resume cannot honour: fewer epochs than the run
    already trained, or a different model. More epochs are fine (see build_scheduler)."""
    if meta is None:
        return
    done, stored = int(meta["epoch"]), meta.get("config", {})
    changed = [k for k in RESUME_FIXED if k in stored and stored[k] != cfg.to_dict()[k]]
    if changed:
        was = ", ".join(f"{k}={stored[k]!r}" for k in changed)
        raise ConfigError(f"the run in {out} was trained with {was}: --resume keeps these; choose another --out")
    if cfg.epochs <= done:
        raise ConfigError(
            f"the run in {out} has already trained {done} epoch(s): pass --epochs greater than {done} "
            "to train it longer (the schedule then spans the new total)"
        )


def make_trainer(
    cfg: TrainConfig, *, name: str, storage_path: str, callbacks: Sequence[Any] = (),
    tracking: dict[str, Any] | None = None,
):
    """The TorchTrainer for one run of `cfg` on Ray Train workers (also what each Tune
    trial builds). Local mode uses no trainer: the driver runs the loop (`_fit_local`).
    data_loader ray-data (Ray running): the Ray Datasets go in datasets= (DataError from
    the scan of every image)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cnnray.data.stream import data_config
    from cnnray.tracking.train import with_tracking
    from cnnray.train.loop import train_loop_per_worker
    from cnnray.train.worker_data import loop_config, resolve_loader, stream_datasets

    cfg = cfg.replace(data_loader=resolve_loader(cfg))  # auto is resolved once, here or in resolve_run
    info, datasets = stream_datasets(cfg) if cfg.data_loader == "ray-data" else (None, None)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=with_tracking(loop_config(cfg, info), tracking),  # cnnray.tracking.train
        datasets=datasets,
        dataset_config=data_config() if datasets else None,
        scaling_config=_scaling_config(cfg, storage_path),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[*([_progress_callback(cfg.epochs)] if cfg.verbose else []), *callbacks],
            # Ray Train's per-report INFO lines drown the progress lines; warnings still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def _scaling_config(cfg: TrainConfig, storage_path: str):
    """Ray Train's ScalingConfig for `cfg`: local mode, a fixed count, or an elastic
    (min, max) range. Workers on other machines need `storage_path` there too, so unless
    local mode, this first refuses (ConfigError) storage that they could not reach."""
    import ray.train

    if not cfg.local_mode:
        from cnnray.train.shared_storage import check_shared_storage

        check_shared_storage(storage_path, cfg.cpus_per_worker or 1, cfg.gpu)
    workers = 0 if cfg.local_mode else (cfg.min_workers, cfg.workers) if cfg.elastic else cfg.workers
    return ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=cfg.gpu,
        resources_per_worker={"CPU": cfg.cpus_per_worker or 1, **({"GPU": 1} if cfg.gpu else {})},
        elastic_resize_monitor_interval_s=cfg.elastic_resize_s,
    )


def evaluate_on_test(checkpoint: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Test-set accuracy of a Ray Train checkpoint: a Ray task with a worker's resources,
    or in this process when no Ray runs here (local mode, which imports no Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return _evaluate_checkpoint(checkpoint, cfg.to_dict())
    resources = {"num_cpus": cfg.cpus_per_worker or 1, "num_gpus": 1 if cfg.gpu else 0}
    return ray.get(ray.remote(**resources)(_evaluate_checkpoint).remote(checkpoint, cfg.to_dict()))


def pick_best(
    best_checkpoints: Sequence[tuple[Any, dict[str, Any]]], last_metrics: dict[str, Any]
) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """(checkpoint, its metrics, test metrics or None): the epoch the workers named best
    (the first with the highest validation accuracy), else the best Ray kept. The test
    metrics come from the last report when the workers tested that same epoch."""
    named = [cm for cm in best_checkpoints if cm[1].get("epoch") == last_metrics.get("best_epoch")]
    ckpt, metrics = named[0] if named else max(best_checkpoints, key=lambda cm: cm[1]["val_accuracy"])
    test = None
    if "test_accuracy" in last_metrics and last_metrics.get("test_epoch") == metrics.get("epoch"):
        test = {k: last_metrics[k] for k in ("test_accuracy", "test_loss", "test_samples")}
    return ckpt, metrics, test


def run_training(cfg: TrainConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    cfg = resolve_run(cfg)
    out, storage, name = run_paths(cfg)
    cfg = cfg.replace(out=str(out))
    claim, exists = claim_run_folder(out, storage, name, cfg.resume)
    try:
        if cfg.resume and not exists:
            echo(f"[cnnray] no earlier run under {out}: starting a new one")
        if cfg.resume:
            check_resume(cfg, last_checkpoint_meta(storage, name), out)
        from cnnray.tracking.train import end_training_run, start_training_run

        tracking = start_training_run(cfg, out, echo)  # an unreachable tracker: exit 2 before any work
        dataset = preflight(cfg)
        if not cfg.local_mode:  # workers load their own (the cache is warm now): free it here
            dataset = None

        started = time.perf_counter()
        # Local mode needs no Ray at all (not even to start one: that is ~8 s on a laptop),
        # unless Ray Data streams the images (its decode tasks need one).
        own_ray = False if cfg.local_mode and cfg.data_loader == "memory" else init_ray(cfg.address, ray_train=True)
        try:
            return _fit(cfg, out, storage, name, started, echo, dataset, tracking)
        except BaseException as e:
            end_training_run(tracking, e)
            raise
        finally:
            if own_ray:  # now rather than at exit: ~1 s sooner, and the CPUs are free for the report
                import ray

                ray.shutdown()
    finally:
        os.close(claim)  # releases the flock; the claim file stays: the folder holds a run


def _fit(
    cfg: TrainConfig, out: Path, storage: str, name: str, started: float, echo: Callable[[str], None],
    dataset: Any = None, tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training (in this process in local mode, else trainer.fit() on a running Ray),
    the test accuracy of the best checkpoint, result.json. `dataset`: the pre-flight's."""
    ray_ready = time.perf_counter()
    device = "GPU" if cfg.gpu else f"{cfg.cpus_per_worker} CPU(s)"
    where = (f"in this process on {device} (local mode)" if cfg.local_mode
             else f"{cfg.workers_text} Ray Train worker(s) with {device} each")
    echo(f"[cnnray] training {cfg.model} on {cfg.dataset}: {cfg.epochs} epochs, {where}, global batch {cfg.batch_size}")
    if cfg.local_mode:
        result = _fit_local(cfg, dataset, tracking)
    else:
        trainer = make_trainer(cfg, name=name, storage_path=storage, tracking=tracking)
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps the worker's exception; show its root cause
            raise TrainingError(f"training failed: {_root_cause(e)}") from e
    trained = time.perf_counter()
    if result.error is not None:
        raise TrainingError(f"training failed: {_root_cause(result.error)}")
    if isinstance(result.return_value, str):  # the workers' divergence line (see the loop)
        raise TrainingError(result.return_value)
    if not result.best_checkpoints:
        raise TrainingError("training reported no checkpoint")

    best_ckpt, best_metrics, test = pick_best(result.best_checkpoints, result.metrics or {})
    if test is None:  # not measured by the workers (a resume past the best epoch, say)
        test = evaluate_on_test(best_ckpt, cfg)
    with result.checkpoint.as_directory() as d:
        history = read_meta(d).get("history", [])

    epoch_seconds = sum(h["epoch_seconds"] for h in history)
    samples = sum(h["samples_per_second"] * h["epoch_seconds"] for h in history)
    summary = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "workers": cfg.workers,
        "min_workers": cfg.min_workers,
        "local_mode": cfg.local_mode,
        "cpus_per_worker": cfg.cpus_per_worker,
        "gpu": cfg.gpu,
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "test_samples": test["test_samples"],
        "best_val_accuracy": best_metrics["val_accuracy"],
        "best_epoch": best_metrics["epoch"],
        "train_seconds": trained - ray_ready,  # trainer.fit(): workers, data, epochs
        "epoch_seconds_total": epoch_seconds,  # the training epochs alone
        "ray_start_seconds": ray_ready - started,
        "total_seconds": time.perf_counter() - started,
        "samples_per_second": samples / epoch_seconds if epoch_seconds else 0.0,
        "checkpoint": best_ckpt.path,
        "last_checkpoint": result.checkpoint.path,
        "run_path": result.path,
        "history": history,
        "config": cfg.to_dict(),
    }
    atomic_write_json(summary, out / RESULT_FILE)
    from cnnray.tracking.train import finish_training_run

    finish_training_run(tracking, summary, out, echo)
    echo(
        f"[cnnray] done: test_accuracy {summary['test_accuracy']:.4f}  best_val_accuracy "
        f"{summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']})  train {summary['train_seconds']:.1f}s  "
        f"{summary['samples_per_second']:,.0f} samples/s\n[cnnray] checkpoint {summary['checkpoint']}\n"
        f"[cnnray] wrote {out / RESULT_FILE}"
    )
    return summary


class _FolderCheckpoint:
    """A checkpoint folder on this machine, read as a ray.train.Checkpoint is (`path`,
    `as_directory()`), so the report below handles both paths alike without Ray."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def _fit_local(cfg: TrainConfig, dataset: Any, tracking: dict[str, Any] | None = None) -> Any:
    """Local mode: the loop in this process (no Ray imported), then what Ray Train's
    Result gives on workers (error, return_value, best_checkpoints, checkpoint, metrics,
    path), from the checkpoints the run kept in its run folder. An exception in the loop
    is a TrainingError naming it, as on workers."""
    from types import SimpleNamespace

    from cnnray.train.loop import run_worker
    from cnnray.train.session import LocalSession

    info, datasets = None, None
    if cfg.data_loader == "ray-data":  # the loop reads the whole streamed datasets (one rank)
        from cnnray.train.worker_data import stream_datasets

        info, datasets = stream_datasets(cfg)
    session = LocalSession(cfg, datasets)
    try:
        value = run_worker(cfg, session, dataset=dataset, stream_info=info, tracking=tracking)
    except Exception as e:
        raise TrainingError(f"training failed: {_root_cause(e)}") from e
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


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message: Ray nests the worker's error in several layers."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or getattr(e, "cause", None) or e.__context__
        if nxt is None:
            break
        e = nxt
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"
