"""The MLflow client as cnnray uses it: which tracking URI, whether it answers, and
logging that warns once and goes on when the tracker goes away.

The `mlflow` package here is `mlflow-skinny` (the `cnnray[mlflow]` extra): the client
only, no server.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from cnnray.config import ConfigError

DEFAULT_EXPERIMENT = "cnnray"
# With no URI given: MLflow's own default kind of store (SQLite; its file store is
# deprecated), in the run folder, with the artifacts beside it (not in the working directory).
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
# How long a pre-flight look at the tracker may take (seconds), and the client's settings
# while training: a request that does not answer in REQUEST_TIMEOUT_S seconds is retried
# RETRIES times, then tracking is given up for the run (MLflow's defaults: 120 s and 7
# retries with exponential back-off, minutes of a stalled epoch for a tracker that is gone).
CHECK_TIMEOUT_S = 15
REQUEST_TIMEOUT_S = 20
RETRIES = 1


def resolve_uri(uri: str | None, out: str | Path) -> str:
    """The tracking URI: `uri`, else $MLFLOW_TRACKING_URI, else SQLite in <out>/mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(Path(out) / LOCAL_DB).resolve()}"


def local_artifacts(uri: str) -> str | None:
    """Where a SQLite store's experiments keep their artifacts: beside its file (MLflow's
    default would be ./mlruns in whatever folder the command ran in); None for a server."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / LOCAL_ARTIFACTS).resolve().as_uri()


def mlflow_module():
    """`import mlflow`, or ConfigError saying which extra to install."""
    try:
        import mlflow
    except ModuleNotFoundError:
        raise ConfigError("tracking with MLflow needs its client: pip install 'cnnray[mlflow]'") from None
    return mlflow


def quiet_client_settings(timeout_s: int = REQUEST_TIMEOUT_S, retries: int = RETRIES) -> None:
    """Short timeouts and few retries for this process's MLflow requests, unless the user
    set them ($MLFLOW_HTTP_REQUEST_TIMEOUT, $MLFLOW_HTTP_REQUEST_MAX_RETRIES)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))


def client_for(uri: str):
    mlflow_module()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str) -> None:
    """ConfigError (one line) unless the tracker at `uri` answers a search within
    CHECK_TIMEOUT_S seconds, without retries: asked before Ray starts or any data loads."""
    mlflow_module()
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    saved = {v.name: os.environ.get(v.name) for v in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)}
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = "0"
    os.environ[MLFLOW_HTTP_REQUEST_TIMEOUT.name] = str(CHECK_TIMEOUT_S)
    try:
        client_for(uri).search_experiments(max_results=1)
    except Exception as e:  # MlflowException, requests' errors, a bad scheme: all one line
        raise ConfigError(f"MLflow tracking URI {uri} does not answer: {first_line(e)}") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def experiment_id(client: Any, name: str | None, uri: str) -> str:
    """The id of experiment `name` (default "cnnray") on the tracker at `uri`, created when missing."""
    name = name or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ConfigError(f"MLflow experiment {name!r} is deleted: restore it or choose another --experiment")
        return found.experiment_id
    return client.create_experiment(name, artifact_location=local_artifacts(uri))


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# One warning per process: the driver and rank 0 of a local-mode run share it.
_warned = threading.Event()


class SafeLogger:
    """Calls into MLflow that never raise: the first failure prints one warning line and
    turns every later call of this logger into a no-op (a tracker that went away does not
    come back mid-run, and each retry would stall the epoch). `goes_on` names what carries
    on without tracking ("training", "the sweep")."""

    def __init__(self, uri: str, echo: Callable[[str], None] | None = None, goes_on: str = "training") -> None:
        self.uri = uri
        self.broken = False
        self.goes_on = goes_on
        self._echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (tracking must never fail the training run)
            self.give_up(what, first_line(e))
            return None

    def give_up(self, what: str, why: str) -> None:
        """Stop tracking with this logger, saying once per process what failed and why."""
        self.broken = True
        if not _warned.is_set():
            _warned.set()
            self._echo(f"[cnnray] warning: MLflow tracking at {self.uri} failed ({what}: {why}); "
                       f"{self.goes_on} goes on without it")
