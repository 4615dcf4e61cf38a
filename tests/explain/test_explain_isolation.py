"""Explanations kept apart from predictions under `cnnray serve` (cnnray/serve/explain_deployment.py):
the ExplainServer deployment's options as built, its process at low priority with one torch
thread, and the predict replica's side (RemoteExplain) answering every refusal with a readable
4xx/503. No Ray: the deployment's class runs in-process (or in a plain subprocess for the
niceness, which would otherwise lower the test runner's own priority), behind a stand-in handle."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO

MNIST = {"dataset": "mnist", "input_shape": [1, 28, 28], "classes": [str(i) for i in range(10)],
         "mean": [0.1307], "std": [0.3081]}
DIGIT = np.zeros((28, 28), dtype=np.uint8)
DIGIT[6:22, 12:16] = 255  # a "1"


def digit_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(DIGIT).save(buf, format="PNG")
    return buf.getvalue()


def cnn_checkpoint(directory: Path) -> Path:
    from cnnray.checkpoint import save_checkpoint
    from cnnray.models import build_model, resolve_model_args

    args = resolve_model_args("cnn", num_classes=10, in_channels=1, image_size=(28, 28))
    torch.manual_seed(0)
    return save_checkpoint(directory, model_name="cnn", model_args=args, state_dict=build_model("cnn", **args).state_dict(),
                           data_info=MNIST, epoch=1, config={"seed": 0}, metrics={"val_accuracy": 0.1})


def test_the_explain_deployment_is_bounded_low_priority_and_takes_no_cpu_from_the_replicas():
    from cnnray.serve.explain import EXPLAIN_MAX_PENDING, EXPLAIN_THREADS
    from cnnray.serve.explain_deployment import EXPLAIN_DEPLOYMENT, EXPLAIN_MAX_ONGOING, RETRY_AFTER_S, ExplainServer

    config = ExplainServer._deployment_config
    assert ExplainServer.name == EXPLAIN_DEPLOYMENT
    assert ExplainServer.num_replicas == 1
    assert EXPLAIN_THREADS == 1  # one explanation computing per explain replica; the rest wait inside it
    assert config.max_ongoing_requests == EXPLAIN_MAX_ONGOING >= EXPLAIN_MAX_PENDING
    assert config.max_queued_requests == EXPLAIN_MAX_PENDING  # the handle's queue, per predict replica
    assert (config.backpressure_config.status_code, config.backpressure_config.retry_after_s) == (429, RETRY_AFTER_S)
    assert ExplainServer.ray_actor_options == {"num_cpus": 0, "num_gpus": 0}


@pytest.mark.parametrize("explain", [True, False])
def test_build_app_binds_the_explain_deployment_only_when_explanations_are_on(tmp_path, explain):
    from cnnray.serve.app import build_app
    from cnnray.serve.explain_deployment import EXPLAIN_DEPLOYMENT
    from cnnray.serve.schemas import ServeArgs

    ck = cnn_checkpoint(tmp_path / "cnn")
    app = build_app(ServeArgs(checkpoints={"digits": str(ck)}, replicas=1, explain=explain))
    bound = app._bound_deployment.init_kwargs["explainer"]
    if explain:
        assert bound._bound_deployment.name == EXPLAIN_DEPLOYMENT
    else:
        assert bound is None


@pytest.mark.slow  # a fresh interpreter importing Ray Serve and torch: seconds idle, a minute on a loaded machine
def test_the_explain_replica_puts_every_thread_in_sched_idle_with_one_torch_thread(tmp_path):
    """Its __init__ in a fresh interpreter (as in the replica's actor process): every thread
    there, and one started later, in SCHED_IDLE at nice >= EXPLAIN_NICE; torch at one
    intra-op thread."""
    script = """
import json, os, threading, torch
torch.set_num_threads(2)
idle = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)  # one of 'Ray's' threads
idle.start()
before = os.getpriority(os.PRIO_PROCESS, idle.native_id)
from cnnray.serve.explain_deployment import ExplainServer
server = ExplainServer.func_or_class()
later = {}
def probe():
    later.update(nice=os.getpriority(os.PRIO_PROCESS, 0), idle=os.sched_getscheduler(0) == os.SCHED_IDLE)
t = threading.Thread(target=probe)
t.start(); t.join()
tids = [int(tid) for tid in os.listdir("/proc/self/task")]
nices = [os.getpriority(os.PRIO_PROCESS, tid) for tid in tids]
idle = [os.sched_getscheduler(tid) == os.SCHED_IDLE for tid in tids]
print(json.dumps({"before": before, "threads": nices, "idle": idle, "later": later, "torch": torch.get_num_threads(),
                  "reniced": server.threads_reniced, "pool": server.service._pool._max_workers}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from cnnray.serve.explain import EXPLAIN_NICE

    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    if seen["before"] >= EXPLAIN_NICE:
        pytest.skip(f"the test runs at nice {seen['before']} already: nothing to lower")
    assert seen["reniced"] >= 2 and all(n >= EXPLAIN_NICE for n in seen["threads"]) and all(seen["idle"]), seen
    assert seen["later"] == {"nice": seen["later"]["nice"], "idle": True} and seen["later"]["nice"] >= EXPLAIN_NICE
    assert seen["torch"] == 1 and seen["pool"] == 1, seen  # one torch thread, one explanation computing


class StandInHandle:
    """A DeploymentHandle's shape (handle.explain.remote(...) is awaitable): answers with
    `answer` (an exception is raised) or, with `server`, calls the deployment's method."""

    def __init__(self, answer=None, server=None) -> None:
        self.answer, self.server, self.explain = answer, server, self
        self.calls: list[tuple] = []

    def remote(self, *args):
        self.calls.append(args)
        return self._call(*args)

    async def _call(self, *args):
        if self.server is not None:
            return await self.server.explain(*args)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@pytest.fixture(scope="module")
def app_over(tmp_path_factory):
    """A TestClient over the HTTP app whose explanations go through RemoteExplain(handle)."""
    from fastapi.testclient import TestClient

    from cnnray.serve.api import build_http_app
    from cnnray.serve.engine import LocalBackend
    from cnnray.serve.schemas import ModelRef

    ck = cnn_checkpoint(tmp_path_factory.mktemp("isolation") / "cnn")
    backend = LocalBackend({"digits": ModelRef(path=str(ck), version=3)}, explain=False)
    with TestClient(build_http_app(backend)) as client:
        def over(handle):
            from cnnray.serve.explain_deployment import RemoteExplain

            backend.explainer = RemoteExplain(handle)
            return client

        yield over, ck


def post(client, query: str = ""):
    return client.post(f"/v1/models/digits:explain{query}", content=digit_png(), headers={"Content-Type": "image/png"})


def explain_server():
    """The deployment's class without its __init__ (which would renice this test process)."""
    from cnnray.serve.explain import ExplainService
    from cnnray.serve.explain_deployment import ExplainServer

    server = ExplainServer.func_or_class.__new__(ExplainServer.func_or_class)
    server.service, server._models = ExplainService(), OrderedDict()  # one thread, as in __init__
    return server


def test_the_explain_deployment_answers_the_model_version_the_predict_replica_serves(app_over):
    over, ck = app_over
    handle = StandInHandle(server=explain_server())
    r = post(over(handle), "?methods=occlusion")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"]) == ("digits", 3) and set(body["explanations"]) == {"occlusion"}
    name, path, version, _payload, query = handle.calls[0]
    assert (name, path, version, query) == ("digits", str(ck), 3, {"methods": "occlusion"})
    bad = post(over(handle), "?layers=conv9")  # a refusal in the explain replica comes back as it was
    assert bad.status_code == 400 and "unknown layer 'conv9'" in bad.json()["error"]


@pytest.mark.parametrize("case", ["queue full", "replica gone", "model gone"])
def test_explain_refusals_reach_the_client_as_readable_answers(app_over, tmp_path, case):
    from ray.serve.exceptions import BackPressureError

    over, _ = app_over
    if case == "queue full":  # Serve's own refusal when the handle's queue is full
        handle = StandInHandle(BackPressureError(num_queued_requests=4, max_queued_requests=4, status_code=429))
        want, fragment = 429, "explanations already waiting for the explain replica (at most 4)"
    elif case == "replica gone":
        handle = StandInHandle(RuntimeError("actor died"))
        want, fragment = 503, "the explain replica cannot answer now"
    else:  # the checkpoint was removed after the predict replica loaded it
        server = explain_server()
        handle = StandInHandle(server=server)
        handle.remote = lambda name, path, version, payload, query: server.explain(
            name, str(tmp_path / "gone"), version, payload, query)
        want, fragment = 503, "explain: cannot load digits version 3"
    r = post(over(handle))
    assert r.status_code == want, r.text
    assert fragment in r.json()["error"]
    assert (r.headers.get("Retry-After") == "1") == (want == 429)
    assert str(tmp_path) not in r.text  # no server path in the answer


def test_the_benchmark_compares_alternating_rounds_against_the_baselines_spread():
    """benchmarks/explain_load.summarize on made-up rounds A B A B A B (no server, no timing)."""
    from benchmarks.explain_load import summarize
    from benchmarks.serve_load import LoadResult

    def row(rate: float) -> LoadResult:
        return LoadResult(server="s", api="torchserve", requests=100, concurrency=4, seconds=100 / rate,
                          requests_per_s=rate, p50_ms=10.0, p99_ms=40.0, errors=0, accuracy=1.0)

    explain = [{"explained": 5, "statuses": {200: 5}, "errors": []}, {"explained": 3, "statuses": {200: 3, 429: 1},
                                                                      "errors": []}, {"explained": 0, "statuses": {}, "errors": ["x"]}]
    s = summarize([row(r) for r in (400, 380, 500, 450, 450, 470)], explain, clients=2)
    assert s["A"]["predictions_per_s"] == [400, 500, 450] and s["B"]["predictions_per_s"] == [380, 450, 470]
    assert (s["A"]["mean"], s["B"]["mean"], s["ratio"]) == (450.0, 433.3, 0.963)
    assert s["pair_ratios"] == [0.95, 0.9, 1.044] and s["within_noise"]
    assert (s["pair_ratio_mean"], s["pair_ratio_stdev"], s["pair_ratio_sem"]) == (0.965, 0.073, 0.042)
    assert s["explain"]["explained"] == 8 and s["explain"]["statuses"] == {200: 8, 429: 1}
    slower = summarize([row(r) for r in (400, 300, 500, 350, 450, 390)], explain, clients=2)
    assert slower["B"]["mean"] < slower["A"]["min"] and not slower["within_noise"]
