"""Ray Serve's fast ingress, the default of `cnnray serve`: HAProxy in front of replicas that
answer HTTP themselves, with every port on loopback unless `--host` says otherwise.

Ray reads these settings from the environment of its processes when they start
(ray/serve/_private/constants.py, Ray 2.60; every name below is checked there by
tests/serve/test_ingress.py), so they must be in place before Ray starts: `cnnray serve` sets
them before it starts its local Ray; a cluster sets them in the head's and workers'
environment (cluster/local.sh, cluster/kuberay/rayservice.yaml). For Ray's own tools:

    python -m cnnray.serve.ingress -- serve run jobs/configs/serve.yaml

runs the command with the settings (free loopback ports, a private folder for HAProxy's
files) and removes what it left when the command ends.

Measured on 2 cores (issue 11, 32 clients, MNIST PNGs): the Python HTTP proxy 237 req/s,
these settings 883 req/s with one replica.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from cnnray.serve.haproxy_loopback import ADMIN_HOST_ENV, REAL_BINARY_ENV, WRAPPER_SH, real_binary

# The fixed part, with the reasons. Values are strings: they go into environments.
FAST_INGRESS_ENV = {
    # HAProxy replaces Serve's Python HTTP proxy and forwards to each replica's own HTTP
    # server (it turns on direct ingress, RAY_SERVE_ENABLE_DIRECT_INGRESS).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Ray's bundle of request-path settings: user code on the replica's event loop (no
    # thread hop), buffered request logs, no router loop thread, gRPC between processes.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # HAProxy threads (Ray's default 4): one forwards ~10k small requests/s, and every
    # extra thread competes with the replicas for the cores.
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    # A stopping replica keeps its port open this long so load balancers can deregister
    # it (Ray's default 30 s, which also outlasts Serve's 30 s shutdown, leaving HAProxy
    # to be killed). HAProxy is told of the change at once and retries refused
    # connections, so 2 s is plenty on one node.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # No per-request log line from HAProxy to Ray's HAProxy manager, which parses it in Python
    # for Ray's serve_num_http_requests family (0.05 ms of CPU per request, README "Serving
    # performance"): cnnray_serve_requests_total and the latency histogram count every
    # request already, and the Grafana dashboard reads those.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # Seconds Serve gives HAProxy to answer on its admin socket before it kills the proxy
    # (Ray's default 5, then 10, 15, ... on restarts): on a loaded machine the first start
    # can take longer, and the first kill fails `serve.start`.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}
# For a Ray started on this machine alone: Ray's single-machine mode (its default on macOS and
# Windows) takes 127.0.0.1 as the node's address, so its agents (runtime env, dashboard
# agent, the metrics endpoint) listen on loopback rather than on the machine's address.
SINGLE_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# HAProxy's files, each under a per-node folder Ray adds (ray/serve/_private/haproxy.py).
_HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free TCP ports on `host` (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def haproxy_wrapper(folder: Path) -> Path:
    """cnnray.serve.haproxy_loopback's wrapper script, written to `folder`."""
    script = folder / "cnnray-haproxy"
    script.write_text(WRAPPER_SH)
    script.chmod(0o755)
    return script


def fast_ingress_env(folder: Path, admin_host: str = "127.0.0.1") -> dict[str, str]:
    """The environment for Ray's processes: FAST_INGRESS_ENV, HAProxy's stats and metrics
    ports (free ones, so several servers can share a machine) bound to `admin_host`, and
    HAProxy's files in `folder` (short: HAProxy refuses socket paths over 97 bytes, and Ray
    adds a 56-character node id folder). ValueError if `folder` is too long."""
    longest = len(str(folder)) + 1 + 56 + len("/metrics.sock")
    if longest > 97:
        raise ValueError(f"{folder} is too long for HAProxy's socket paths ({longest} > 97 bytes): use a shorter folder")
    stats_port, metrics_port = free_ports(2, admin_host)
    env = dict(FAST_INGRESS_ENV)
    env.update({
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(haproxy_wrapper(folder)),
        ADMIN_HOST_ENV: admin_host,
        REAL_BINARY_ENV: real_binary() or "",  # empty: the script looks on PATH
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
    })
    env.update({var: str(folder / name) for var, name in _HAPROXY_FILES.items()})
    return env


class FastIngress:
    """The fast-ingress environment for a local Ray about to start, and its clean-up.

        with FastIngress() as env:   # os.environ holds the settings (restored on exit)
            ray.init(...); ...; ray.shutdown()
        # any HAProxy still running from this folder is stopped, the folder removed

    `apply=False` leaves os.environ alone (for a child process: pass `env`); `single_node`
    adds SINGLE_NODE_ENV (not for the head of a cluster that other machines join)."""

    def __init__(self, admin_host: str = "127.0.0.1", apply: bool = True, single_node: bool = True) -> None:
        self.admin_host, self.apply, self.single_node = admin_host, apply, single_node
        self.folder: Path | None = None
        self.env: dict[str, str] = {}
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> dict[str, str]:
        # /tmp, not $TMPDIR: socket paths must stay short.
        self.folder = Path(tempfile.mkdtemp(prefix="cnnray-hap-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.env = fast_ingress_env(self.folder, self.admin_host)
        if self.single_node:
            self.env.update(SINGLE_NODE_ENV)
        if self.apply:
            self._saved = {k: os.environ.get(k) for k in self.env}
            os.environ.update(self.env)
        return self.env

    def __exit__(self, *exc: object) -> None:
        self.close()

    def restore_environ(self) -> None:
        """Put os.environ back as it was (a Ray already started keeps the settings)."""
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved = {}

    def close(self) -> None:
        """After Ray has stopped: end any HAProxy it left, remove the folder, restore os.environ."""
        if self.folder is None:
            return
        stop_leftover_haproxy(self.folder)
        self.restore_environ()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


def haproxy_processes(folder: Path) -> list[int]:
    """Ids of the processes whose command line names a config file in `folder`: the HAProxy
    processes of this FastIngress alone (Linux /proc; Ray's HAProxy mode is Linux-only)."""
    prefix = (str(folder) + os.sep).encode()
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if b"-f" in args and any(a.startswith(prefix) and a.endswith(b".cfg") for a in args):
            pids.append(int(entry))
    return pids


def stop_leftover_haproxy(folder: Path, timeout_s: float = 5.0) -> list[int]:
    """SIGTERM (then SIGKILL after `timeout_s`) every HAProxy still running from `folder`."""
    import time

    pids = haproxy_processes(folder)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in haproxy_processes(folder) if p in pids]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def main(argv: list[str] | None = None) -> int:
    """`python -m cnnray.serve.ingress [--admin-host H] -- COMMAND ...`: COMMAND (e.g.
    `serve run config.yaml`) with the fast-ingress environment of a single-machine Ray."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m cnnray.serve.ingress", description=main.__doc__)
    p.add_argument("--admin-host", default="127.0.0.1", help="address of HAProxy's stats and metrics ports")
    p.add_argument("--print-env", metavar="DIR",
                   help="write HAProxy's wrapper into DIR (created; keep it short) and print the settings as "
                        "NAME=VALUE lines, for a Ray head started by other means (cluster/local.sh)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.print_env:
        folder = Path(args.print_env).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        for k, v in fast_ingress_env(folder, args.admin_host).items():
            print(f"{k}={v}")
        return 0
    if not command:
        p.error("give a command to run, e.g. -- serve run jobs/configs/serve.yaml")
    with FastIngress(args.admin_host, apply=False) as env:
        proc = subprocess.Popen(command, env={**os.environ, **env})
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
