"""The driver side of a training run: local mode (the loop in this process, no Ray) or
Ray start-up and the TorchTrainer; the final report.

    from cnnray.config import TrainConfig
    from cnnray.train.driver import run_training
    summary = run_training(TrainConfig(model="cnn", dataset="mnist", workers=2, out="runs/x"))
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cnnray.checkpoint import read_meta
from cnnray.config import ConfigError, TrainConfig
from cnnray.errors import TrainingError, root_cause
from cnnray.files import CLAIM_FILE, RESULT_FILE, atomic_write_json
from cnnray.leftovers import removed_on_failure
from cnnray.ray_start import init_ray, joining_cluster, local_cpu_count
from cnnray.train.best_checkpoint import evaluate_on_test, pick_best
from cnnray.train.run_dir import check_resume, claim_run_folder, last_checkpoint_meta, local_run_dir, run_paths


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

    from cnnray.train.session import format_progress

    class Progress(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                print(format_progress(metrics[0], epochs), flush=True)

    return Progress()


def preflight(cfg: TrainConfig, variants: Sequence[tuple[str, TrainConfig]] = (),
              echo: Callable[[str], None] | None = None) -> Any:
    """Fail fast (ConfigError/DataError), before any worker starts, on sizes that cannot
    train (cnnray.train.sizes: splits, batch per worker with batch norm, schedules, image
    sizes; first from the data's nominal sizes, before any download or decode, then from
    the loaded data), on data that cannot be read, and on more CPUs or GPUs than this
    machine has (a local Ray would wait for them forever). On one machine this also
    downloads and decodes once, so every worker then reads the cache. `variants`: (label,
    config) of every point of a Tune space, each checked like `cfg` (the label prefixes
    the error). `echo`: where the too-few-steps warning goes (None: not given). When
    joining a cluster (--address or $RAY_ADDRESS) only the sizes known without the data
    are checked: the data may exist only there, and the cluster may scale up.

    Returns the loaded `cnnray.data.Dataset` (local mode trains on it: one load per run),
    or None when skipped or streamed (ray-data)."""
    from cnnray.train.sizes import check_sizes, few_steps_warning, missing_classes_warning, nominal_sizes
    from cnnray.train.worker_data import check_data, dataset_sizes

    def check_all(sizes: Any) -> str | None:
        """Every config's checks on `sizes` (a sweep's points, not its base: the space
        replaces the base's values); the first too-few-steps warning, or None."""
        warning = None
        for label, variant in variants or [("", cfg)]:
            try:
                plan = check_sizes(variant, sizes)
            except ConfigError as e:
                raise ConfigError(f"{label}: {e}" if label else str(e)) from None
            warning = warning or few_steps_warning(variant, plan)
        return warning

    joining = bool(cfg.address or os.environ.get("RAY_ADDRESS"))
    sizes = nominal_sizes(cfg)
    warning = check_all(sizes) if sizes is not None else None
    ds = None if joining else check_data(cfg)
    if ds is not None and dataset_sizes(ds) != sizes:  # a smaller or different set than the nominal one
        warning = check_all(dataset_sizes(ds))
    if ds is not None:
        lacking = (missing_classes_warning(c, ds.train_labels, ds.classes) for _, c in variants or [("", cfg)])
        warning = "\n".join(w for w in (warning, next((w for w in lacking if w), None)) if w)
    if echo is not None and warning:
        echo(warning)
    if joining:
        return None
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


def make_trainer(
    cfg: TrainConfig, *, name: str, storage_path: str, callbacks: Sequence[Any] = (),
    init_checkpoint: str | None = None, gpus_per_worker: float = 1.0,
    tracking: dict[str, Any] | None = None,
):
    """The TorchTrainer for one run of `cfg` on Ray Train workers (also what each Tune
    trial builds). Local mode uses no trainer: the driver runs the loop (`_fit_local`).
    data_loader ray-data (Ray running): the Ray Datasets go in datasets= (DataError from
    the scan of every image). `init_checkpoint`: a checkpoint folder of another run to
    start from when this run has none (a PBT exploit); `gpus_per_worker`: a fraction
    packs several runs' workers on one GPU (Tune's --gpus-per-trial)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from cnnray.tracking.train import with_tracking
    from cnnray.train.session import INIT_CHECKPOINT, train_loop_per_worker
    from cnnray.train.worker_data import data_config, loop_config, resolve_loader, stream_datasets

    cfg = cfg.replace(data_loader=resolve_loader(cfg))  # auto is resolved once, here or in resolve_run
    info, datasets = stream_datasets(cfg) if cfg.data_loader == "ray-data" else (None, None)
    return _Trainer(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config=with_tracking(  # cnnray.tracking.train
            {**loop_config(cfg, info), **({INIT_CHECKPOINT: init_checkpoint} if init_checkpoint else {})}, tracking),
        datasets=datasets,
        dataset_config=data_config() if datasets else None,
        scaling_config=_scaling_config(cfg, storage_path, gpus_per_worker),
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


def _Trainer(base: type) -> type:
    """TorchTrainer without the SIGINT handler its fit() installs on the driver's main thread
    (ray/train/v2/api/data_parallel_trainer.py `_register_sigint_handler`). That handler
    asks the controller to abort and lets fit() return as if the run had ended (so the
    driver went on to test and write result.json for a run cut short), stays installed
    after fit() (a Ctrl-C during the end-of-run test met a dead controller and exited 0),
    and leaves SIGTERM to Ray's C++ handler. Instead SIGINT and SIGTERM stay
    cnnray.interrupts' Interrupted: fit() raises it, and the driver stops its Ray (which
    ends the controller and workers); the registered checkpoints are what --resume reads."""

    class Trainer(base):
        def _register_sigint_handler(self, controller: Any) -> None:
            pass

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    return Trainer


def _scaling_config(cfg: TrainConfig, storage_path: str, gpus_per_worker: float = 1.0):
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
        resources_per_worker={"CPU": cfg.cpus_per_worker or 1, **({"GPU": gpus_per_worker} if cfg.gpu else {})},
        elastic_resize_monitor_interval_s=cfg.elastic_resize_s,
    )


def run_training(cfg: TrainConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """One training run of `cfg` to its end: result.json in cfg.out, and its summary."""
    cfg = resolve_run(cfg.validate())
    out, storage, name = run_paths(cfg)
    cfg = cfg.replace(out=str(out))
    with removed_on_failure(out, own=(CLAIM_FILE,)):  # a run that fails before writing leaves no folder
        return _run_claimed(cfg, out, storage, name, echo)


def _run_claimed(cfg: TrainConfig, out: Path, storage: str, name: str, echo: Callable[[str], None]) -> dict[str, Any]:
    claim, exists = claim_run_folder(out, storage, name, cfg.resume)
    try:
        if cfg.resume and not exists:
            echo(f"[cnnray] no earlier run under {out}: starting a new one")
        if cfg.resume:
            check_resume(cfg, last_checkpoint_meta(storage, name), out)
        from cnnray.tracking.train import end_training_run, start_training_run

        tracking = start_training_run(cfg, out, echo)  # an unreachable tracker: exit 2 before any work
        dataset = preflight(cfg, echo=echo)
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
        from cnnray.train.session import fit_local

        result = fit_local(cfg, dataset, tracking)
    else:
        trainer = make_trainer(cfg, name=name, storage_path=storage, tracking=tracking)
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps the worker's exception; show its root cause
            raise TrainingError(f"training failed: {root_cause(e)}") from e
    trained = time.perf_counter()
    if result.error is not None:
        raise TrainingError(f"training failed: {root_cause(result.error)}")
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
