"""`--runtime onnxruntime`: the same answers as the torch runtime, through the same serving
code (LoadedModel.classify: decoding, normalisation, batching, softmax)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnnray.serve.engine import LocalBackend, load_served_model
from cnnray.serve.schemas import ModelRef
from tests.helpers.processes import free_port, log_tail, spawn_cnnray, wait_http
from tests.export.checkpoints import random_pixels, save_untrained, shape_of

PROB_ATOL = 1e-5  # probabilities: softmax of logits within cnnray.export.verify's tolerance


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained(tmp_path_factory.mktemp("rt") / "cnn", "tutorial_cnn", tta="flip")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private graph cache for this module's tests (one export of the checkpoint for all)."""
    path = tmp_path_factory.mktemp("onnx-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("CNNRAY_ONNX_CACHE", str(path))
    yield path
    mp.undo()


def _pngs(images: torch.Tensor) -> list[bytes]:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_onnxruntime_answers_as_torch_does(checkpoint, cache):
    from cnnray.serve.preprocess import EncodedImage

    ref = {"m": ModelRef(path=str(checkpoint), version=1)}
    torch_backend, ort_backend = LocalBackend(ref, runtime="torch"), LocalBackend(ref, runtime="onnxruntime")
    assert ort_backend.model("m").runtime.name == "onnxruntime"
    assert isinstance(ort_backend.model("m").module, torch.nn.Module)  # the torch model stays available
    images = random_pixels(shape_of("tutorial_cnn"), n=24)
    payloads = [EncodedImage(png, 10**6) for png in _pngs(images)] + list(images[:4].float())
    a = asyncio.run(torch_backend.infer(torch_backend.model("m"), payloads))
    b = asyncio.run(ort_backend.infer(ort_backend.model("m"), payloads))
    pa, pb = np.array(a), np.array(b)
    assert pa.shape == pb.shape == (28, 10)
    assert (pa.argmax(1) == pb.argmax(1)).all()
    assert np.abs(pa - pb).max() <= PROB_ATOL
    assert list(cache.glob("*.onnx")), "the graph is cached by checkpoint hash"


def test_the_cached_graph_is_used_and_keyed_by_checkpoint(checkpoint, cache, tmp_path):
    import time

    ref = ModelRef(path=str(checkpoint), version=1)
    load_served_model("m", ref, runtime="onnxruntime")  # exports and caches (if no test did before)
    graphs = len(list(cache.glob("*.onnx")))
    start = time.perf_counter()
    load_served_model("m", ref, runtime="onnxruntime")
    assert time.perf_counter() - start < 3.0, "a cached graph loads without exporting again"
    other = save_untrained(tmp_path / "other", "tutorial_cnn", tta="flip", seed=1)  # other weights: other graph
    load_served_model("m", ModelRef(path=str(other), version=2), runtime="onnxruntime")
    assert len(list(cache.glob("*.onnx"))) == graphs + 1
    for f in cache.glob("*.onnx"):  # a cache file cut short: exported again, not an error
        f.write_bytes(f.read_bytes()[:100])
    served = load_served_model("m", ref, runtime="onnxruntime")
    assert served.runtime.name == "onnxruntime"


@pytest.mark.slow
def test_cnnray_serve_runtime_onnxruntime_answers_as_torch(checkpoint, tmp_path):
    import requests

    images = random_pixels(shape_of("tutorial_cnn"), n=16, seed=3)
    pngs = _pngs(images)
    local = LocalBackend({"m": ModelRef(path=str(checkpoint), version=1)}, runtime="torch")
    from cnnray.serve.preprocess import EncodedImage

    want = np.array(asyncio.run(local.infer(local.model("m"), [EncodedImage(p, 10**6) for p in pngs])))
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = spawn_cnnray(["serve", "--checkpoint", str(checkpoint), "--name", "m", "--port", str(port),
                         "--watch-s", "0", "--replicas", "1", "--runtime", "onnxruntime"], output=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models/m", proc, log, "cnnray serve --runtime onnxruntime")
        body = {"instances": [{"b64": base64.b64encode(p).decode()} for p in pngs]}
        r = requests.post(f"http://127.0.0.1:{port}/v1/models/m:predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = np.array([p["probabilities"] for p in r.json()["predictions"]])
        assert (got.argmax(1) == want.argmax(1)).all(), log_tail(log)
        assert np.abs(got - want).max() <= PROB_ATOL
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        log.close()


def test_onnxruntime_with_gpu_exits_2_before_ray(checkpoint, capsys):
    from cnnray.cli import main

    assert main(["serve", "--checkpoint", str(checkpoint), "--name", "m", "--gpu", "--runtime", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--runtime onnxruntime runs on CPUs" in err, err
