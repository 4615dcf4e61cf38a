"""A sweep in MLflow: a parent run, one child run per trial, the winner registered.

    handle = start_sweep_run(sweep, out, echo)         # driver, before Ray: exit 2 if unreachable
    callbacks = sweep_callbacks(handle, sweep)         # Tune callbacks: the child runs
    finish_sweep_run(handle, sweep, out, best, echo)   # best.json, the table, the winner's checkpoint; --register

The children are logged by Ray's `MLflowLoggerCallback` on the Tune driver (Tune's own
logger callbacks are fine there; only inside a Ray Train run does Train V2 refuse them,
ray#64272), with four changes: each child is tagged with the parent's run id (MLflow
shows them nested), its metrics are the epoch metrics with step = epoch, its end says why
it ended (tag `stop_reason`: finished, stopped early, errored), and its MLflow calls run on
a background thread (cnnray.tracking.background), never on Tune's driver loop, which hands
every trial its next result. The parent's id
is kept in `<out>/mlflow.json`, so --resume continues the same parent, and a resumed
trial finds its own child run again (tag `trial_id`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from cnnray.checkpoint import atomic_write_json
from cnnray.config import ConfigError
from cnnray.tracking.background import BackgroundLogger
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
from cnnray.tracking.train import RUN_FILE, read_run_file

# `sweep` below is a cnnray.tune.sweep_config.SweepConfig (read by its attributes only):
# tracking sits below tune/ and never imports it.
SweepConfig = Any

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the children under it
STOP_REASONS = ("finished", "stopped early", "errored")


def start_sweep_run(sweep: SweepConfig, out: Path, echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The sweep's parent run (continued on --resume) with the base config and the sweep's
    settings as params; None when neither tracking nor --register is asked for. With
    --register only, just the reachability check (the registration makes its own run)."""
    cfg = sweep.train
    if cfg.tracking != "mlflow" and not sweep.register:
        return None
    uri = resolve_uri(cfg.tracking_uri, out)
    check_reachable(uri)
    quiet_client_settings()
    if cfg.tracking != "mlflow":
        return {"uri": uri, "run_id": None, "experiment": cfg.experiment}
    client = client_for(uri)
    try:
        exp = experiment_id(client, cfg.experiment, uri)
        stored = read_run_file(out)
        run_id = stored.get("run_id") if sweep.resume and stored.get("uri") == uri else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            echo(f"[cnnray] continuing MLflow parent run {run_id} at {uri}")
        else:
            from mlflow.entities import Param

            run_id = client.create_run(exp, run_name=out.name or "sweep", tags={"cnnray.kind": "sweep", "cnnray.out": str(out)}).info.run_id
            params = flatten_params({**cfg.to_dict(), **{f"sweep.{k}": v for k, v in sweep.to_dict().items() if k != "train"}})
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            echo(f"[cnnray] MLflow parent run {run_id} (experiment {cfg.experiment or 'cnnray'}) at {uri}")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"MLflow tracking URI {uri}: cannot start the sweep's run: {first_line(e)}") from None
    handle = {"uri": uri, "run_id": run_id, "experiment_id": exp, "experiment": cfg.experiment or "cnnray"}
    atomic_write_json(handle, out / RUN_FILE)
    return handle


def stop_reason(failed: bool, epochs_run: int, epochs: int) -> str:
    """Why a trial ended: "errored", "finished" (all epochs) or "stopped early" (ASHA)."""
    if failed:
        return "errored"
    return "finished" if epochs_run >= epochs else "stopped early"


def sweep_callbacks(handle: Mapping[str, Any] | None, sweep: SweepConfig) -> list[Any]:
    """The Tune callback that logs one child run per trial, or [] when the sweep is not tracked."""
    if handle is None or handle.get("run_id") is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    epochs, parent, uri = sweep.train.epochs, handle["run_id"], handle["uri"]

    class TrialRuns(MLflowLoggerCallback):
        """Ray's MLflowLoggerCallback (children of the parent, epoch metrics, stop reasons)
        with every MLflow call made on one background thread, in order: Tune calls these
        hooks on its driver loop, which must not wait for the network (BackgroundLogger).
        The hooks run on the driver and only queue work with a snapshot of the trial; Ray's
        own state (`_trial_runs`, `mlflow_util`) is touched only by the worker thread."""

        def setup(self, *args, **kwargs):
            self._worker = BackgroundLogger(uri, goes_on="the sweep")
            self._last_epoch: dict[str, int] = {}  # driver thread only
            self._worker.submit("setup", super().setup, *args, **kwargs)

        def __getstate__(self):  # Tune pickles its callbacks with the experiment; a thread does not pickle
            return {k: v for k, v in self.__dict__.items() if k != "_worker"}

        def log_trial_start(self, trial):
            self._worker.submit("trial start", self._start, TrialView.of(trial))

        def _start(self, trial: TrialView):
            if trial in self._trial_runs:
                # A trial started again (PBT's exploit, a restore): its params stay as first
                # logged, since MLflow refuses a changed param (and would stop tracking);
                # the epochs' `lr` metric shows what each epoch trained with.
                return
            found = _child_of(self.mlflow_util._get_client(), parent, trial.trial_id)
            if found is not None:  # a resumed sweep: the trial's child run goes on
                self._trial_runs[trial] = found
                return
            self.tags = {**(self.tags or {}), PARENT_TAG: parent}
            super().log_trial_start(trial)
            self.mlflow_util._get_client().set_tag(self._trial_runs[trial], "trial_id", trial.trial_id)

        def log_trial_result(self, iteration, trial, result):
            if "epoch" not in result:
                return
            step = int(result["epoch"])
            self._last_epoch[trial.trial_id] = step
            # One request per result (Ray's util makes one per metric plus a lookup).
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in epoch_metrics(result).items()]
            self._worker.submit("trial metrics", self._log_metrics, TrialView.of(trial), metrics)

        def _log_metrics(self, trial: TrialView, metrics: list[Any]):
            if trial in self._trial_runs:
                self.mlflow_util._get_client().log_batch(self._trial_runs[trial], metrics=metrics)

        def log_trial_end(self, trial, failed=False):
            run_epoch = self._last_epoch.get(trial.trial_id, int((trial.last_result or {}).get("epoch", 0)))
            self._worker.submit("trial end", self._end, TrialView.of(trial), stop_reason(failed, run_epoch, epochs), failed)

        def _end(self, trial: TrialView, reason: str, failed: bool):
            if trial in self._trial_runs:
                self.mlflow_util._get_client().set_tag(self._trial_runs[trial], "stop_reason", reason)
                super().log_trial_end(trial, failed)

        def on_experiment_end(self, trials, **info):
            self._worker.close()  # waits for the queued calls, FLUSH_TIMEOUT_S at most

    return [TrialRuns(uri, registry_uri=uri, experiment_name=handle["experiment"])]


@dataclass(frozen=True)
class TrialView:
    """What Ray's MLflowLoggerCallback reads of a Tune trial (its dict key, `str(trial)`,
    `trial.config`), copied on the driver: the worker thread must not read a live Trial."""

    trial_id: str
    name: str
    config: dict[str, Any] = field(compare=False, hash=False)

    @classmethod
    def of(cls, trial: Any) -> "TrialView":
        return cls(trial.trial_id, str(trial), dict(trial.config))

    def __str__(self) -> str:
        return self.name


def _child_of(client: Any, parent: str, trial_id: str) -> str | None:
    run = client.get_run(parent)
    found = client.search_runs([run.info.experiment_id], max_results=1,
                               filter_string=f"tags.`{PARENT_TAG}` = '{parent}' and tags.trial_id = '{trial_id}'")
    return found[0].info.run_id if found else None


def finish_sweep_run(handle: Mapping[str, Any] | None, sweep: SweepConfig, out: Path, best: Mapping[str, Any],
                     echo: Callable[[str], None] = print) -> None:
    """The parent's end: the winner's metrics, best.json, trials.csv, the plot and the
    winner's checkpoint as artifacts, status FINISHED; then `--register NAME`: the winner
    as a new version of NAME (the champion rule decides the alias)."""
    if handle is None:
        return
    from cnnray.tracking.registry import log_checkpoint, register_checkpoint, version_tags

    tags = version_tags(val_accuracy=float(best["val_accuracy"]), test_accuracy=best.get("test_accuracy"),
                        epoch=best.get("epoch"), trial_id=best.get("trial_id"), model=best["config"]["model"],
                        dataset=best["config"]["dataset"], source=str(out),
                        **{f"swept.{k}": v for k, v in best.get("swept", {}).items()})
    run_id = handle.get("run_id")
    if run_id is not None:
        from mlflow.entities import Metric

        safe = SafeLogger(handle["uri"], echo, goes_on="the sweep")
        client = client_for(handle["uri"])
        metrics = [Metric(f"best_{k}", float(best[k]), 0, int(best["epoch"])) for k in ("val_accuracy", "test_accuracy")]
        safe.call("best metrics", client.log_batch, run_id, metrics=metrics)
        for name in ("best.json", "trials.csv", "sweep.png"):
            if (out / name).exists():
                safe.call(name, client.log_artifact, run_id, str(out / name))
        safe.call("best checkpoint", log_checkpoint, client, run_id, best["checkpoint"])
        safe.call("end", client.set_terminated, run_id, "FINISHED")
        if safe.broken:
            if sweep.register:
                echo(f"[cnnray] not registered: the tracker at {handle['uri']} stopped answering")
            return
    if sweep.register:
        register_checkpoint(handle["uri"], sweep.register, None if run_id else best["checkpoint"], tags,
                            run_id=run_id, experiment=handle.get("experiment"), run_name=f"register {out.name}", echo=echo)
