"""Hostile clients and careless colleagues against cnnray serve: the slow kinds again (stalled
clients, oversized uploads, a model store full of surprises) against a real `cnnray serve` on
Ray Serve, one server for the module.

One of the tests/serve/test_hostile_*.py files, each a kind of fault; the helpers (a /healthz
probe that runs while an attack goes on, misbehaving models, costly images) are in
tests/helpers/hostile.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import requests

from tests.helpers.hostile import NOISE, HealthProbe, post_json_bytes, read_statuses, stalled_connections
from tests.helpers.processes import free_port, log_tail, spawn_cnnray, wait_http
from tests.helpers.serve import png


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
