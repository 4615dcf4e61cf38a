"""Fixtures of the data tests: a local download mirror, and a URL nothing answers."""

from __future__ import annotations

import collections
import http.server
import socket
import threading
import time

import pytest


@pytest.fixture
def http_root(tmp_path):
    """A local http.server on 127.0.0.1: (dir it serves, its URL, per-path GET counts)."""
    root = tmp_path / "www"
    root.mkdir()
    hits: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            with lock:
                hits[self.path] += 1
            time.sleep(0.02)  # a slow mirror, so concurrent loaders really overlap
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", hits
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def closed_url():
    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
