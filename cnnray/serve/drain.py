"""Graceful stop of `cnnray serve`: stop accepting, finish what was accepted, then stop Ray.

Ray Serve 2.60 stops its HAProxy with SIGKILL (`HAProxyApi.stop`, ray/serve/_private/
haproxy.py) when Serve shuts down: every connection HAProxy holds is reset, and during the
seconds the shutdown takes HAProxy still accepts new ones, which are then reset too
(measured: 11 of 67 requests sent during a SIGTERM's 6 s shutdown got RemoteDisconnected
after sending). So `cnnray serve` first soft-stops HAProxy itself, with the signal Ray's
own graceful reloads use (SIGUSR1, HAProxy's "soft stop"): HAProxy closes its listening
sockets at once (a new connection is refused before anything is sent: a client can retry
it elsewhere), lets every accepted request finish (the replicas are still running),
closes idle keep-alive connections, and exits when none is left. Only then does Serve
shut down. A request that is still running after DRAIN_TIMEOUT_S (Serve's own
graceful_shutdown_timeout_s for the replicas) is cut short as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from cnnray.serve.ingress import haproxy_processes

DRAIN_TIMEOUT_S = 30.0  # = the deployment's graceful_shutdown_timeout_s (cnnray/serve/app.py)


def soft_stop_haproxy(folder: Path, timeout_s: float = DRAIN_TIMEOUT_S) -> tuple[int, bool]:
    """SIGUSR1 to every HAProxy of this FastIngress `folder`, then wait until they have all
    exited (their accepted requests answered) or `timeout_s` passed: (processes signalled,
    whether all exited in time). Signalling again is harmless (a draining HAProxy ignores it)."""
    pids = haproxy_processes(folder)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in haproxy_processes(folder) if p in pids]
        if not alive:
            return len(pids), True
        if time.monotonic() > deadline:
            return len(pids), False
        time.sleep(0.05)
