"""OIP v2 REST on the in-process app: health, metadata, versions, infer with FP32 tensors and
BYTES images in JSON and in the binary tensor data extension, as tritonclient builds and parses
them (its own request encoder and response decoder, no server process), and every refusal a 4xx
{"error": ...}. The same answers as the TorchServe and KServe v1 routes for the same images."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.serve.conftest import VERSION

INFER = "/v2/models/digits/infer"


def triton_infer(local, inputs, outputs=None, parameters=None, path=INFER):
    """POST a body built by tritonclient.http; its parsed result, or the raw response on an error."""
    from tritonclient.http import InferenceServerClient

    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs=outputs, parameters=parameters)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    r = local.client.post(path, content=body, headers=headers)
    if r.status_code != 200:
        return r
    size = r.headers.get("Inference-Header-Content-Length")
    return InferenceServerClient.parse_response_body(r.content, header_length=int(size) if size else None)


def pixels_input(x: np.ndarray, binary: bool, name: str = "pixels", datatype: str = "FP32"):
    from tritonclient.http import InferInput

    return InferInput(name, list(x.shape), datatype).set_data_from_numpy(x, binary_data=binary)


def images_input(files: list[bytes], binary: bool):
    """BYTES elements: the files themselves (binary), or their base64 text (JSON: files are no UTF-8)."""
    from tritonclient.http import InferInput

    items = files if binary else [base64.b64encode(f) for f in files]
    return InferInput("images", [len(files)], "BYTES").set_data_from_numpy(np.array(items, dtype=object),
                                                                          binary_data=binary)


def texts(labels: np.ndarray) -> list[str]:
    """BYTES output elements as text (binary outputs come back as bytes, JSON ones as str)."""
    return [b.decode() if isinstance(b, bytes) else b for b in labels]


def reference(local) -> tuple[np.ndarray, list[str]]:
    """What /predictions answers for each PNG, one request each."""
    answers = [local.client.post("/predictions/digits", content=p, headers={"Content-Type": "image/png"}).json()
               for p in local.pngs]
    return np.array([a["probabilities"] for a in answers], dtype=np.float32), [a["label"] for a in answers]


# --- health and metadata ---------------------------------------------------------------------
def test_health_server_metadata_and_model_metadata(local):
    c = local.client
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert c.get("/v2").json() == {"name": "cnnray", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    meta = c.get("/v2/models/digits").json()
    assert meta == {
        "name": "digits", "versions": [str(VERSION)], "platform": "pytorch",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 28, 28]},
                   {"name": "images", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "labels", "datatype": "BYTES", "shape": [-1]}],
    }
    assert c.get(f"/v2/models/digits/versions/{VERSION}").json() == meta
    assert c.get("/v2/models/digits/ready").json() == {"name": "digits", "version": str(VERSION), "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/digits/versions/{v}", "/v2/models/digits/versions/{v}/ready"])
@pytest.mark.parametrize("version", ["2", "4", "02", "x", "999999999999"])
def test_a_version_not_served_is_404(local, path, version):
    r = local.client.get(path.format(v=version))
    assert r.status_code == 404, r.text
    assert f"serving version {VERSION}" in r.json()["error"]


def test_unknown_model_is_404_everywhere(local):
    for r in (local.client.get("/v2/models/nope"), local.client.get("/v2/models/nope/ready"),
              local.client.post("/v2/models/nope/infer", json={"inputs": []})):
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]


# --- infer: the same answers as the other routes ----------------------------------------------
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_fp32_pixels_answer_as_kserve_v1_arrays(local, binary_in, binary_out):
    from tritonclient.http import InferRequestedOutput

    outputs = [InferRequestedOutput(n, binary_data=binary_out) for n in ("probabilities", "labels")]
    result = triton_infer(local, [pixels_input(local.pixels, binary_in)], outputs)
    v1 = local.client.post("/v1/models/digits:predict", json={"instances": local.pixels.tolist()}).json()
    want = np.array([p["probabilities"] for p in v1["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=1e-5, atol=1e-7)
    assert texts(result.as_numpy("labels")) == [p["label"] for p in v1["predictions"]]
    assert result.get_response()["model_version"] == str(VERSION)


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_images_answer_as_predictions(local, binary):
    result = triton_infer(local, [images_input(local.pngs, binary)])  # tritonclient asks for binary outputs
    probs, labels = reference(local)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-5, atol=1e-7)
    assert result.as_numpy("probabilities").shape == (4, 10)
    assert texts(result.as_numpy("labels")) == labels


def test_outputs_asked_for_are_the_outputs_answered(local):
    from tritonclient.http import InferRequestedOutput

    result = triton_infer(local, [images_input(local.pngs[:2], True)], [InferRequestedOutput("labels", False)])
    outs = result.get_response()["outputs"]
    assert [o["name"] for o in outs] == ["labels"] and outs[0]["shape"] == [2] and "data" in outs[0]
    r = local.client.post(INFER, json={"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                   "data": [base64.b64encode(local.pngs[0]).decode()]}]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities", "labels"]  # JSON unless asked


def test_oip_requests_are_counted_in_the_metrics(local):
    triton_infer(local, [images_input(local.pngs[:1], True)])
    text = local.client.get("/metrics").text
    assert 'cnnray_serve_requests_total{api="oip",model="digits",status="200"}' in text


# --- refusals: 4xx with {"error": ...}, before any work -----------------------------------------
def _pixels_json(shape, datatype="FP32", name="pixels", data=None):
    n = int(np.prod(shape)) if all(isinstance(d, int) and 0 <= d < 10**6 for d in shape) else 1
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                        "data": data if data is not None else [0.0] * min(n, 10_000)}]}


BAD_JSON = [
    (_pixels_json([1, 1, 28, 28], name="pixelz"), 400, "unknown input 'pixelz'"),
    (_pixels_json([1, 1, 28, 28], datatype="INT32"), 400, "datatype 'INT32'; expected FP32"),
    (_pixels_json([1, 3, 28, 28]), 400, "expected [N, 1, 28, 28]"),
    (_pixels_json([1, 784]), 400, "expected [N, 1, 28, 28]"),
    (_pixels_json([0, 1, 28, 28]), 400, "send at least one"),
    (_pixels_json([10**15, 1, 28, 28], data=[0.0]), 400, "at most 8 per request"),  # huge declared shape
    (_pixels_json([2, 1, 28, 28], data=[0.0] * 784), 400, "784 values for shape [2, 1, 28, 28]"),
    (_pixels_json([1, 1, 28, 28], data=[300.0] * 784), 400, "pixel values must lie in 0..255"),
    (_pixels_json([1, 1, 28, 28], data=["a"] * 784), 400, "data must be numbers"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400, "not valid base64"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}, 400, "element 0"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "expected BYTES"),
    ({"inputs": []}, 400, "0 inputs: send exactly one"),
    ({"inputs": [_pixels_json([1, 1, 28, 28])["inputs"][0]] * 2}, 400, "2 inputs"),
    ({"inputs": _pixels_json([1, 1, 28, 28])["inputs"], "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
    ({"inputs": _pixels_json([1, 1, 28, 28])["inputs"], "colour": 1}, 400, "colour"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28]}]}, 400, "no data"),
    ([1, 2], 400, "must be a JSON object"),
]


@pytest.mark.parametrize("body,status,says", BAD_JSON, ids=[b[2][:30] for b in BAD_JSON])
def test_bad_json_requests_are_refused_with_a_clear_message(local, body, status, says):
    r = local.client.post(INFER, json=body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def _binary_body(size_param, blob: bytes, header_length: str | None = None, n: int = 1):
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [n],
                                   "parameters": {"binary_data_size": size_param}}]}).encode()
    return head + blob, {"Inference-Header-Content-Length": header_length or str(len(head))}


def _prefixed(*items: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


BAD_BINARY = [
    ("header length not digits", lambda p: _binary_body(len(_prefixed(p)), _prefixed(p), "12abc"), "bad Inference-Header"),
    ("header length zero", lambda p: _binary_body(len(_prefixed(p)), _prefixed(p), "0"), "does not fit"),
    ("header length past the body", lambda p: _binary_body(len(_prefixed(p)), _prefixed(p), "999999"), "does not fit"),
    ("header length negative", lambda p: _binary_body(len(_prefixed(p)), _prefixed(p), "-5"), "bad Inference-Header"),
    ("truncated binary", lambda p: _binary_body(len(_prefixed(p)), _prefixed(p)[:-10]), "bytes follow the JSON header"),
    ("element past the end", lambda p: _binary_body(8, (10**6).to_bytes(4, "little") + b"abcd"), "past the end"),
    ("too few elements", lambda p: _binary_body(len(_prefixed(p)), _prefixed(p), n=2), "ends after 1 of 2"),
    ("bytes left over", lambda p: _binary_body(len(_prefixed(p)) + 3, _prefixed(p) + b"xyz"), "left after 1 elements"),
    ("size not a number", lambda p: _binary_body("ten", _prefixed(p)), "whole number of bytes"),
]


@pytest.mark.parametrize("make,says", [b[1:] for b in BAD_BINARY], ids=[b[0] for b in BAD_BINARY])
def test_bad_binary_requests_are_refused_with_a_clear_message(local, make, says):
    body, headers = make(local.pngs[0])
    r = local.client.post(INFER, content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]


def test_fp32_binary_size_must_match_the_shape(local):
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    r = local.client.post(INFER, content=head + bytes(16), headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "needs 3136" in r.json()["error"]


def test_costly_requests_are_refused_before_parsing(local):
    c = local.client
    many = b'{"inputs":[{"name":"pixels","datatype":"FP32","shape":[1,1,28,28],"data":[' + b"0," * 60_000 + b"0]}]}"
    r = c.post(INFER, content=many, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "values" in r.json()["error"]
    deep = b'{"inputs":' + b"[" * 50 + b"]" * 50 + b"}"
    r = c.post(INFER, content=deep)
    assert r.status_code == 400 and "nested" in r.json()["error"]
    r = c.post(INFER, content=b"x" * (300 * 1024))  # over max_body_bytes (256 KiB)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = c.post(INFER, content=b'{"inputs": []}', headers={"Content-Encoding": "gzip"})
    assert r.status_code == 415 and "uncompressed" in r.json()["error"]
    r = c.post(INFER, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_image_pixels_of_a_request_are_bounded_before_decoding(local):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("L", (600, 600)).save(buf, format="PNG")  # 360,000 px: over max_image_pixels 512 x 512
    r = triton_infer(local, [images_input([buf.getvalue()], True)])
    assert r.status_code == 413, r.text
