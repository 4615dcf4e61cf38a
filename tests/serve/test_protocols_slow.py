"""A real `cnnray serve` (Ray Serve, the fast HAProxy ingress, --grpc-port, --replicas 1-2) called
by tritonclient's HTTP and gRPC clients, by curl -F, and put under load to see it scale out and in.

One server for the module: a model store holding "digits" versions 1 and 2 (2 is served),
autoscaling between 1 and 2 replicas with short delays so the last test takes seconds, and
replicas that report their load every 0.5 s (Ray's default is 10 s)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.helpers.processes import free_port, log_tail, spawn_cnnray, wait_http
from tests.serve.conftest import digit_pngs
from tests.helpers.serve import MNIST_INFO, save_model

pytestmark = pytest.mark.slow


@dataclass
class Server:
    url: str
    http: str  # host:port for tritonclient.http
    grpc: str  # host:port for tritonclient.grpc
    proc: subprocess.Popen
    log: object
    pngs: list[bytes]
    pixels: np.ndarray


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cnnray.store import export

    root = tmp_path_factory.mktemp("protocols")
    store = root / "store"
    export(save_model(root / "v1", "cnn", MNIST_INFO, seed=1), store, "digits")
    export(save_model(root / "v2", "cnn", MNIST_INFO, seed=2), store, "digits")
    port, grpc_port = free_port(), free_port()
    log = open(root / "serve.log", "w+")
    push = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"
    saved = os.environ.get(push)
    os.environ[push] = "0.5"  # read by the replicas as Ray starts them
    try:
        proc = spawn_cnnray(["serve", "--model-store", str(store), "--port", str(port), "--grpc-port", str(grpc_port),
                             "--replicas", "1-2", "--upscale-delay-s", "1", "--downscale-delay-s", "2",
                             "--watch-s", "0", "--max-body-mb", "1"], output=log)
    finally:
        os.environ.pop(push) if saved is None else os.environ.__setitem__(push, saved)
    url = f"http://127.0.0.1:{port}"
    pngs, pixels = digit_pngs(4, seed=5)
    try:
        wait_http(url + "/v2/health/ready", proc, log, "cnnray serve", timeout_s=300)
        deadline = time.monotonic() + 60  # the start-up lines follow the first answers
        while "press Ctrl-C" not in log_tail(log, 50_000) and time.monotonic() < deadline:
            time.sleep(0.2)
        yield Server(url, f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", proc, log, pngs, pixels)
    finally:
        from benchmarks.serve_load import stop

        code = stop(proc)
        assert code == 130, log_tail(log)  # Ctrl-C: drained, stopped, exit 130


def predictions(server: Server) -> tuple[np.ndarray, list[str]]:
    """/predictions/digits for each PNG: the TorchServe route's answers."""
    answers = [requests.post(f"{server.url}/predictions/digits", data=p, headers={"Content-Type": "image/png"},
                             timeout=60).json() for p in server.pngs]
    return np.array([a["probabilities"] for a in answers], np.float32), [a["label"] for a in answers]


def texts(labels) -> list[str]:
    return [b.decode() if isinstance(b, bytes) else b for b in labels]


def test_the_server_says_where_grpc_is(server):
    text = log_tail(server.log, 50_000)
    assert f"OIP v2 gRPC (inference.GRPCInferenceService) at 127.0.0.1:{server.grpc.split(':')[1]}" in text
    assert "1-2 replicas (autoscaling), ingress: fast (HAProxy" in text


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_health_metadata_and_versions(server, protocol):
    import importlib

    tc = importlib.import_module(f"tritonclient.{protocol}")
    client = tc.InferenceServerClient(getattr(server, protocol))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "2")
    assert not client.is_model_ready("digits", "1")  # in the store, not served
    meta = client.get_model_metadata("digits", as_json=True) if protocol == "grpc" else client.get_model_metadata("digits")
    assert meta["versions"] == ["2"]
    assert [(i["name"], i["datatype"], [int(s) for s in i["shape"]]) for i in meta["inputs"]] == [
        ("pixels", "FP32", [-1, 1, 28, 28]), ("images", "BYTES", [-1])]
    with pytest.raises(tc.InferenceServerException, match="version 1 is not served; serving version 2"):
        client.get_model_metadata("digits", "1")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_answers_as_predictions(server, protocol, binary):
    import base64
    import importlib

    tc = importlib.import_module(f"tritonclient.{protocol}")
    client = tc.InferenceServerClient(getattr(server, protocol))
    kw = {"binary_data": binary} if protocol == "http" else {}
    want, labels = predictions(server)
    pixels = tc.InferInput("pixels", list(server.pixels.shape), "FP32")
    pixels.set_data_from_numpy(server.pixels, **kw)
    # JSON carries no raw bytes: there each BYTES element is the file in base64.
    files = server.pngs if binary or protocol == "grpc" else [base64.b64encode(p) for p in server.pngs]
    images = tc.InferInput("images", [len(files)], "BYTES")
    images.set_data_from_numpy(np.array(files, dtype=object), **kw)
    outputs = [tc.InferRequestedOutput(n, **kw) for n in ("probabilities", "labels")]
    for inp in (pixels, images):
        result = client.infer("digits", [inp], model_version="2", outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=1e-5, atol=1e-7)
        assert texts(result.as_numpy("labels")) == labels


@pytest.mark.parametrize("protocol,status", [("http", "400"), ("grpc", "StatusCode.INVALID_ARGUMENT")])
def test_tritonclient_wrong_name_shape_datatype_and_version(server, protocol, status):
    import importlib

    tc = importlib.import_module(f"tritonclient.{protocol}")
    client = tc.InferenceServerClient(getattr(server, protocol))
    x = np.zeros((1, 1, 28, 28), np.float32)
    cases = [("pixelz", x, "FP32", "unknown input 'pixelz'"),
             ("pixels", np.zeros((1, 1, 28, 27), np.float32), "FP32", "expected [N, 1, 28, 28]"),
             ("pixels", x.astype(np.int32), "INT32", "datatype 'INT32'; expected FP32")]
    for name, data, datatype, says in cases:
        inp = tc.InferInput(name, list(data.shape), datatype)
        inp.set_data_from_numpy(data)
        with pytest.raises(tc.InferenceServerException) as e:
            client.infer("digits", [inp])
        assert e.value.status() == status and says in e.value.message(), (e.value.status(), e.value.message())
    inp = tc.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(tc.InferenceServerException, match="version 1 is not served"):
        client.infer("digits", [inp], model_version="1")


def test_hostile_requests_get_4xx_on_the_real_server(server):
    import tritonclient.grpc as grpcclient

    head = b'{"inputs":[{"name":"pixels","datatype":"FP32","shape":[1000000000000,1,28,28],"parameters":{"binary_data_size":8}}]}'
    r = requests.post(f"{server.url}/v2/models/digits/infer", data=head + bytes(8),
                      headers={"Inference-Header-Content-Length": str(len(head))}, timeout=60)
    assert r.status_code == 400 and "at most 64 per request" in r.json()["error"]
    r = requests.post(f"{server.url}/v2/models/digits/infer", data=head[:-20],
                      headers={"Inference-Header-Content-Length": "99999"}, timeout=60)
    assert r.status_code == 400 and "does not fit" in r.json()["error"]
    # A gRPC message over the body budget (--max-body-mb 1) is refused before it is parsed.
    big = np.zeros((400, 1, 28, 28), np.float32)  # 1.25 MB
    inp = grpcclient.InferInput("pixels", list(big.shape), "FP32")
    inp.set_data_from_numpy(big)
    with pytest.raises(grpcclient.InferenceServerException) as e:
        grpcclient.InferenceServerClient(server.grpc).infer("digits", [inp])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", e.value.message()


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_form_upload_answers_as_the_raw_body(server, tmp_path):
    digit = tmp_path / "digit.png"
    digit.write_bytes(server.pngs[0])
    out = subprocess.run(["curl", "-sS", "-F", f"data=@{digit}", f"{server.url}/predictions/digits"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    raw = requests.post(f"{server.url}/predictions/digits", data=server.pngs[0], timeout=60).json()
    import json

    assert json.loads(out) == raw


# --- last: autoscaling (it leaves the server as it found it, one replica) ------------------------
def replicas_answering(url: str, probes: int = 20) -> set[str]:
    """The replicas that answer /healthz while two requests are held open (their bodies
    unsent). HAProxy sends each request to the replica with the fewest open connections
    (Ray's `leastconn`), so with two replicas the held ones land on both and the probes
    round-robin between them; with one, every probe reaches it."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    held = []
    try:
        for _ in range(2):
            s = socket.create_connection((where.hostname, where.port), timeout=30)
            s.sendall(b"POST /predictions/digits HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 100\r\n\r\n")
            held.append(s)
        time.sleep(0.2)  # let HAProxy open them to the replicas
        return {requests.get(url + "/healthz", timeout=30).json()["replica"] for _ in range(probes)}
    finally:
        for s in held:
            s.close()


def test_load_adds_a_replica_and_its_end_removes_it(server):
    assert len(replicas_answering(server.url)) == 1
    stop = threading.Event()
    errors: list[str] = []

    # Each request 32 images (the server, not these Python clients, is the bottleneck, so
    # every client has its request in flight at the replica nearly all the time).
    from cnnray.serve.oip_core import serialize_bytes

    blob = serialize_bytes(server.pngs * 8)
    head = ('{"inputs":[{"name":"images","datatype":"BYTES","shape":[32],"parameters":{"binary_data_size":%d}}]}'
            % len(blob)).encode()

    def client() -> None:  # one request in flight at a time, as fast as the server answers
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(f"{server.url}/v2/models/digits/infer", data=head + blob,
                           headers={"Inference-Header-Content-Length": str(len(head))}, timeout=60)
                if r.status_code != 200:
                    errors.append(r.text)

    # 32 clients: 32 requests in flight against a target of 16 per replica (cnnray.serve.autoscale).
    threads = [threading.Thread(target=client, daemon=True) for _ in range(32)]
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        while len(replicas_answering(server.url, 20)) < 2:
            assert time.monotonic() - start < 120, "no second replica after 120 s of load:\n" + log_tail(server.log)
            time.sleep(0.5)
        scaled_out = time.monotonic() - start
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    start = time.monotonic()
    while len(replicas_answering(server.url)) > 1:
        assert time.monotonic() - start < 120, "still two replicas 120 s after the load:\n" + log_tail(server.log)
        time.sleep(0.5)
    print(f"scaled out after {scaled_out:.1f} s of load, back to one replica {time.monotonic() - start:.1f} s after it")
