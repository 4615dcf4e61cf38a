"""Hostile clients and careless colleagues against cnnray serve: slow clients end with 408 and do
not hold the server; oversized uploads answer a 413 the client reads.

One of the tests/serve/test_hostile_*.py files, each a kind of fault; the helpers (a /healthz
probe that runs while an attack goes on, misbehaving models, costly images) are in
tests/helpers/hostile.py. Against the in-process app; test_hostile_real_serve.py repeats them
on a real `cnnray serve`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import requests

from tests.helpers.hostile import (BODY_TIMEOUT_S, NOISE, HealthProbe, post_json_bytes,
                                   read_statuses, stalled_connections)
from tests.helpers.serve import png


# --- 2. slow clients end with 408 and do not hold the server --------------------------------------
@pytest.mark.slow  # a server
def test_stalled_bodies_get_408_and_others_keep_being_served(hostile):
    socks = stalled_connections("127.0.0.1", hostile.port, "/predictions/digits", 20)
    try:
        with HealthProbe(hostile.url) as probe:
            for _ in range(5):  # working clients are served meanwhile
                r = requests.post(f"{hostile.url}/predictions/digits", data=png(NOISE),
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
def test_oversized_upload_answers_a_readable_413(hostile, size_mb):
    body = b'{"instances": [{"b64": "' + b"A" * (size_mb * 1024 * 1024) + b'"}]}'
    with HealthProbe(hostile.url) as probe:
        r = post_json_bytes(f"{hostile.url}/v1/models/digits:predict", body)  # sends it all, then reads
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    probe.check(f"a {size_mb} MB upload")


@pytest.mark.slow  # a server
def test_oversized_upload_with_urllib_and_chunked(hostile):
    body = b"\x89PNG" + bytes(30 * 1024 * 1024)
    req = urllib.request.Request(f"{hostile.url}/predictions/digits", data=body,
                                 headers={"Content-Type": "image/png"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=120)
    assert e.value.code == 413 and "over the limit" in json.loads(e.value.read())["error"]

    def chunks():  # no Content-Length: refused while streaming, the rest read and dropped
        for _ in range(30):
            yield bytes(1024 * 1024)

    r = requests.post(f"{hostile.url}/predictions/digits", data=chunks(), headers={"Content-Type": "image/png"},
                      timeout=120)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    # refused before the body is read (unknown model): the client still reads the answer
    r = requests.post(f"{hostile.url}/predictions/nope", data=bytes(5 * 1024 * 1024),
                      headers={"Content-Type": "image/png"}, timeout=120)
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
