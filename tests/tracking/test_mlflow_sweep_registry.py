"""A sweep in MLflow (parent + a child per trial), the registry's champion rule, and
`cnnray serve` from `models:/NAME@champion` following the alias; a real `mlflow server`."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from tests.helpers.processes import free_port, kill_group_with_stacks, log_tail, spawn_cnnray, wait_http
from tests.tracking.conftest import runs_of

pytestmark = pytest.mark.slow
SMALL = ["--subset", "300", "--model", "lenet5", "--schedule", "constant"]
MODEL = "digits"  # registered by hand (cnnray register); the sweep registers SWEEP_MODEL
SWEEP_MODEL = "digits-sweep"


# The longest one command may take (seconds): the 3-trial sweep took 128 s on a quiet machine
# and about 3x that on the loaded 2-core CI machine; past this it is a hang, not a slow run.
COMMAND_TIMEOUT_S = 900


def run_cnnray(args, data_cache, timeout=COMMAND_TIMEOUT_S, env=None):
    """`cnnray ARGS` in a process group of its own, with its Ray under a temporary folder; past
    `timeout` the test fails with the stacks of its processes and where Ray's logs are, and
    the whole group (the command and its Ray) is killed: CI never waits for ever."""
    # Short (Ray's socket paths must stay under 107 characters), kept when the command hangs.
    ray_tmp = tempfile.mkdtemp(prefix="cnnray-ray-", dir="/tmp")
    env = {"RAY_TMPDIR": ray_tmp, **(env or {})}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = spawn_cnnray(args, data_home=data_cache, new_session=True)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = kill_group_with_stacks(proc)
        out, _ = proc.communicate()
        pytest.fail(f"`cnnray {' '.join(args[:1])}` did not finish in {timeout} s; its process group was killed. "
                    f"Ray's logs: {ray_tmp}/ray/session_*/logs\n--- output (end)\n{out[-3000:]}\n--- stacks\n{stacks}")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return proc.returncode, out


@pytest.fixture(scope="module")
def sweep(mlflow_server, mnist_dir, data_cache, tmp_path_factory):
    """One 3-trial sweep, tracked, its winner registered as SWEEP_MODEL version 1. No ASHA, so
    that every child ends "finished"; the "stopped early" reason is checked by test_stop_reasons."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    code, log = run_cnnray(["tune", "--data-dir", str(mnist_dir), *SMALL, "--epochs", "2", "--samples", "3", "--scheduler", "none",
                            "--out", str(out), "--tracking", "mlflow", "--tracking-uri", mlflow_server,
                            "--experiment", "sweep", "--register", SWEEP_MODEL], data_cache)
    assert code == 0, log
    return out, log


@pytest.fixture(scope="module")
def registered(mlflow_server, mnist_dir, data_cache, tmp_path_factory):
    """A trained run registered by `cnnray register` as MODEL version 1 (the champion)."""
    run = tmp_path_factory.mktemp("good") / "good"
    code, log = run_cnnray(["train", "--data-dir", str(mnist_dir), *SMALL, "--lr", "0.05", "--epochs", "2",
                            "--out", str(run), "--no-report"], data_cache)
    assert code == 0, log
    code, log = run_cnnray(["register", str(run), "--name", MODEL, "--tracking-uri", mlflow_server], data_cache)
    assert code == 0 and f"registered {MODEL} version 1" in log and "no champion yet" in log, log
    return run


def test_registering_a_worse_model_leaves_the_champion(registered, mlflow_server, mlflow_client, mnist_dir, data_cache, tmp_path):
    first = mlflow_client.get_model_version_by_alias(MODEL, "champion")
    assert first.version == "1" and first.tags["dataset"] == "mnist"
    assert float(first.tags["val_accuracy"]) == json.loads((registered / "result.json").read_text())["best_val_accuracy"]

    # A worse model: a learning rate too small to learn anything in two epochs.
    run = tmp_path / "worse"
    code, log = run_cnnray(["train", "--data-dir", str(mnist_dir), *SMALL, "--lr", "1e-6", "--epochs", "2",
                            "--out", str(run), "--no-report"], data_cache)
    assert code == 0, log
    code, log = run_cnnray(["register", str(run), "--name", MODEL, "--tracking-uri", mlflow_server], data_cache)
    assert code == 0, log
    assert f"registered {MODEL} version 2" in log and "champion stays" in log, log
    assert mlflow_client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert mlflow_client.get_model_version(MODEL, "2").tags["val_accuracy"] == repr(
        json.loads((run / "result.json").read_text())["best_val_accuracy"])


def served_version(url):
    import requests

    return requests.get(f"{url}/v1/models/{MODEL}", timeout=10).json()["version"]


def test_serve_follows_the_champion_alias(registered, mlflow_server, mlflow_client, data_cache, tmp_path):
    import numpy as np
    import requests
    from PIL import Image

    if "2" not in {v.version for v in mlflow_client.search_model_versions(f"name = '{MODEL}'")}:
        pytest.skip("needs version 2 from test_registering_a_worse_model_leaves_the_champion")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_REGISTRY_URI": mlflow_server, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = spawn_cnnray(["serve", "--model-store", f"models:/{MODEL}@champion", "--port", str(port),
                             "--replicas", "1", "--watch-s", "1", "--ingress", "proxy"], output=log)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        wait_http(f"{url}/v1/models/{MODEL}", proc, log, "cnnray serve")
        assert served_version(url) == 1
        png = io.BytesIO()
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(png, format="PNG")
        r = requests.post(f"{url}/predictions/{MODEL}", data=png.getvalue(), headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text

        mlflow_client.set_registered_model_alias(MODEL, "champion", "2")  # as the MLflow UI does
        deadline = time.monotonic() + 120
        while served_version(url) != 2:
            assert time.monotonic() < deadline, log_tail(log)
            time.sleep(1)
        r = requests.post(f"{url}/predictions/{MODEL}", data=png.getvalue(), headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        mlflow_client.set_registered_model_alias(MODEL, "champion", "1")


@pytest.mark.parametrize("store", ["models:/no-such-model@champion", f"models:/{MODEL}@no-such-alias"])
def test_unknown_registry_model_or_alias_exits_2(registered, mlflow_server, data_cache, tmp_path, store):
    code, log = run_cnnray(["serve", "--model-store", store, "--port", str(free_port())], data_cache, timeout=120,
                           env={"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_REGISTRY_URI": mlflow_server, "XDG_CACHE_HOME": str(tmp_path)})
    lines = [line for line in log.splitlines() if line.strip()]
    what = "'no-such-model' has no alias 'champion'" if "no-such-model" in store else f"'{MODEL}' has no alias 'no-such-alias'"
    assert code == 2 and len(lines) == 1, log
    assert lines[0] == f"cnnray: error: model registry at {mlflow_server}: registered model {what}", log


def test_sweep_is_a_parent_with_a_child_per_trial(sweep, mlflow_client):
    out, log = sweep
    runs = runs_of(mlflow_client, "sweep")
    parent_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    parents = [r for r in runs if r.info.run_id == parent_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(parents) == 1 and len(children) == 3, [(r.info.run_name, r.data.tags) for r in runs]
    assert parents[0].info.status == "FINISHED" and "best_val_accuracy" in parents[0].data.metrics
    assert {"best.json", "trials.csv", "checkpoint"} <= {a.path for a in mlflow_client.list_artifacts(parent_id)}
    for child in children:
        reason = child.data.tags["stop_reason"]
        assert reason == "finished", reason
        assert [m.step for m in mlflow_client.get_metric_history(child.info.run_id, "val_accuracy")] == [1, 2]
        assert "lr" in child.data.params  # the swept values
    assert len({c.data.tags["trial_id"] for c in children}) == 3
    first = mlflow_client.get_model_version_by_alias(SWEEP_MODEL, "champion")
    assert first.version == "1" and "no champion yet" in log, log
    assert float(first.tags["val_accuracy"]) == json.loads((out / "best.json").read_text())["val_accuracy"]
    assert first.tags["dataset"] == "mnist" and "swept.lr" in first.tags
