"""`cnnray train --tracking mlflow` against a real `mlflow server`, read back with MlflowClient."""

from __future__ import annotations

import json
import socket
import subprocess
import threading

import pytest

from cnnray.config import TrainConfig
from cnnray.tracking.params import EPOCH_METRICS
from tests.helpers.processes import free_port, spawn_cnnray
from tests.tracking.conftest import runs_of

pytestmark = pytest.mark.slow
SMALL = ["--subset", "300", "--model", "lenet5", "--schedule", "constant", "--lr", "0.05"]


def train(args, mnist_dir, data_cache, timeout=300):
    proc = spawn_cnnray(["train", "--data-dir", str(mnist_dir), *SMALL, *args], data_home=data_cache)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def only_run(client, experiment):
    runs = runs_of(client, experiment)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def check_run(client, run, epochs):
    assert run.info.status == "FINISHED"
    assert set(run.data.params) >= set(TrainConfig().to_dict()), "every TrainConfig field is a param"
    for key in ("val_accuracy", "train_loss", "train_accuracy", "samples_per_second", "epoch_seconds", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, epochs + 1)), key
    assert "test_accuracy" in run.data.metrics
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"result.json", "checkpoint"} <= files
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} >= {"checkpoint/meta.json", "checkpoint/model.pt"}


def test_local_mode_run_and_resume_are_one_mlflow_run(mlflow_server, mlflow_client, mnist_dir, data_cache, tmp_path):
    out = tmp_path / "local"
    common = ["--out", str(out), "--tracking", "mlflow", "--tracking-uri", mlflow_server, "--experiment", "local"]
    code, log = train([*common, "--epochs", "2"], mnist_dir, data_cache)
    assert code == 0, log
    run = only_run(mlflow_client, "local")
    assert run.info.run_id == json.loads((out / "mlflow.json").read_text())["run_id"]
    assert "report" in {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}

    code, log = train([*common, "--epochs", "3", "--resume", "--no-report"], mnist_dir, data_cache)
    assert code == 0, log
    assert f"continuing MLflow run {run.info.run_id}" in log
    run = only_run(mlflow_client, "local")  # the same run, one epoch longer
    check_run(mlflow_client, run, epochs=3)
    assert run.data.params["epochs"] == "2" and run.data.tags["cnnray.resumed.epochs"] == "3"


def test_two_ray_train_workers_log_one_run(mlflow_server, mlflow_client, mnist_dir, data_cache, tmp_path):
    code, log = train(["--out", str(tmp_path / "ray2"), "--workers", "2", "--cpus-per-worker", "1", "--epochs", "2",
                       "--no-report", "--tracking", "mlflow", "--tracking-uri", mlflow_server, "--experiment", "ray2"],
                      mnist_dir, data_cache, timeout=400)
    assert code == 0, log
    run = only_run(mlflow_client, "ray2")
    check_run(mlflow_client, run, epochs=2)
    assert run.data.params["workers"] == "2"


def test_unreachable_tracker_exits_2_before_training(mnist_dir, data_cache, tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "nowhere"
    code, log = train(["--out", str(out), "--tracking", "mlflow", "--tracking-uri", f"http://127.0.0.1:{free_port()}"],
                      mnist_dir, data_cache, timeout=120)
    lines = [line for line in log.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cnnray: error: MLflow tracking URI"), log
    assert not (out / "ray").exists() and not (out / "result.json").exists()


class Proxy:
    """A TCP forwarder to the server that can be cut: a tracker going away mid-run."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        try:  # on Linux only shutdown wakes the blocked accept(); close alone leaves it accepting
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_tracker_gone_mid_run_warns_once_and_training_finishes(mlflow_server, mlflow_client, mnist_dir, data_cache, tmp_path):
    proxy = Proxy(int(mlflow_server.rsplit(":", 1)[1]))
    out = tmp_path / "cut"
    proc = spawn_cnnray(["train", "--data-dir", str(mnist_dir), *SMALL, "--epochs", "3", "--out", str(out), "--no-report",
                         "--tracking", "mlflow", "--tracking-uri", f"http://127.0.0.1:{proxy.port}", "--experiment", "cut"],
                        data_home=data_cache)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[cnnray] MLflow run "):  # the run exists: the tracker goes away before epoch 1
            proxy.cut()
    assert proc.wait(timeout=300) == 0, "".join(lines)
    warnings = [line for line in lines if "warning: MLflow tracking" in line]
    assert len(warnings) == 1, "".join(lines)
    assert json.loads((out / "result.json").read_text())["epochs"] == 3
    run = only_run(mlflow_client, "cut")
    assert run.info.status == "RUNNING"  # nobody could tell the tracker the run ended
    assert mlflow_client.get_metric_history(run.info.run_id, "val_accuracy") == []
