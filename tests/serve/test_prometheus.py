"""A real Prometheus (Debian's `prometheus`) scrapes a running `cnnray serve` and a training
run's Ray metrics endpoint; the served request count is read back through Prometheus's
HTTP query API, and every panel query of the Grafana dashboard (cluster/grafana/) returns
data. Skips, saying why, where the `prometheus` binary is missing (.ci/run installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import requests

from tests.helpers import REPO
from tests.helpers.processes import free_port, spawn_cnnray, wait_http
from tests.helpers.serve import MNIST_INFO, png, save_model

pytestmark = pytest.mark.slow

DASHBOARD = REPO / "cluster" / "grafana" / "cnnray.json"
RATE_INTERVAL = "20s"  # what Grafana's $__rate_interval becomes here (scrapes every 1 s)


def _stop(proc: subprocess.Popen, sig: int = 2) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/query_range",
                         params={"query": expr, "start": start, "end": end, "step": "2s"}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]


def _panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    queries = _panel_queries()
    assert any("cnnray_serve_requests_total" in q for _, q in queries)
    assert any("ray_cnnray_train_" in q for _, q in queries)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_scrapes_serve_and_training_and_every_panel_has_data(local_ray, mnist_dir, tmp_path):
    binary = shutil.which("prometheus")
    if not binary:
        pytest.skip("Debian's `prometheus` is not installed (apt-get install prometheus; .ci/run does)")
    import ray

    from cnnray.config import TrainConfig
    from cnnray.train.driver import run_training

    started = time.time()
    # 1. cnnray serve, as a user runs it (its own local Ray, the fast ingress).
    ck = save_model(tmp_path / "ck", "cnn", MNIST_INFO)
    serve_port = free_port()
    serve_url = f"http://127.0.0.1:{serve_port}"
    serve_log = tmp_path / "serve.log"
    serve = spawn_cnnray(["serve", "--checkpoint", str(ck), "--name", "digits", "--port", str(serve_port),
                          "--watch-s", "0", "--replicas", "1"], output=open(serve_log, "w"))
    prom_proc = None
    try:
        # 2. Prometheus: cnnray serve's /metrics and this session's Ray metrics endpoint.
        ray_port = next(int(n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"])
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: cnnray-serve\n    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]\n"
            f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{ray_port}']}}]\n"
        )
        prom_log = tmp_path / "prometheus.log"
        prom_proc = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=open(prom_log, "w"), stderr=subprocess.STDOUT,
        )
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_http(prom.url + "/-/ready", prom_proc, prom_log, "prometheus", timeout_s=60, every_s=1)

        # 3. A training run on the session's Ray while cnnray serve comes up.
        cfg = TrainConfig(model="cnn", dataset="mnist", data_dir=str(mnist_dir), workers=2, subset=2000,
                          epochs=2, batch_size=64, lr=0.05, out=str(tmp_path / "prom-run"), verbose=False)
        trained = threading.Thread(target=run_training, args=(cfg,), kwargs={"echo": lambda _: None}, daemon=True)
        trained.start()
        wait_http(serve_url + "/healthz", serve, serve_log, "cnnray serve", timeout_s=300, every_s=1)

        # 4. Traffic: 40 good requests and 5 refused ones, spread over a few seconds.
        # Connection: close: this client keeps no idle connection (the drain no longer waits for
        # idle ones, tests/robustness/test_serve_shutdown.py checks that; here it is not the point).
        image, close = png(np.zeros((28, 28), np.uint8)), {"Connection": "close"}
        for i in range(40):
            r = requests.post(f"{serve_url}/predictions/digits", data=image,
                              headers={"Content-Type": "image/png", **close}, timeout=60)
            assert r.status_code == 200, r.text
            if i % 8 == 0:
                assert requests.post(f"{serve_url}/predictions/nope", data=image, headers=close,
                                     timeout=60).status_code == 404
                time.sleep(0.5)
        trained.join(600)
        assert not trained.is_alive(), "the training run did not finish"

        # 5. The request count, read back through Prometheus's query API.
        deadline = time.monotonic() + 60
        while True:
            ok = prom.query('sum(cnnray_serve_requests_total{model="digits", status="200"})')
            refused = prom.query('sum(cnnray_serve_requests_total{status="404"})')
            got = (float(ok[0]["value"][1]) if ok else 0.0, float(refused[0]["value"][1]) if refused else 0.0)
            if got == (40.0, 5.0):
                break
            assert time.monotonic() < deadline, f"Prometheus has {got}, not (40, 5)"
            time.sleep(1)
        assert prom.query('up{job="ray"}')[0]["value"][1] == "1"

        # 6. Every panel of the dashboard has data over the test's time range.
        time.sleep(3)  # one more scrape of each target after the last request
        end = time.time()
        for title, expr in _panel_queries():
            expr = expr.replace("$__rate_interval", RATE_INTERVAL)
            result = prom.query_range(expr, started, end)
            values = [float(v) for series in result for _, v in series["values"]]
            assert values, f"panel {title!r}: no data for {expr}"
            assert not all(np.isnan(values)), f"panel {title!r}: only NaN for {expr}"
    finally:
        _stop(serve)
        if prom_proc is not None:
            _stop(prom_proc, 15)
    assert "[cnnray] stopping" in serve_log.read_text()
