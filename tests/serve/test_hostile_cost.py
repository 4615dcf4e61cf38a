"""Hostile clients and careless colleagues against cnnray serve: every request's cost is bounded
before the work starts.

One of the tests/serve/test_hostile_*.py files, each a kind of fault; the helpers (a /healthz
probe that runs while an attack goes on, misbehaving models, costly images) are in
tests/helpers/hostile.py. Each runs against the in-process app (the same FastAPI app and
backend protocol as a replica, served by uvicorn on a free loopback port in this process); one
drives the replica's batch handler without Ray. While each attack runs, the probe's /healthz
p99 must stay within a generous bound (a blocked event loop delays it by seconds).
"""

from __future__ import annotations

import io
import math
import threading
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.helpers.hostile import (NOISE, HealthProbe, b64, bmp_rle8, decode_cost_bombs, jpeg,
                                   overflow_model, png_chunk, png_split, post_json_bytes, predict)
from tests.helpers.serve import MNIST_INFO, LocalServer, png, save_model


# --- 1. every request's cost is bounded before the work starts ----------------------------------
@pytest.mark.slow  # a server
def test_json_of_many_tiny_arrays_is_refused_before_it_is_parsed(hostile):
    # Just under 8 MiB of [[0],[0],...]: ~300 MB of Python lists once parsed, on the event loop.
    body = b'{"instances": [' + b",".join([b"[0]"] * (2 * 1024 * 1024 - 8)) + b"]}"
    assert len(body) < 8 * 1024 * 1024
    with HealthProbe(hostile.url) as probe:
        for _ in range(3):
            r = post_json_bytes(f"{hostile.url}/v1/models/digits:predict", body)
            assert r.status_code == 413, r.text
            assert "values" in r.json()["error"]
    probe.check("an 8 MiB JSON body of tiny arrays")


@pytest.mark.slow  # a server
def test_deeply_nested_json_is_refused(hostile):
    depth = 10_000  # within the values budget: refused for its depth
    body = b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"
    r = post_json_bytes(f"{hostile.url}/v1/models/digits:predict", body)
    assert r.status_code == 400 and "nested" in r.json()["error"], r.text


@pytest.mark.slow  # a server
def test_pixels_times_instances_are_bounded_before_decoding(hostile):
    big = io.BytesIO()
    Image.new("L", (4096, 4096)).save(big, format="PNG", optimize=True)  # ~16 KB each
    instances = [b64(big.getvalue())] * 64  # ~1.4 MB of JSON, 10-15 s of decoding
    with HealthProbe(hostile.url) as probe:
        start = time.perf_counter()
        r = predict(hostile.url, "digits", instances)
        took = time.perf_counter() - start
    assert r.status_code == 413, r.text
    assert "pixels per request" in r.json()["error"]
    print(f"\n[64 PNGs of 4096x4096] refused in {took * 1000:.0f} ms")
    probe.check("64 PNGs of 4096x4096 in one :predict")
    # one image of the largest size is still accepted (one request's whole budget)
    assert predict(hostile.url, "digits", instances[:1]).status_code == 200


@pytest.mark.slow  # a server
@pytest.mark.parametrize("case", decode_cost_bombs(), ids=lambda c: c[0])
def test_images_that_cost_more_than_their_pixels_are_refused_before_decoding(hostile, case):
    """One example per kind of decode work the pixel budget misses (a PNG's chunk count, an
    RLE BMP's Python decoder): 413 on both routes, before any decoding; on a replica such an
    image held the one inference thread, and every batch-mate, for seconds."""
    _, data = case
    r = requests.post(f"{hostile.url}/predictions/digits", data=data, headers={"Content-Type": "image/png"},
                      timeout=60)
    assert r.status_code == 413 and list(r.json()) == ["error"], r.text
    r = predict(hostile.url, "digits", [b64(png(NOISE)), b64(data)])
    assert r.status_code == 413 and r.json()["error"].startswith("instance 1: "), r.text


@pytest.mark.slow  # a server
def test_decode_cost_limits_bound_a_request_not_each_image(hostile):
    """:predict instances each under the chunk limit, over it together: 413 before decoding
    (20 PNGs of 600 chunks each: 12,000 chunks cost Pillow as one PNG of 12,000)."""
    from cnnray.serve.preprocess import MAX_PNG_CHUNKS

    each = png_split(NOISE, 1 << 16, extra=png_chunk(b"tEXt", b"k\x00v") * 600)
    n = MAX_PNG_CHUNKS // 600 + 2
    r = predict(hostile.url, "digits", [b64(each)] * n)
    assert r.status_code == 413 and "PNGs of one request" in r.json()["error"], r.text
    assert predict(hostile.url, "digits", [b64(each)] * 2).status_code == 200


@pytest.mark.slow  # a server
def test_real_images_within_the_decode_cost_limits_still_decode(hostile):
    """The limits refuse no real image: image data in many small IDAT chunks (libpng writes
    8 KiB ones) and a small RLE8 BMP give the pixels of the plain PNG; JPEGs with binary
    EXIF and ICC payloads are served."""
    from cnnray.serve.preprocess import MAX_PNG_CHUNKS, decode_image

    want = decode_image(png(NOISE), (1, 28, 28), 1 << 20)
    many = png_split(NOISE, 1, extra=png_chunk(b"tEXt", b"k\x00v") * (MAX_PNG_CHUNKS - 1000))
    for data in (many, bmp_rle8(NOISE)):
        assert torch.equal(decode_image(data, (1, 28, 28), 1 << 20), want)
        r = requests.post(f"{hostile.url}/predictions/digits", data=data, headers={"Content-Type": "image/png"},
                          timeout=60)
        assert r.status_code == 200, r.text
    # a progressive photo-sized JPEG with an ICC profile and EXIF: binary payloads hold
    # 0xFF-then-marker bytes by chance, within the free markers of the file's size
    from PIL import ImageCms

    photo = np.random.default_rng(5).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x927C] = bytes(np.random.default_rng(6).integers(0, 256, 60_000, dtype=np.uint8))  # MakerNote
    for data in (jpeg(photo, progressive=True, quality=95, icc_profile=icc, exif=exif), jpeg(NOISE)):
        r = requests.post(f"{hostile.url}/predictions/digits", data=data, headers={"Content-Type": "image/png"},
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
        ("digits@1", EncodedImage(decode_cost_bombs()[0][1], 1 << 20), 413),
        ("digits@1", EncodedImage(png(np.zeros((600, 600), np.uint8)), 28 * 28), 413),
    ]

    async def run() -> tuple[list, list]:
        server._batched.set_max_batch_size(len(items))
        server._batched.set_batch_wait_timeout_s(1.0)  # seconds: all items surely in one batch
        together = await asyncio.gather(*(server._batched((load[n], p)) for n, p, _ in items))
        # Each alone is a batch of one: no waiting for batch-mates that never come (1 s each).
        server._batched.set_batch_wait_timeout_s(0.0)
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
def test_decoding_never_runs_on_the_event_loop(hostile, monkeypatch, route):
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
            result["r"] = requests.post(f"{hostile.url}/predictions/digits", data=png(NOISE),
                                        headers={"Content-Type": "image/png"}, timeout=60)
        else:
            result["r"] = predict(hostile.url, "digits", [b64(png(NOISE))])

    with HealthProbe(hostile.url) as probe:
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
