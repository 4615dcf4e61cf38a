"""POST /v1/models/{name}:explain in-process (LocalBackend + FastAPI's TestClient): the answer's
shape, the same prediction as :predict, hostile input answered 4xx, the concurrency limit
(429), --no-explain (403), and predictions answered while an explanation is still running."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.cli import run_cli

MNIST = {"dataset": "mnist", "input_shape": [1, 28, 28], "classes": [str(i) for i in range(10)],
         "mean": [0.1307], "std": [0.3081]}


def checkpoint(directory: Path, model_name: str, seed: int = 0) -> Path:
    from cnnray.checkpoint import save_checkpoint
    from cnnray.models import build_model, resolve_model_args

    args = resolve_model_args(model_name, num_classes=10, in_channels=1, image_size=(28, 28))
    torch.manual_seed(seed)
    model = build_model(model_name, **args)
    return save_checkpoint(directory, model_name=model_name, model_args=args, state_dict=model.state_dict(),
                           data_info=MNIST, epoch=1, config={"seed": seed}, metrics={"val_accuracy": 0.1})


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(side: int) -> bytes:
    """A PNG that declares side x side pixels (its header alone: refused before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


DIGIT = np.zeros((28, 28), dtype=np.uint8)
DIGIT[6:22, 12:16] = 255  # a "1"
DIGIT_PNG = png(DIGIT)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from cnnray.serve.api import build_http_app
    from cnnray.serve.engine import LocalBackend
    from cnnray.serve.schemas import Limits, ModelRef

    root = tmp_path_factory.mktemp("explain")
    models = {"digits": ModelRef(path=str(checkpoint(root / "cnn", "cnn")), version=1),
              "flat": ModelRef(path=str(checkpoint(root / "mlp", "mlp", seed=1)), version=1)}
    backend = LocalBackend(models, limits=Limits(max_body_bytes=64 * 1024, max_image_pixels=512 * 512))
    with TestClient(build_http_app(backend)) as c:
        c.backend = backend
        yield c


def explain(client, model: str = "digits", query: str = "", data: bytes = DIGIT_PNG, content_type="image/png"):
    return client.post(f"/v1/models/{model}:explain{query}", content=data, headers={"Content-Type": content_type})


def test_explain_answers_heat_maps_response_maps_and_the_prediction(client):
    r = explain(client, query="?layers=all&channels=3")
    assert r.status_code == 200, r.text
    body = r.json()
    predicted = client.post("/predictions/digits", content=DIGIT_PNG, headers={"Content-Type": "image/png"}).json()
    assert body["prediction"]["class_index"] == predicted["class_index"]
    assert np.allclose(body["prediction"]["probabilities"], predicted["probabilities"], atol=1e-6)
    assert body["target"]["class_index"] == predicted["class_index"] and body["input_shape"] == [1, 28, 28]
    assert set(body["explanations"]) == {"occlusion", "gradcam"}
    occ, cam = body["explanations"]["occlusion"], body["explanations"]["gradcam"]
    assert np.shape(occ["attribution"]) == (28, 28) == np.shape(cam["attribution"])
    assert occ["windows"] <= 144 and cam["layer"] == "conv2" and cam["layer_shape"] == [32, 7, 7]
    for h in (occ, cam):
        with Image.open(io.BytesIO(base64.b64decode(h["overlay_png"]))) as img:
            assert img.format == "PNG" and img.size == (112, 112)
    layers = body["feature_maps"]
    assert [m["layer"] for m in layers] == ["conv1.0", "conv2.0"]
    assert [m["formula_shape"] for m in layers] == [m["measured_shape"] for m in layers] == [[16, 28, 28], [32, 14, 14]]
    assert all(len(m["channels"]) == 3 for m in layers)
    # The served model's hooks are never touched: explanations run on their own copy.
    entry = client.backend.model("digits")
    assert client.backend.explainer.explainer(entry).model is not entry.module
    assert not any(m._forward_hooks for m in entry.module.modules())


def test_a_kserve_body_of_one_instance_explains_the_same(client):
    as_json = client.post("/v1/models/digits:explain?methods=occlusion",
                          json={"instances": [{"b64": base64.b64encode(DIGIT_PNG).decode()}]})
    as_png = explain(client, query="?methods=occlusion")
    assert as_json.status_code == as_png.status_code == 200
    assert as_json.json() == as_png.json()  # deterministic, and the same decoding
    array = client.post("/v1/models/digits:explain?methods=occlusion", json={"instances": [[DIGIT.tolist()]]})
    assert array.json()["explanations"] == as_png.json()["explanations"]


def test_the_mlp_gets_occlusion_only(client):
    body = explain(client, "flat").json()
    assert set(body["explanations"]) == {"occlusion"} and body["feature_maps"] == []


HOSTILE = [
    ("unknown model", dict(model="nope"), 404, "unknown model 'nope'; served models: digits, flat"),
    ("unknown method", dict(query="?methods=lime"), 400, "unknown method 'lime'; choose from: occlusion, gradcam"),
    ("Grad-CAM of the MLP", dict(model="flat", query="?methods=gradcam"), 400, "no convolutional layer for gradcam"),
    ("unknown layer", dict(query="?layers=conv1.0,fc"), 400, "unknown layer 'fc'; this model's conv layers: conv1.0, conv2.0"),
    ("many layers", dict(query="?layers=" + ",".join(["conv1.0"] * 100)), 400, "100 layers named, at most 64"),
    ("a huge query", dict(query="?layers=" + "x" * 5000), 414, "over 4096"),
    ("too many channels", dict(query="?layers=all&channels=1000"), 400, "give 1 to 8"),
    ("a target out of range", dict(query="?target=10"), 400, "class indices run from 0 to 9"),
    ("an unknown parameter", dict(query="?method=occlusion"), 400, "unknown query parameter 'method'"),
    ("a repeated parameter", dict(query="?layers=conv1.0&layers=conv2.0"), 400, "given more than once"),
    ("nothing asked", dict(query="?methods="), 400, "nothing to explain"),
    ("a huge image", dict(data=huge_png_header(20000)), 413, "pixels"),
    ("a body over the limit", dict(data=b"\x89PNG" + b"\0" * 70000), 413, "over the limit"),
    ("not an image", dict(data=b"hello"), 400, ""),
    ("a wrong content type", dict(content_type="text/plain"), 415, "Content-Type 'text/plain'"),
    ("two instances", dict(content_type="application/json",
                           data=b'{"instances": [[[[0]]], [[[0]]]]}'), 400, ""),
    ("two instances of the right shape", dict(content_type="application/json",
                                              data=('{"instances": [%s, %s]}' % ((str([[[0] * 28] * 28]),) * 2)).encode()),
     400, "2 instances: :explain takes exactly one"),
]


@pytest.mark.parametrize("case, kw, status, fragment", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_requests_get_4xx_with_a_readable_error(client, case, kw, status, fragment):
    r = explain(client, **kw)
    assert r.status_code == status, (case, r.status_code, r.text[:300])
    assert fragment in r.json()["error"], r.json()
    assert explain(client, query="?methods=occlusion").status_code == 200  # and the server goes on


def test_over_the_concurrency_limit_is_answered_429_at_once(client):
    service = client.backend.explainer
    service._pending = service.max_pending  # as if that many were running
    try:
        r = explain(client)
    finally:
        service._pending = 0
    assert r.status_code == 429 and r.headers.get("Retry-After") == "1"
    assert "explanations already running or waiting on this replica" in r.json()["error"]


def test_predictions_do_not_wait_behind_an_explanation(client, monkeypatch):
    from cnnray.explain import Explainer

    started, release = threading.Event(), threading.Event()
    real = Explainer.explain

    def slow(self, *a, **kw):
        started.set()
        assert release.wait(60)
        return real(self, *a, **kw)

    monkeypatch.setattr(Explainer, "explain", slow)
    answer = {}
    t = threading.Thread(target=lambda: answer.setdefault("r", explain(client, query="?methods=occlusion")))
    t.start()
    try:
        assert started.wait(60)
        for _ in range(3):  # answered while the explanation is still held
            r = client.post("/predictions/digits", content=DIGIT_PNG, headers={"Content-Type": "image/png"})
            assert r.status_code == 200
        assert t.is_alive()
    finally:
        release.set()
        t.join(60)
    assert answer["r"].status_code == 200


def test_no_explain_turns_the_route_off(tmp_path):
    from fastapi.testclient import TestClient

    from cnnray.serve.api import build_http_app
    from cnnray.serve.engine import LocalBackend
    from cnnray.serve.schemas import ModelRef

    backend = LocalBackend({"digits": ModelRef(path=str(checkpoint(tmp_path / "c", "cnn")), version=1)}, explain=False)
    with TestClient(build_http_app(backend)) as c:
        r = c.post("/v1/models/digits:explain", content=DIGIT_PNG, headers={"Content-Type": "image/png"})
        assert r.status_code == 403 and "--no-explain" in r.json()["error"]
        assert c.post("/predictions/digits", content=DIGIT_PNG, headers={"Content-Type": "image/png"}).status_code == 200


def test_serve_flag_and_args_carry_no_explain():
    from cnnray.cli import build_parser
    from cnnray.cli.serve import serve_args_from

    parser = build_parser()
    on = serve_args_from(parser.parse_args(["serve", "--checkpoint", ".", "--name", "m"]))
    off = serve_args_from(parser.parse_args(["serve", "--checkpoint", ".", "--name", "m", "--no-explain"]))
    assert on.explain is True and off.explain is False


def test_predict_explain_never_overwrites_silently(tmp_path, capsys):
    """Refused in one line (exit 2) before anything is sent: the URL below answers nothing."""
    digit = tmp_path / "digit.png"
    digit.write_bytes(DIGIT_PNG)
    (tmp_path / "digit.gradcam.png").write_bytes(b"mine")
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    code, _, err = run_cli(capsys, "predict", "--url", url, "--model", "digits", "--explain", str(digit))
    assert code == 2 and len(err) == 1 and "digit.gradcam.png exists: remove it or pass --overwrite" in err[0]
    assert (tmp_path / "digit.gradcam.png").read_bytes() == b"mine"
    other = tmp_path / "digit.jpg"
    other.write_bytes(DIGIT_PNG)
    code, _, err = run_cli(capsys, "predict", "--url", url, "--model", "digits", "--explain", "--overwrite",
                           str(digit), str(other))
    assert code == 2 and len(err) == 1 and "would both write" in err[0]
