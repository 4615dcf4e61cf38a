"""Hostile clients and careless colleagues against cnnray serve (issue 12).

Each test is one example of a kind of fault: a request whose cost is unbounded, a slow or
stalled client, an oversized upload, a model whose output is not finite, whatever appears
in a model store, files only their creator can read, a lying meta.json, server paths in
error texts. Each runs against the in-process app (the same FastAPI app and backend
protocol as a replica, served by uvicorn on a free loopback port in this process) and the
slow ones (stalled clients, oversized uploads, the model store) again against a real
`cnnray serve` on Ray Serve (`slow` marker).

While each attack runs, a probe measures GET /healthz. The target is p99 <= 100 ms; on the
shared 2-core CI machine timings are noisy, so the tests assert that every probe answers
and that p99 stays within a generous `HEALTH_P99_BOUND_S` (an attack that blocks the event
loop, as decoding on it did, delays it by seconds), and print the measured p99.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.helpers import REPO
from tests.helpers.processes import free_port, log_tail, spawn_cnnray, wait_http
from tests.helpers.serve import BAD, MNIST_INFO, LocalServer, png, save_model

HEALTH_P99_BOUND_S = 1.0  # generous: the target is 0.1 s; a blocked event loop shows as seconds
BODY_TIMEOUT_S = 2.0  # the in-process app's body timeout (the default is 10 s)
NOISE = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)


# --- helpers ------------------------------------------------------------------------------------
class HealthProbe:
    """GET /healthz every `every_s` seconds in a thread while an attack runs: latencies and failures."""

    def __init__(self, url: str, every_s: float = 0.05) -> None:
        self.url, self.every_s = url + "/healthz", every_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                r = requests.get(self.url, timeout=30)
                if r.status_code != 200:
                    self.failures.append(f"status {r.status_code}")
            except requests.RequestException as e:
                self.failures.append(type(e).__name__)
            self.latencies.append(time.perf_counter() - start)
            self._stop.wait(self.every_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        deadline = time.monotonic() + 10
        while len(self.latencies) < 3 and time.monotonic() < deadline:  # a quick attack: a few probes more
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(60)

    def p99(self) -> float:
        return float(np.quantile(self.latencies, 0.99))

    def check(self, what: str) -> None:
        assert len(self.latencies) >= 3, f"{what}: too few /healthz probes ({len(self.latencies)})"
        assert not self.failures, f"{what}: /healthz failed during the attack: {self.failures[:5]}"
        p99 = self.p99()
        print(f"\n[healthz during {what}] n={len(self.latencies)} p50={np.median(self.latencies) * 1000:.1f} ms "
              f"p99={p99 * 1000:.1f} ms max={max(self.latencies) * 1000:.1f} ms")
        assert p99 < HEALTH_P99_BOUND_S, f"{what}: /healthz p99 {p99 * 1000:.0f} ms"


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def overflow_model(directory: Path) -> Path:
    """A `cnn` that answers a blank image (0 in, 0 out: no biases) but overflows to NaN on a
    bright one (weights x 1e20 per layer); mean 0 and std 1, so blank stays 0 when normalised."""
    from cnnray.models import build_model, resolve_model_args

    torch.manual_seed(0)
    model = build_model("cnn", **resolve_model_args("cnn"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else p * 1e20)
    return save_model(directory, "cnn", MNIST_INFO, model=model, mean=[0.0], std=[1.0])


def nan_model(directory: Path) -> Path:
    """A checkpoint whose weights are NaN, as a run that diverged in epoch 1 leaves."""
    from cnnray.models import build_model, resolve_model_args

    model = build_model("cnn", **resolve_model_args("cnn"))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return save_model(directory, "cnn", MNIST_INFO, model=model)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    from cnnray.serve.schemas import Limits, ModelRef

    root = tmp_path_factory.mktemp("hostile")
    models = {
        "digits": ModelRef(path=str(save_model(root / "digits", "cnn", MNIST_INFO)), version=1),
        "overflow": ModelRef(path=str(overflow_model(root / "overflow")), version=1),
    }
    server = LocalServer(models, Limits(body_timeout_s=BODY_TIMEOUT_S))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The app with its lean inference path and without it (FastAPI's router all the way),
    over the same models: (lean, plain)."""
    from cnnray.serve.schemas import Limits, ModelRef

    root = tmp_path_factory.mktemp("twins")
    models = {
        "digits": ModelRef(path=str(save_model(root / "digits", "cnn", MNIST_INFO)), version=1),
        "overflow": ModelRef(path=str(overflow_model(root / "overflow")), version=1),
    }
    servers = [LocalServer(models, Limits(body_timeout_s=BODY_TIMEOUT_S), lean=lean) for lean in (True, False)]
    yield servers
    for server in servers:
        server.stop()


def predict(url: str, model: str, instances: list, timeout: float = 60) -> requests.Response:
    return requests.post(f"{url}/v1/models/{model}:predict", json={"instances": instances}, timeout=timeout)


def post_json_bytes(url: str, body: bytes, timeout: float = 120) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout)


# --- 1. every request's cost is bounded before the work starts ----------------------------------
@pytest.mark.slow  # a server
def test_json_of_many_tiny_arrays_is_refused_before_it_is_parsed(local):
    # Just under 8 MiB of [[0],[0],...]: ~300 MB of Python lists once parsed, on the event loop.
    body = b'{"instances": [' + b",".join([b"[0]"] * (2 * 1024 * 1024 - 8)) + b"]}"
    assert len(body) < 8 * 1024 * 1024
    with HealthProbe(local.url) as probe:
        for _ in range(3):
            r = post_json_bytes(f"{local.url}/v1/models/digits:predict", body)
            assert r.status_code == 413, r.text
            assert "values" in r.json()["error"]
    probe.check("an 8 MiB JSON body of tiny arrays")


@pytest.mark.slow  # a server
def test_deeply_nested_json_is_refused(local):
    depth = 10_000  # within the values budget: refused for its depth
    body = b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"
    r = post_json_bytes(f"{local.url}/v1/models/digits:predict", body)
    assert r.status_code == 400 and "nested" in r.json()["error"], r.text


@pytest.mark.slow  # a server
def test_pixels_times_instances_are_bounded_before_decoding(local):
    big = io.BytesIO()
    Image.new("L", (4096, 4096)).save(big, format="PNG", optimize=True)  # ~16 KB each
    instances = [b64(big.getvalue())] * 64  # ~1.4 MB of JSON, 10-15 s of decoding
    with HealthProbe(local.url) as probe:
        start = time.perf_counter()
        r = predict(local.url, "digits", instances)
        took = time.perf_counter() - start
    assert r.status_code == 413, r.text
    assert "pixels per request" in r.json()["error"]
    print(f"\n[64 PNGs of 4096x4096] refused in {took * 1000:.0f} ms")
    probe.check("64 PNGs of 4096x4096 in one :predict")
    # one image of the largest size is still accepted (one request's whole budget)
    assert predict(local.url, "digits", instances[:1]).status_code == 200


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_split(pixels: np.ndarray, idat_bytes: int, extra: bytes = b"") -> bytes:
    """A valid 8-bit gray PNG of `pixels`, its image data in IDAT chunks of `idat_bytes`,
    `extra` (more chunks) before them."""
    import struct
    import zlib

    h, w = pixels.shape
    raw = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels))
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    idats = b"".join(_png_chunk(b"IDAT", raw[i:i + idat_bytes]) for i in range(0, len(raw), idat_bytes))
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + idats + _png_chunk(b"IEND", b"")


def _bmp_rle8(pixels: np.ndarray) -> bytes:
    """A valid RLE8-compressed BMP of `pixels` (one (1, value) pair per pixel: the worst case)."""
    import struct

    h, w = pixels.shape
    rows = [b"".join(b"\x01" + bytes([v]) for v in row.tolist()) + b"\x00\x00" for row in pixels[::-1]]
    data = b"".join(rows)[:-2] + b"\x00\x01"  # end of bitmap instead of the last end of line
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def _jpeg(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _decode_cost_bombs() -> list[tuple[str, bytes]]:
    """Images whose decoding costs far more than their pixels say (Pillow loops in Python):
    3-4 s each at 8 MiB on the shared machine; these are the smallest that cross the limits."""
    from cnnray.serve.preprocess import MAX_PNG_CHUNKS

    text = _png_chunk(b"tEXt", b"k\x00v")
    return [
        ("png-text-chunks", _png_split(NOISE, 1 << 16, extra=text * MAX_PNG_CHUNKS)),
        ("png-empty-idats", _png_split(NOISE, 1 << 16, extra=_png_chunk(b"IDAT", b"") * MAX_PNG_CHUNKS)),
        ("bmp-rle8", _bmp_rle8(np.tile(NOISE, (16, 16)))),  # 448 x 448: ~400 KB
        ("jpeg-comment-segments", _jpeg(NOISE)[:2] + b"\xff\xfe\x00\x02" * (MAX_PNG_CHUNKS + 2000) + _jpeg(NOISE)[2:]),
        ("jpeg-fill-bytes", _jpeg(NOISE)[:2] + b"\xff" * (4 * MAX_PNG_CHUNKS) + _jpeg(NOISE)[2:]),
    ]


@pytest.mark.slow  # a server
@pytest.mark.parametrize("case", _decode_cost_bombs(), ids=lambda c: c[0])
def test_images_that_cost_more_than_their_pixels_are_refused_before_decoding(local, case):
    """One example per kind of decode work the pixel budget misses (a PNG's chunk count, an
    RLE BMP's Python decoder): 413 on both routes, before any decoding; on a replica such an
    image held the one inference thread, and every batch-mate, for seconds."""
    _, data = case
    r = requests.post(f"{local.url}/predictions/digits", data=data, headers={"Content-Type": "image/png"},
                      timeout=60)
    assert r.status_code == 413 and list(r.json()) == ["error"], r.text
    r = predict(local.url, "digits", [b64(png(NOISE)), b64(data)])
    assert r.status_code == 413 and r.json()["error"].startswith("instance 1: "), r.text


@pytest.mark.slow  # a server
def test_decode_cost_limits_bound_a_request_not_each_image(local):
    """:predict instances each under the chunk limit, over it together: 413 before decoding
    (20 PNGs of 600 chunks each: 12,000 chunks cost Pillow as one PNG of 12,000)."""
    from cnnray.serve.preprocess import MAX_PNG_CHUNKS

    each = _png_split(NOISE, 1 << 16, extra=_png_chunk(b"tEXt", b"k\x00v") * 600)
    n = MAX_PNG_CHUNKS // 600 + 2
    r = predict(local.url, "digits", [b64(each)] * n)
    assert r.status_code == 413 and "PNGs of one request" in r.json()["error"], r.text
    assert predict(local.url, "digits", [b64(each)] * 2).status_code == 200


@pytest.mark.slow  # a server
def test_real_images_within_the_decode_cost_limits_still_decode(local):
    """The limits refuse no real image: image data in many small IDAT chunks (libpng writes
    8 KiB ones) and a small RLE8 BMP give the pixels of the plain PNG; JPEGs with binary
    EXIF and ICC payloads are served."""
    from cnnray.serve.preprocess import MAX_PNG_CHUNKS, decode_image

    want = decode_image(png(NOISE), (1, 28, 28), 1 << 20)
    many = _png_split(NOISE, 1, extra=_png_chunk(b"tEXt", b"k\x00v") * (MAX_PNG_CHUNKS - 1000))
    for data in (many, _bmp_rle8(NOISE)):
        assert torch.equal(decode_image(data, (1, 28, 28), 1 << 20), want)
        r = requests.post(f"{local.url}/predictions/digits", data=data, headers={"Content-Type": "image/png"},
                          timeout=60)
        assert r.status_code == 200, r.text
    # a progressive photo-sized JPEG with an ICC profile and EXIF: binary payloads hold
    # 0xFF-then-marker bytes by chance, within the free markers of the file's size
    from PIL import ImageCms

    photo = np.random.default_rng(5).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x927C] = bytes(np.random.default_rng(6).integers(0, 256, 60_000, dtype=np.uint8))  # MakerNote
    for data in (_jpeg(photo, progressive=True, quality=95, icc_profile=icc, exif=exif), _jpeg(NOISE)):
        r = requests.post(f"{local.url}/predictions/digits", data=data, headers={"Content-Type": "image/png"},
                          timeout=60)
        assert r.status_code == 200, r.text


def test_one_bad_request_never_fails_its_batch_mates(tmp_path, monkeypatch):
    """The replica's @serve.batch handler (ModelServer._batched, run here without Ray) given
    one batch of good and bad payloads for two versions of a model and another model: each
    answers as it would alone (the bad ones with their own 4xx, a model's NaN output as its
    row, refused later by its own request), none fails the others."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace as NS

    import ray.serve

    from cnnray.serve.app import ModelServer
    from cnnray.serve.engine import load_served_model
    from cnnray.serve.metrics import ServeMetrics
    from cnnray.serve.preprocess import EncodedImage, RequestError
    from cnnray.serve.schemas import ModelRef

    # serve.batch asks the replica context for max_ongoing_requests (a warning) when it first runs.
    monkeypatch.setattr(ray.serve, "get_replica_context",
                        lambda: NS(_deployment_config=NS(max_ongoing_requests=512)))
    class Replica:  # the handler on a plain object: ModelServer's own class is Serve's ingress wrapper
        # A fresh @serve.batch around the same function: using the class's own wrapper would
        # leave its batch queue (event loop, weak references) on ModelServer, which Serve
        # then cannot pickle when a later test builds the app in this process.
        _batched = ray.serve.batch(ModelServer.func_or_class._batched.__wrapped__)

    server = Replica()
    server._pool = ThreadPoolExecutor(max_workers=1)
    server.metrics = ServeMetrics()
    load = {n: load_served_model(n.split("@")[0], ModelRef(path=str(path), version=v)) for n, path, v in [
        ("digits@1", save_model(tmp_path / "d1", "cnn", MNIST_INFO), 1),
        ("digits@2", save_model(tmp_path / "d2", "cnn", MNIST_INFO, seed=1), 2),
        ("overflow@1", overflow_model(tmp_path / "o"), 1)]}
    bright = png(np.full((28, 28), 255, np.uint8))
    items = [
        ("digits@1", EncodedImage(png(NOISE), 1 << 20), None),
        ("digits@1", EncodedImage(b"not an image", 1 << 20), 400),
        ("digits@2", EncodedImage(png(NOISE), 1 << 20), None),
        ("overflow@1", EncodedImage(bright, 1 << 20), None),
        ("digits@1", torch.full((1, 28, 28), 7.0), None),
        ("digits@1", EncodedImage(_decode_cost_bombs()[0][1], 1 << 20), 413),
        ("digits@1", EncodedImage(png(np.zeros((600, 600), np.uint8)), 28 * 28), 413),
    ]

    async def run() -> tuple[list, list]:
        server._batched.set_max_batch_size(len(items))
        server._batched.set_batch_wait_timeout_s(1.0)  # seconds: all items surely in one batch
        together = await asyncio.gather(*(server._batched((load[n], p)) for n, p, _ in items))
        alone = [await server._batched((load[n], p)) for n, p, _ in items]
        return together, alone

    together, alone = asyncio.run(run())
    server._pool.shutdown()
    for (name, _, status), a, b in zip(items, together, alone):
        if status is None:
            assert isinstance(a, list) and len(a) == 10, (name, a)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        else:
            assert isinstance(a, RequestError) and a.status == status and a.message == b.message, (name, a)
    assert not any(map(math.isfinite, together[3])), "the overflow model's row is its own NaN"


@pytest.mark.slow  # a server
@pytest.mark.parametrize("route", ["torchserve", "kserve"])
def test_decoding_never_runs_on_the_event_loop(local, monkeypatch, route):
    """A decode that takes seconds (a many-scan progressive JPEG; here a stand-in that sleeps)
    must not delay /healthz or other requests: decoding runs off the event loop (in the
    backend: the plain server's thread pool here, the replica's batch thread on Serve)."""
    import cnnray.serve.preprocess as pre

    original = pre.decode_image

    def slow_decode(*args, **kwargs):
        time.sleep(3.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(pre, "decode_image", slow_decode)
    result: dict = {}

    def attack() -> None:
        if route == "torchserve":
            result["r"] = requests.post(f"{local.url}/predictions/digits", data=png(NOISE),
                                        headers={"Content-Type": "image/png"}, timeout=60)
        else:
            result["r"] = predict(local.url, "digits", [b64(png(NOISE))])

    with HealthProbe(local.url) as probe:
        t = threading.Thread(target=attack)
        t.start()
        t.join(60)
    assert result["r"].status_code == 200
    probe.check(f"a 3 s decode ({route})")


@pytest.mark.slow  # a server
def test_bodies_held_at_once_are_bounded(tmp_path):
    """Many large uploads at once cannot exhaust a replica's memory: past `max_buffered_bytes`
    a request gets 429 with Retry-After, and what was held is given back afterwards."""
    from cnnray.serve.schemas import Limits, ModelRef

    ref = ModelRef(path=str(save_model(tmp_path / "ck", "cnn", MNIST_INFO)), version=1)
    server = LocalServer({"digits": ref}, Limits(max_buffered_bytes=8192))
    try:
        small, large = png(NOISE), png(NOISE) + bytes(10_000)  # Pillow ignores bytes after the PNG's end
        r = requests.post(f"{server.url}/predictions/digits", data=large, headers={"Content-Type": "image/png"},
                          timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "retry" in r.json()["error"], r.text
        for _ in range(3):  # nothing stays held: the budget is given back after each request
            r = requests.post(f"{server.url}/predictions/digits", data=small, headers={"Content-Type": "image/png"},
                              timeout=30)
            assert r.status_code == 200, r.text
    finally:
        server.stop()


# --- 2. slow clients end with 408 and do not hold the server --------------------------------------
def stalled_connections(host: str, port: int, path: str, n: int) -> list[socket.socket]:
    """`n` connections that send headers announcing 100 bytes, one byte of body, then nothing."""
    socks = []
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
            f"Content-Length: 100\r\n\r\n").encode()
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(head + b"\x89")
        socks.append(s)
    return socks


def read_statuses(socks: list[socket.socket], timeout_s: float) -> list[str]:
    """The status line each socket receives, all within one deadline of `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    return [read_status(s, max(0.01, deadline - time.monotonic())) for s in socks]


def read_status(s: socket.socket, timeout_s: float) -> str:
    s.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:  # socket.timeout included: nothing came back in time
        return f"no answer ({type(e).__name__})"
    return data.split(b"\r\n", 1)[0].decode("latin-1")


@pytest.mark.slow  # a server
def test_stalled_bodies_get_408_and_others_keep_being_served(local):
    socks = stalled_connections("127.0.0.1", local.port, "/predictions/digits", 20)
    try:
        with HealthProbe(local.url) as probe:
            for _ in range(5):  # working clients are served meanwhile
                r = requests.post(f"{local.url}/predictions/digits", data=png(NOISE),
                                  headers={"Content-Type": "image/png"}, timeout=30)
                assert r.status_code == 200
            statuses = read_statuses(socks, BODY_TIMEOUT_S + 15)
    finally:
        for s in socks:
            s.close()
    assert all(st.startswith("HTTP/1.1 408") for st in statuses), statuses[:3]
    probe.check("20 stalled request bodies")


# --- 3. oversized uploads: the client reads the 413 ------------------------------------------------
@pytest.mark.slow  # a server
@pytest.mark.parametrize("size_mb", [30, 60])
def test_oversized_upload_answers_a_readable_413(local, size_mb):
    body = b'{"instances": [{"b64": "' + b"A" * (size_mb * 1024 * 1024) + b'"}]}'
    with HealthProbe(local.url) as probe:
        r = post_json_bytes(f"{local.url}/v1/models/digits:predict", body)  # sends it all, then reads
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    probe.check(f"a {size_mb} MB upload")


@pytest.mark.slow  # a server
def test_oversized_upload_with_urllib_and_chunked(local):
    body = b"\x89PNG" + bytes(30 * 1024 * 1024)
    req = urllib.request.Request(f"{local.url}/predictions/digits", data=body,
                                 headers={"Content-Type": "image/png"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=120)
    assert e.value.code == 413 and "over the limit" in json.loads(e.value.read())["error"]

    def chunks():  # no Content-Length: refused while streaming, the rest read and dropped
        for _ in range(30):
            yield bytes(1024 * 1024)

    r = requests.post(f"{local.url}/predictions/digits", data=chunks(), headers={"Content-Type": "image/png"},
                      timeout=120)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    # refused before the body is read (unknown model): the client still reads the answer
    r = requests.post(f"{local.url}/predictions/nope", data=bytes(5 * 1024 * 1024),
                      headers={"Content-Type": "image/png"}, timeout=120)
    assert r.status_code == 404 and "unknown model" in r.json()["error"]


# --- the lean inference path answers exactly as FastAPI's router does ------------------------------
def _same_answers_cases() -> list[tuple]:
    good = png(NOISE)
    bright = png(np.full((28, 28), 255, np.uint8))
    return [c[:5] for c in BAD] + [
        # (id, method, path, body, content type)
        ("png", "POST", "/predictions/digits", good, "image/png"),
        ("png-put", "PUT", "/predictions/digits", good, None),
        ("kserve-two", "POST", "/v1/models/digits:predict",
         json.dumps({"instances": [b64(good), np.zeros((1, 28, 28)).tolist()]}).encode(), "application/json"),
        ("kserve-large-body", "POST", "/v1/models/digits:predict",  # parsed on the pool, not inline
         json.dumps({"instances": [np.full((1, 28, 28), 200.5).tolist()] * 4}).encode(), "application/json"),
        ("non-finite-output", "POST", "/predictions/overflow", bright, "image/png"),
        ("name-with-slash", "POST", "/predictions/digits/x", good, "image/png"),
        ("trailing-slash", "POST", "/predictions/digits/", good, "image/png"),
        ("empty-name", "POST", "/v1/models/:predict", b"{}", "application/json"),
        ("head", "HEAD", "/predictions/digits", None, None),
    ]


@pytest.mark.slow  # a server
@pytest.mark.parametrize("case", _same_answers_cases(), ids=lambda c: c[0])
def test_lean_path_answers_as_fastapi_does(twins, case):
    """Every status, error body and header that matters, the same on both apps."""
    local, plain = twins
    _, method, path, body, ctype = case
    headers = {"Content-Type": ctype} if ctype else {}
    a = requests.request(method, local.url + path, data=body, headers=headers, timeout=60, allow_redirects=False)
    b = requests.request(method, plain.url + path, data=body, headers=headers, timeout=60, allow_redirects=False)
    assert (a.status_code, a.content) == (b.status_code, b.content)
    for h in ("content-type", "connection", "retry-after", "location"):
        assert a.headers.get(h, "").replace(local.url, "") == b.headers.get(h, "").replace(plain.url, ""), h


@pytest.mark.slow  # a server
def test_lean_path_counts_requests_as_fastapi_does(twins):
    """After the cases above, both apps counted the same requests by model, API and status."""
    from prometheus_client.parser import text_string_to_metric_families

    def counts(server) -> dict:
        text = requests.get(server.url + "/metrics", timeout=30).text
        return {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples if s.name == "cnnray_serve_requests_total"}

    lean, plain = twins
    assert counts(lean) == counts(plain) and sum(counts(lean).values()) > 10


def test_hot_routes_are_the_inference_routes():
    from cnnray.serve.lean import hot_route

    def route(method: str, path: str, root: str = ""):
        return hot_route({"type": "http", "method": method, "path": root + path, "root_path": root})

    assert route("POST", "/predictions/digits") == ("torchserve", "digits")
    assert route("PUT", "/predictions/digits") == ("torchserve", "digits")
    assert route("POST", "/v1/models/digits:predict") == ("kserve", "digits")
    assert route("POST", "/v1/models/a:predict:predict") == ("kserve", "a:predict")  # as FastAPI's {name}
    assert route("POST", "/predictions/digits", root="/api") == ("torchserve", "digits")
    for method, path in [("GET", "/predictions/digits"), ("PUT", "/v1/models/digits:predict"),
                         ("POST", "/predictions/"), ("POST", "/predictions/a/b"), ("POST", "/v1/models/:predict"),
                         ("POST", "/v1/models/a/b:predict"), ("POST", "/v1/models/digits"), ("POST", "/healthz")]:
        assert route(method, path) is None, (method, path)


# --- 4. non-finite output -------------------------------------------------------------------------
def test_nan_weights_are_refused_at_load(tmp_path):
    from cnnray.checkpoint import CheckpointError
    from cnnray.serve.engine import LocalBackend, load_served_model
    from cnnray.serve.schemas import ModelRef

    ref = ModelRef(path=str(nan_model(tmp_path / "nan")), version=1)
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        load_served_model("diverged", ref)
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        LocalBackend({"diverged": ref})


@pytest.mark.slow  # a server
def test_non_finite_output_is_a_4xx_and_metrics_count_the_status_sent(local):
    from prometheus_client.parser import text_string_to_metric_families

    blank = png(np.zeros((28, 28), np.uint8))
    bright = png(np.full((28, 28), 255, np.uint8))
    assert requests.post(f"{local.url}/predictions/overflow", data=blank, headers={"Content-Type": "image/png"},
                         timeout=30).status_code == 200
    r = requests.post(f"{local.url}/predictions/overflow", data=bright, headers={"Content-Type": "image/png"},
                      timeout=30)
    assert r.status_code == 422 and "NaN or infinity" in r.json()["error"], r.text
    r = predict(local.url, "overflow", [b64(blank), b64(bright)])
    assert r.status_code == 422 and "instance 1" in r.json()["error"], r.text
    text = requests.get(local.url + "/metrics", timeout=30).text
    counts = {
        (s.labels["api"], s.labels["status"]): s.value
        for f in text_string_to_metric_families(text) if f.name == "cnnray_serve_requests"
        for s in f.samples if s.name.endswith("_total") and s.labels["model"] == "overflow"
    }
    assert counts == {("torchserve", "200"): 1, ("torchserve", "422"): 1, ("kserve", "422"): 1}, counts


# --- 5. whatever appears in the model store -------------------------------------------------------
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("good") / "ck", "cnn", MNIST_INFO)


def test_versions_are_ascii_decimals():
    from cnnray.store import parse_version

    assert [parse_version(s) for s in ["1", "12", "02", "0", "²", "٣", "-1", "1 ", "+1", "1e3"]] == [
        1, 12, None, None, None, None, None, None, None, None]


def test_store_scan_skips_and_reports_what_is_not_a_version(tmp_path, good_checkpoint):
    from cnnray.serve.engine import resolve
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export, scan

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    for odd in ["²", "٣", "02"]:  # str.isdigit() says yes to each; int("٣") is 3
        shutil.copytree(good_checkpoint, store / "digits" / odd)
    (store / "digits" / "3").write_text("not a folder")
    (store / "README.txt").write_text("a stray file")
    found = scan(store)
    assert found.models == {"digits": [1]}
    text = "\n".join(found.problems)
    for odd in ["'²'", "'٣'", "'02'", "digits/3: a file", "README.txt"]:
        assert odd in text, text
    res = resolve(ServeArgs(model_store=str(store)))
    assert res.models["digits"].version == 1
    assert str(tmp_path) not in "\n".join(res.problems)  # store-relative: no server paths


def test_a_version_still_being_copied_is_skipped_until_complete(tmp_path, good_checkpoint):
    from cnnray.serve.engine import resolve
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    partial = store / "digits" / "2"
    partial.mkdir()
    shutil.copyfile(good_checkpoint / "model.pt", partial / "model.pt")  # meta.json not yet
    args = ServeArgs(model_store=str(store))
    bad: dict = {}
    first = resolve(args, None, bad)
    assert first.models["digits"].version == 1
    assert any(p.startswith("digits/2: skipped") and "meta.json" in p for p in first.problems), first.problems
    shutil.copyfile(good_checkpoint / "meta.json", partial / "meta.json")  # the copy completes
    second = resolve(args, first.models, bad)
    assert second.models["digits"].version == 2 and not second.problems


def test_refresh_keeps_serving_whatever_the_store_holds(tmp_path, good_checkpoint, monkeypatch):
    from cnnray.serve.runner import ServeRunner
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    runner = ServeRunner(ServeArgs(model_store=str(store)))
    deployed: list = []
    monkeypatch.setattr(runner, "_deploy", lambda: deployed.append((dict(runner.models), list(runner.problems))))
    runner.refresh()
    assert runner.models["digits"].version == 1
    (store / "digits" / "2").mkdir()  # an in-progress copy
    (store / "digits" / "²").mkdir()
    (store / "digits" / "4").write_text("")
    assert runner.refresh() == {}  # nothing new to serve, no exception
    assert runner.models["digits"].version == 1 and len(runner.problems) == 3, runner.problems
    assert deployed[-1][1] == runner.problems  # the replicas get the problems to report
    shutil.rmtree(store)  # even the store going away does not stop serving
    runner.refresh()
    assert runner.models["digits"].version == 1


def test_an_unreadable_folder_is_reported_not_raised(tmp_path, good_checkpoint, monkeypatch):
    from cnnray.serve.engine import resolve
    from cnnray.serve.schemas import ServeArgs
    from cnnray.store import export

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    export(good_checkpoint, store, "other")
    (store / "other").chmod(0o700)
    real_iterdir = Path.iterdir

    def iterdir(self):  # another user's 0700 folder, as this (possibly root) account cannot fake it
        if self.name == "other":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    res = resolve(ServeArgs(model_store=str(store)))
    assert set(res.models) == {"digits"}
    assert res.problems == ["other/: cannot read the folder: permission denied"], res.problems


def test_export_never_loops_on_a_file_named_like_the_next_version(tmp_path, good_checkpoint):
    from cnnray.store import export

    store = tmp_path / "store"
    export(good_checkpoint, store, "digits")
    (store / "digits" / "2").write_text("a file, not a version")
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("path", export(good_checkpoint, store, "digits")),
                         daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "export spins on a file named like the next version"
    assert done["path"] == store / "digits" / "3"


# --- 6. files follow the umask ------------------------------------------------------------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    from cnnray.checkpoint import atomic_write_bytes, atomic_write_json
    from cnnray.store import export

    old = os.umask(umask)
    try:
        ck = save_model(tmp_path / "ck", "cnn", MNIST_INFO)
        atomic_write_json({"a": 1}, tmp_path / "result.json")
        atomic_write_bytes(b"<html></html>", tmp_path / "report.html")
        version = export(ck, tmp_path / "store", "digits")
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    for f in [ck / "meta.json", ck / "model.pt", tmp_path / "result.json", tmp_path / "report.html",
              version / "meta.json", version / "model.pt"]:
        assert mode(f) == file_mode, f"{f}: {oct(mode(f))}"
    assert mode(version) == dir_mode, oct(mode(version))


# --- 7. a lying meta.json ------------------------------------------------------------------------------
def lying_checkpoint(directory: Path, **meta_changes) -> Path:
    """A valid `mlp` checkpoint whose meta.json is then edited (digests stay valid: meta.json
    itself is not digested)."""
    ck = save_model(directory, "mlp", MNIST_INFO)
    meta = json.loads((ck / "meta.json").read_text())
    for dotted, value in meta_changes.items():
        target = meta
        *path, last = dotted.split("__")
        for key in path:
            target = target[key]
        target[last] = value
    (ck / "meta.json").write_text(json.dumps(meta))
    return ck


def test_model_args_are_checked_against_the_weights_before_allocating(tmp_path):
    """[20000, 20000] hidden units would build 1.6 GB of weights before finding they do not
    fit: the load runs in a child process whose peak memory is measured."""
    ck = lying_checkpoint(tmp_path / "ck", model__args__hidden_sizes=[20000, 20000])
    # VmHWM: this process image's own peak RSS. (ru_maxrss would not do: Linux carries the
    # forking parent's RSS into it, and pytest's process holds over a GB by then.)
    code = ("import sys\nfrom cnnray.checkpoint import CheckpointError, load_model\n"
            "try:\n    load_model(sys.argv[1])\nexcept CheckpointError as e:\n    print('refused:', e)\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print('peak_kb', int(hwm.split()[1]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(ck)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "refused:" in out.stdout and "do not fit" in out.stdout, out.stdout + out.stderr
    peak_kb = int(out.stdout.split("peak_kb")[-1])
    # importing torch takes ~0.4 GB; the lying model would add 1.6 GB (the old code: 2.1 GB)
    assert peak_kb < 1_000_000, f"the load peaked at {peak_kb / 1e6:.1f} GB"


MALFORMED = [
    ("huge-hidden", {"model__args__hidden_sizes": [1000000, 1000000]}, "do not fit"),
    ("negative-hidden", {"model__args__hidden_sizes": [-5]}, "cannot rebuild"),
    ("args-not-a-dict", {"model__args": [1, 2]}, "malformed"),
    ("model-not-a-dict", {"model": "mlp"}, "malformed"),
    ("unknown-arg", {"model__args__bogus": 1}, "cannot rebuild"),
    ("files-not-a-dict", {"files": ["model.pt"]}, "malformed"),
    ("digest-not-hex", {"files": {"model.pt": 5}}, "malformed"),
    ("odd-file-name", {"files__../../etc/passwd": "0" * 64}, "malformed"),
    ("epoch-a-string", {"epoch": "one"}, "malformed"),
    ("metrics-a-list", {"metrics": [1]}, "malformed"),
    ("data-a-string", {"data": "mnist"}, "malformed"),
    ("infinite-shape", {"data__input_shape": [1, 1e400, 28]}, "input description"),
    ("huge-probe", {"data__input_shape": [1, 100000, 100000]}, "impossible input shape"),
    ("no-classes", {"data__classes": []}, "no classes"),
    ("zero-std", {"data__std": [0.0]}, "std"),
]


@pytest.mark.parametrize("changes,fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_every_malformed_meta_json_is_a_checkpoint_error(tmp_path, changes, fragment):
    from cnnray.checkpoint import CheckpointError
    from cnnray.serve.engine import load_served_model
    from cnnray.serve.schemas import ModelRef

    ck = lying_checkpoint(tmp_path / "ck", **changes)
    with pytest.raises(CheckpointError, match=fragment):
        load_served_model("m", ModelRef(path=str(ck), version=1))


# --- 9. error texts on unauthenticated routes name no server paths ---------------------------------
def test_load_failures_are_reported_without_server_paths(tmp_path):
    from cnnray.checkpoint import CheckpointError
    from cnnray.serve.engine import load_served_model, public_error
    from cnnray.serve.schemas import ModelRef

    ck = save_model(tmp_path / "secret-place" / "ck", "cnn", MNIST_INFO)
    (ck / "model.pt").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError) as e:
        load_served_model("digits", ModelRef(path=str(ck), version=4))
    text = public_error(e.value, str(ck), "digits/4")
    assert "secret-place" not in text and str(tmp_path) not in text and "SHA-256" in text, text


# --- the slow kinds again, against a real `cnnray serve` on Ray Serve ---------------------------------
@pytest.fixture(scope="module")
def real_serve(tmp_path_factory, good_checkpoint):
    """`cnnray serve --model-store S --watch-s 1` on a free loopback port, its own local Ray."""
    from cnnray.store import export

    root = tmp_path_factory.mktemp("real")
    store = root / "store"
    export(good_checkpoint, store, "digits")
    port = free_port()
    log = open(root / "serve.log", "w+")
    proc = spawn_cnnray(["serve", "--model-store", str(store), "--port", str(port), "--watch-s", "1"], output=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, log, "cnnray serve")
        yield {"url": url, "port": port, "store": store, "proc": proc, "log": log, "checkpoint": good_checkpoint}
    finally:
        proc.send_signal(2)  # Ctrl-C: it removes what it started
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        log.close()


@pytest.mark.slow
def test_real_serve_stalled_clients_get_408_and_do_not_take_the_replica(real_serve):
    url, port = real_serve["url"], real_serve["port"]
    socks = stalled_connections("127.0.0.1", port, "/predictions/digits", 140)  # > 128, the old capacity
    try:
        with HealthProbe(url) as probe:
            for _ in range(5):
                r = requests.post(f"{url}/predictions/digits", data=png(NOISE),
                                  headers={"Content-Type": "image/png"}, timeout=30)
                assert r.status_code == 200
            statuses = read_statuses(socks, 60)
    finally:
        for s in socks:
            s.close()
    assert sum(st.startswith("HTTP/1.1 408") for st in statuses) == len(socks), sorted(set(statuses))
    probe.check("140 stalled bodies on cnnray serve")
    assert real_serve["proc"].poll() is None


@pytest.mark.slow
@pytest.mark.parametrize("size_mb,client", [(30, "requests"), (60, "requests"), (30, "urllib")])
def test_real_serve_oversized_upload_answers_a_readable_413(real_serve, size_mb, client):
    url = real_serve["url"] + "/v1/models/digits:predict"
    body = b'{"instances": [{"b64": "' + b"A" * (size_mb * 1024 * 1024) + b'"}]}'
    with HealthProbe(real_serve["url"]) as probe:
        if client == "requests":
            r = post_json_bytes(url, body)
            status, error = r.status_code, r.json()["error"]
        else:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=120)
            status, error = e.value.code, json.loads(e.value.read())["error"]
    assert status == 413 and "over the limit" in error, error
    probe.check(f"a {size_mb} MB upload to cnnray serve ({client})")


@pytest.mark.slow
def test_real_serve_keeps_serving_whatever_appears_in_the_store(real_serve):
    url, store, ck = real_serve["url"], real_serve["store"], real_serve["checkpoint"]
    digits = store / "digits"
    with HealthProbe(url) as probe:
        partial = digits / "2"
        partial.mkdir()
        shutil.copyfile(ck / "model.pt", partial / "model.pt")  # a copy in progress: no meta.json yet
        for odd in ["²", "٣", "02"]:
            shutil.copytree(ck, digits / odd)
        (digits / "5").write_text("a file named like a version")
        locked = store / "locked"
        locked.mkdir(mode=0o700)
        time.sleep(4)  # several polls
        assert real_serve["proc"].poll() is None, log_tail(real_serve["log"])
        listing = requests.get(url + "/v1/models", timeout=30).json()
        info = {m["name"]: m for m in listing["models"]}
        assert info["digits"]["version"] == 1 and info["digits"]["ready"]
        problems = "\n".join(listing["problems"])
        for fragment in ["digits/2: skipped", "'²'", "'٣'", "'02'", "digits/5: a file"]:
            assert fragment in problems, problems
        assert str(store) not in problems and str(store) not in json.dumps(listing)
        assert requests.post(f"{url}/predictions/digits", data=png(NOISE), headers={"Content-Type": "image/png"},
                             timeout=30).status_code == 200
        shutil.copyfile(ck / "meta.json", partial / "meta.json")  # the copy completes
        deadline = time.monotonic() + 120
        while requests.get(url + "/v1/models/digits", timeout=30).json().get("version") != 2:
            assert time.monotonic() < deadline, "version 2 was not served once complete\n" + log_tail(real_serve["log"])
            time.sleep(0.5)
    probe.check("a model store full of surprises")
    assert real_serve["proc"].poll() is None
