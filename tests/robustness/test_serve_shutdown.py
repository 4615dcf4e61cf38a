"""SIGTERM to `cnnray serve` under load: accepted requests are answered, new connections are
refused before anything is sent, an idle keep-alive connection does not hold the stop up,
the exit status is 143, and no process of its Ray is left."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from tests.conftest import REPO, free_port, log_tail, wait_http
from tests.robustness.helpers import png, save_model

CLIENTS = 6  # concurrent clients, each one connection per request (as a load balancer's probes)


def _ours(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (the private RAY_TMPDIR): the server's Ray."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _one_request(port: int, body: bytes) -> str:
    """'ok' (a full answer), 'refused' (no connection: nothing was sent), 'http-NNN' (a
    clean HTTP refusal), or 'BROKEN: ...' (the connection failed after the request was sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            return "refused"
        try:
            conn.request("POST", "/predictions/mnist", body=body, headers={"Content-Type": "image/png"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            return f"BROKEN: {type(e).__name__}: {e}"
        if resp.status == 200 and b"probabilities" in data:
            return "ok"
        return f"http-{resp.status}"
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])
def test_sigterm_under_load_drains_then_exits(tmp_path, sig, code):
    ck = save_model(tmp_path / "ck")
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="crs", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "CNNRAY_DATA": str(tmp_path / "data")}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "cnnray.cli", "serve", "--checkpoint", str(ck), "--name", "mnist",
                             "--port", str(port), "--watch-s", "0", "--replicas", "1"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    outcomes: list[tuple[float, str]] = []
    stop_at: list[float] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log, "cnnray serve", timeout_s=420)
        body = png(1)
        done = threading.Event()

        def client() -> None:
            while not done.is_set():
                outcomes.append((time.monotonic(), outcome := _one_request(port, body)))
                if outcome != "ok":
                    time.sleep(0.05)  # a refused client waits a moment, as any retrying client does

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(3)  # under load
        # A client that keeps its connection open between requests (a browser on the page, a
        # requests.Session): Ray's HAProxy keeps such a connection through its soft stop, and
        # the drain waited for it until its 30 s limit, then said requests were cut short.
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        idle.request("GET", "/healthz")
        assert idle.getresponse().read() is not None
        stop_at.append(time.monotonic())
        proc.send_signal(sig)
        rc = proc.wait(timeout=180)
        time.sleep(1)  # and a moment after it is gone
        done.set()
        for t in threads:
            t.join(70)
        out = log_tail(log, 6000)
        broken = [o for _, o in outcomes if o.startswith("BROKEN")]
        assert not broken, f"{len(broken)} of {len(outcomes)} requests broken after sending: {broken[:3]}\n{out}"
        assert rc == code, out
        before = [o for t, o in outcomes if t < stop_at[0]]
        assert before.count("ok") >= CLIENTS, outcomes[:20]  # it was serving under load
        assert {o for _, o in outcomes} <= {"ok", "refused", "http-503"}, {o for _, o in outcomes}
        assert "no new connections" in out and f"stopped ({signal.Signals(sig).name})" in out
        assert "cut short" not in out, out  # the drain ended when nothing was in flight
        idle.close()
        deadline = time.monotonic() + 20
        while (left := _ours(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running: {[open(f'/proc/{p}/cmdline').read()[:120] for p in left if os.path.exists(f'/proc/{p}')]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in _ours(ray_tmp):  # only this test's Ray, never another's
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
        log.close()
