"""A real `mlflow server` for the tracking tests: one per session, on 127.0.0.1.

The server (the full `mlflow` package) cannot share cnnray's environment: its pins clash
with cnnray's constraints (pyarrow, cryptography). So it runs from its own virtualenv:
$CNNRAY_MLFLOW_SERVER (the path of an `mlflow` executable), else the one `.ci/run`
prepares in ~/.cache/cnnray-test/mlflow-venv. Without either, these tests skip, saying so.
cnnray itself talks to it with the `mlflow-skinny` client of the `test` extra.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.processes import free_port, log_tail


@pytest.fixture(autouse=True)
def _mlflow_uris_restored(monkeypatch):
    """Each test ends with the MLflow URIs in the environment as it found them: Ray's
    MLflowLoggerCallback (the sweep's child runs) calls mlflow.set_tracking_uri and
    set_registry_uri, which also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI; a later
    test's `cnnray serve --model-store models:/...` inherited that registry (of a server
    already stopped) and failed to reach it."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)

SERVER_VENV = Path.home() / ".cache" / "cnnray-test" / "mlflow-venv"
SERVER_ENV = "CNNRAY_MLFLOW_SERVER"
START_TIMEOUT_S = 180  # a cold start imports Flask, FastAPI and SQLAlchemy and migrates the database


def server_executable() -> str | None:
    given = os.environ.get(SERVER_ENV)
    if given:
        return given if shutil.which(given) else None
    candidate = SERVER_VENV / "bin" / "mlflow"
    return str(candidate) if candidate.exists() else None


def start_server(tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    exe = server_executable()
    if exe is None:
        pytest.skip(f"no MLflow server: set ${SERVER_ENV} to an `mlflow` executable, or run .ci/run "
                    f"(it installs mlflow into {SERVER_VENV})")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "server.log"
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination",
         str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited:\n{log_tail(log)}")
        try:
            if requests.get(uri + "/health", timeout=2).status_code == 200:
                return proc, uri, log
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"mlflow server did not answer in {START_TIMEOUT_S} s:\n{log_tail(log)}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """The server and its workers (its own process group, started by this test session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """The tracking URI of a session-wide `mlflow server` (SQLite, artifacts in a temp dir)."""
    pytest.importorskip("mlflow", reason="the MLflow client (mlflow-skinny, in the test extra) is not installed")
    proc, uri, _ = start_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_server(proc)


@pytest.fixture()
def mlflow_client(mlflow_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


def runs_of(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], max_results=100)
