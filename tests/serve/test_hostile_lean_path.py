"""Hostile clients and careless colleagues against cnnray serve: the lean inference path answers
exactly as FastAPI's router does.

One of the tests/serve/test_hostile_*.py files, each a kind of fault; the helpers (a /healthz
probe that runs while an attack goes on, misbehaving models, costly images) are in
tests/helpers/hostile.py. Two in-process apps, with and without it, over the same models.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from tests.helpers.hostile import NOISE, b64, twin_servers
from tests.helpers.serve import BAD, png


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    servers = twin_servers(tmp_path_factory.mktemp("twins"))
    yield servers
    for server in servers:
        server.stop()


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
