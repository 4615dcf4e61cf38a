"""One training run as one MLflow run: the driver's start and finish, rank 0's epochs.

    handle = start_training_run(cfg, out, echo)      # driver, before Ray or any data: exit 2 if unreachable
    tracker = WorkerTracker(handle, rank)            # in the loop: logs only on rank 0
    tracker.log_epoch(metrics)                       # step = epoch
    finish_training_run(handle, summary, out, echo)  # test metrics, result.json, the best checkpoint

`handle` is a plain dict ({"uri", "run_id"}: JSON, it travels in train_loop_config) or
None when the run is not tracked. The run id is kept in `<out>/mlflow.json`, so a
`--resume` of the same folder continues the same MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from cnnray.checkpoint import atomic_write_json
from cnnray.config import ConfigError, TrainConfig
from cnnray.tracking.client import (
    SafeLogger,
    check_reachable,
    client_for,
    experiment_id,
    first_line,
    quiet_client_settings,
    resolve_uri,
)
from cnnray.tracking.params import epoch_metrics, flatten_params

RUN_FILE = "mlflow.json"  # in the run folder: {"uri", "run_id", "experiment_id"}
LOOP_KEY = "_cnnray_tracking"  # the handle's key in train_loop_config
CHECKPOINT_ARTIFACT = "checkpoint"  # the best checkpoint, as `cnnray serve --checkpoint` loads it
REPORT_ARTIFACT = "report"


def read_run_file(out: str | Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(out) / RUN_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def start_training_run(cfg: TrainConfig, out: Path, echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Create (or, with --resume, continue) the run's MLflow run and log every config
    field as a param. None when `cfg.tracking` is "none". ConfigError (one line) when the
    tracker does not answer or refuses the run: nothing has trained yet."""
    if cfg.tracking != "mlflow":
        return None
    uri = resolve_uri(cfg.tracking_uri, out)
    check_reachable(uri)
    quiet_client_settings()
    client = client_for(uri)
    params = flatten_params(cfg.to_dict())
    try:
        exp = experiment_id(client, cfg.experiment, uri)
        run = _resumable_run(client, uri, out) if cfg.resume else None
        if run is None:
            from mlflow.entities import Param

            run = client.create_run(exp, run_name=out.name or "cnnray", tags={"cnnray.out": str(out), "cnnray.kind": "train"})
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            echo(f"[cnnray] MLflow run {run.info.run_id} (experiment {cfg.experiment or 'cnnray'}) at {uri}")
        else:
            _log_resumed_params(client, run, params)
            client.update_run(run.info.run_id, status="RUNNING")
            echo(f"[cnnray] continuing MLflow run {run.info.run_id} at {uri}")
    except ConfigError:
        raise
    except Exception as e:  # the tracker answered the check but refuses the run
        raise ConfigError(f"MLflow tracking URI {uri}: cannot start a run: {first_line(e)}") from None
    handle = {"uri": uri, "run_id": run.info.run_id, "experiment_id": exp}
    atomic_write_json(handle, out / RUN_FILE)
    return handle


def _resumable_run(client: Any, uri: str, out: Path) -> Any:
    """The MLflow run that `<out>/mlflow.json` names, when it is on this tracker and not deleted."""
    stored = read_run_file(out)
    if stored.get("uri") != uri or not stored.get("run_id"):
        return None
    try:
        run = client.get_run(stored["run_id"])
    except Exception:  # deleted for good, or another tracker's id: a new run
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _log_resumed_params(client: Any, run: Any, params: Mapping[str, str]) -> None:
    """MLflow refuses to change a param: a resume's new values (more epochs, resume=True)
    are kept as tags `cnnray.resumed.<key>`, new keys as params."""
    from mlflow.entities import Param, RunTag

    have = run.data.params
    new = [Param(k, v) for k, v in params.items() if k not in have]
    changed = [RunTag(f"cnnray.resumed.{k}", v) for k, v in params.items() if k in have and have[k] != v]
    client.log_batch(run.info.run_id, params=new, tags=changed)


def with_tracking(loop_config: dict[str, Any], handle: dict[str, Any] | None) -> dict[str, Any]:
    """train_loop_config with the handle added (unchanged when the run is not tracked)."""
    return loop_config if handle is None else {**loop_config, LOOP_KEY: handle}


def split_tracking(loop_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`with_tracking`'s inverse, in the worker: (train_loop_config, handle or None)."""
    rest = dict(loop_config)
    return rest, rest.pop(LOOP_KEY, None)


class WorkerTracker:
    """The training loop's side: rank 0 logs each epoch's metrics (step = epoch); every
    other rank, and an untracked run, does nothing. Never raises (SafeLogger)."""

    def __init__(self, handle: Mapping[str, Any] | None, rank: int) -> None:
        self.active = handle is not None and rank == 0
        if self.active:
            quiet_client_settings()
            self.run_id = handle["run_id"]
            self.safe = SafeLogger(handle["uri"])
            self.client = self.safe.call("connect", client_for, handle["uri"])
            self.active = self.client is not None

    def log_epoch(self, report: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(report["epoch"])
        metrics = [Metric(k, v, now, step) for k, v in epoch_metrics(report).items()]
        self.safe.call(f"epoch {step} metrics", self.client.log_batch, self.run_id, metrics=metrics)


def finish_training_run(handle: Mapping[str, Any] | None, summary: Mapping[str, Any], out: Path,
                        echo: Callable[[str], None] = print) -> None:
    """The end of a tracked run: the test metrics, tags to find it by, result.json and the
    best checkpoint (the model store's layout: weights and meta.json, no optimizer state)
    as artifacts, and status FINISHED. A tracker that fails here warns once; the run's
    own files are already written."""
    if handle is None:
        return
    from mlflow.entities import Metric, RunTag

    from cnnray.store import export

    safe = SafeLogger(handle["uri"], echo)
    client = safe.call("connect", client_for, handle["uri"])
    if client is None:
        return
    run_id, now, step = handle["run_id"], int(time.time() * 1000), int(summary["epochs"])
    metrics = [Metric(k, float(summary[k]), now, step) for k in ("test_accuracy", "test_loss") if summary.get(k) is not None]
    tags = [RunTag("dataset", str(summary["dataset"])), RunTag("model", str(summary["model"])),
            RunTag("best_epoch", str(summary["best_epoch"])), RunTag("val_accuracy", repr(float(summary["best_val_accuracy"])))]
    safe.call("final metrics", client.log_batch, run_id, metrics=metrics, tags=tags)
    safe.call("result.json", client.log_artifact, run_id, str(out / "result.json"))
    with tempfile.TemporaryDirectory(prefix="cnnray-mlflow-") as tmp:
        version = export(summary["checkpoint"], tmp, "best")  # verified copy without optimizer state
        safe.call("best checkpoint", client.log_artifacts, run_id, str(version), CHECKPOINT_ARTIFACT)
    safe.call("end", client.set_terminated, run_id, "FINISHED")
    if not safe.broken:
        echo(f"[cnnray] logged to MLflow run {run_id} at {handle['uri']}")


def end_training_run(handle: Mapping[str, Any] | None, error: BaseException) -> None:
    """Mark a run that stopped with `error` as KILLED (Ctrl-C) or FAILED; never raises."""
    if handle is None:
        return
    safe = SafeLogger(handle["uri"])
    client = safe.call("connect", client_for, handle["uri"])
    if client is not None:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        safe.call("end", client.set_terminated, handle["run_id"], status)


def log_report(summary: Mapping[str, Any], page: Path | None) -> None:
    """The report's folder (page and plots) as artifacts of a tracked run; never raises."""
    out = Path(summary["config"]["out"])
    handle = read_run_file(out)
    if page is None or summary["config"].get("tracking") != "mlflow" or not handle.get("run_id"):
        return
    safe = SafeLogger(handle["uri"])
    client = safe.call("connect", client_for, handle["uri"])
    if client is not None:
        safe.call("report", client.log_artifacts, handle["run_id"], str(Path(page).parent), REPORT_ARTIFACT)
