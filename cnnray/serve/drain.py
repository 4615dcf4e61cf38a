"""Graceful stop of `cnnray serve`: stop accepting, finish what was accepted, then stop Ray.

Ray Serve 2.60 stops its HAProxy with SIGKILL (`HAProxyApi.stop`, ray/serve/_private/
haproxy.py) when Serve shuts down: every connection HAProxy holds is reset, and during the
seconds the shutdown takes HAProxy still accepts new ones, which are then reset too
(measured: 11 of 67 requests sent during a SIGTERM's 6 s shutdown got RemoteDisconnected
after sending). So `cnnray serve` first soft-stops HAProxy itself, with the signal Ray's
own graceful reloads use (SIGUSR1, HAProxy's "soft stop"): HAProxy closes its listening
sockets at once (a new connection is refused before anything is sent: a client can retry
it elsewhere) and lets every accepted request finish (the replicas are still running).

The drain ends when no request is in flight, not when HAProxy exits: Ray's HAProxy config
has `option idle-close-on-response`, so a soft-stopped HAProxy keeps each idle keep-alive
connection open until that client's next request (answered with `Connection: close`) or
its keep-alive timeout. Waiting for the exit made any client holding an idle connection (a
browser with the page open, a `requests.Session`) stretch every stop to DRAIN_TIMEOUT_S.
In-flight requests are the BACKEND rows' `scur` of HAProxy's `show stat` (request streams
being served or queued for a server; idle keep-alive connections are not counted: the
measure Ray's own `count_ongoing_http_requests` uses), read over an admin-socket session
opened before the soft stop (the socket is a listener and closes with the others; an open
session stays). The count must stay zero for QUIET_S, so that a keep-alive client's next
request, sent right after its last answer, is answered too. A request still running after
DRAIN_TIMEOUT_S (Serve's own graceful_shutdown_timeout_s for the replicas) is cut short.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import socket
import time
from pathlib import Path

from cnnray.serve.ingress import haproxy_processes

DRAIN_TIMEOUT_S = 30.0  # = the deployment's graceful_shutdown_timeout_s (cnnray/serve/app.py)
QUIET_S = 0.5  # no request in flight for this long (seconds) ends the drain
ADMIN_TIMEOUT_S = 2.0  # one admin-socket command; a slower answer counts as "unknown"
_PROMPT = b"\n> "  # HAProxy's CLI prompt in interactive mode


class AdminSession:
    """One interactive session on an HAProxy admin socket (HAProxy management guide, "prompt")."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(ADMIN_TIMEOUT_S)
        try:
            self.sock.connect(str(path))
            self.command("prompt")
        except BaseException:
            self.sock.close()
            raise

    def command(self, text: str) -> str:
        """The answer to `text`; OSError (socket.timeout included) when HAProxy does not answer."""
        self.sock.sendall(text.encode() + b"\n")
        buf = b""
        while not buf.endswith(_PROMPT):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("HAProxy closed its admin session")
            buf += chunk
        return buf[: -len(_PROMPT)].decode(errors="replace")

    def in_flight(self) -> int:
        """Requests being served or queued: the sum of every backend's BACKEND-row `scur`."""
        text = self.command("show stat")
        start = text.find("# ")
        if start < 0:
            raise ConnectionError("no statistics in HAProxy's answer")
        rows = list(csv.reader(io.StringIO(text[start + 2:])))
        header = rows[0]
        svname, scur = header.index("svname"), header.index("scur")
        return sum(int(r[scur] or 0) for r in rows[1:] if len(r) > scur and r[svname] == "BACKEND")

    def close(self) -> None:
        self.sock.close()


def _sessions(folder: Path) -> list[AdminSession]:
    """A session on each admin socket of this FastIngress `folder` (one per node folder), or
    none when any of them cannot be opened: a count that missed a node's requests would end
    the drain early, so the drain then waits for HAProxy's exit instead."""
    sessions: list[AdminSession] = []
    try:
        for path in sorted(folder.glob("*/admin.sock")):
            sessions.append(AdminSession(path))
    except OSError:
        _close(sessions)
        return []
    return sessions


def _close(sessions: list[AdminSession]) -> None:
    for s in sessions:
        s.close()


def soft_stop_haproxy(folder: Path, timeout_s: float = DRAIN_TIMEOUT_S) -> tuple[int, bool]:
    """SIGUSR1 to every HAProxy of this FastIngress `folder`, then wait until no request is
    in flight for QUIET_S seconds, or they have all exited, or `timeout_s` passed:
    (processes signalled, whether the drain finished in time). Idle keep-alive connections
    are left to Serve's shutdown. Signalling again is harmless (a draining HAProxy ignores it)."""
    pids = haproxy_processes(folder)
    sessions = _sessions(folder) if pids else []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        quiet_since: float | None = None
        while True:
            now = time.monotonic()
            if not [p for p in haproxy_processes(folder) if p in pids]:
                return len(pids), True
            if sessions:
                try:
                    busy = sum(s.in_flight() for s in sessions)
                except (OSError, ValueError):  # no longer readable: wait for the exit as before
                    _close(sessions)
                    busy, sessions = 1, []
                if busy:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= QUIET_S:
                    return len(pids), True
            if now > deadline:
                return len(pids), False
            time.sleep(0.05)
    finally:
        _close(sessions)


def default_folder() -> Path:
    """Where Ray keeps its HAProxy files (ray/serve/_private/constants.py): the folder of
    $RAY_SERVE_HAPROXY_SOCKET_PATH, by default /tmp/haproxy-serve (one sub-folder per node)."""
    return Path(os.environ.get("RAY_SERVE_HAPROXY_SOCKET_PATH", "/tmp/haproxy-serve/admin.sock")).parent


def main(argv: list[str] | None = None) -> int:
    """`python -m cnnray.serve.drain [--folder DIR] [--timeout-s S]`: the same drain for a
    Ray Serve that cnnray did not start (a Kubernetes preStop hook, cluster/kuberay/
    rayservice.yaml). Exit 0 when drained (or no HAProxy runs), 1 when requests were still
    running after the timeout; one line either way."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cnnray.serve.drain", description=main.__doc__)
    parser.add_argument("--folder", type=Path, default=default_folder(), help="Ray's HAProxy folder (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=DRAIN_TIMEOUT_S, help="longest wait, seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    count, drained = soft_stop_haproxy(args.folder, args.timeout_s)
    if drained:
        print(f"[cnnray] drained {count} HAProxy process(es) under {args.folder}: no request in flight", flush=True)
        return 0
    print(f"[cnnray] requests still running after {args.timeout_s:g} s under {args.folder}", flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
