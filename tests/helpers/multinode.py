"""A Ray cluster of several nodes on this machine's loopback, for tests: a head with no
CPUs (nothing trains there, as on a real cluster's head) and worker nodes, each its own
raylet with its own CPUs, added and removed while a run goes on.

    cluster = LoopbackCluster(worker_nodes=2)   # 2 nodes x 1 CPU
    ... cnnray train --address cluster.address ...
    cluster.remove(cluster.workers[0]); cluster.add_worker()
    cluster.shutdown()                           # only what it started; never `ray stop`

Everything binds 127.0.0.1 (or another loopback address given to `add_worker`) on ports
the OS picks. While it runs, the environment (inherited by the cnnray commands a test
starts) holds RAY_TMPDIR, a private folder: Ray writes "the current cluster's address"
into <RAY_TMPDIR>/ray/ray_current_cluster, and in /tmp/ray any other `ray.init()` on the
machine would join this cluster instead of starting its own. It also holds
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, under which a driver given 127.0.0.1:PORT connects
to 127.0.0.1 (otherwise Ray swaps loopback for the machine's own address, where nothing
of this cluster listens).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from typing import Any

ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    def __init__(self, worker_nodes: int = 2, cpus_per_node: int = 1) -> None:
        from ray.cluster_utils import Cluster

        self.cpus_per_node = cpus_per_node
        # Short: Ray's Unix socket paths live under it (at most 107 bytes).
        self.tmp = tempfile.mkdtemp(prefix="cnr", dir="/tmp")
        self._saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", *ENV)}
        os.environ.update({"RAY_TMPDIR": self.tmp, **ENV})
        try:
            # No dashboard, as on a cluster started without one; the head still runs a small
            # dashboard process (usage stats), on a free port rather than Ray's 8265, and
            # its agent likewise rather than 52365.
            self.cluster = Cluster(initialize_head=True, head_node_args=dict(
                num_cpus=0, include_dashboard=False, dashboard_port=_free_port(),
                dashboard_agent_listen_port=_free_port(), node_ip_address="127.0.0.1"))
            self.workers: list[Any] = []
            for _ in range(worker_nodes):
                self.add_worker()
        except BaseException:
            self.shutdown()
            raise

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self, ip: str = "127.0.0.1", cpus: int | None = None):
        """Start one more worker node (a raylet with `cpus` CPUs) at loopback address `ip`."""
        node = self.cluster.add_node(num_cpus=cpus or self.cpus_per_node, node_ip_address=ip)
        self.workers.append(node)
        return node

    def remove(self, node) -> None:
        """Kill a worker node's raylet and every process on it, as a lost machine."""
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def alive_cpus(self) -> float:
        """CPUs of the live nodes, as the cluster's GCS sees them."""
        return sum(n["Resources"].get("CPU", 0.0) for n in self.cluster.global_state.node_table() if n["Alive"])

    def wait_cpus(self, cpus: float, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_cpus() != cpus:
            assert time.monotonic() < deadline, f"cluster has {self.alive_cpus()} CPUs, expected {cpus}"
            time.sleep(0.2)

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        """Every actor of `class_name` this cluster ran (alive or dead), from its GCS."""
        table = self.cluster.global_state.actor_table(None)
        return [a for a in table.values() if a.get("ActorClassName", "").endswith(class_name)]

    def node_ids(self) -> dict[str, str]:
        """Node id -> IP of every node the cluster has had."""
        return {n["NodeID"]: n["NodeManagerAddress"] for n in self.cluster.global_state.node_table()}

    def shutdown(self) -> None:
        """Stop every node this object started, then restore the environment."""
        try:
            if getattr(self, "cluster", None) is not None:
                self.cluster.shutdown()
        finally:
            for k, v in self._saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(self.tmp, ignore_errors=True)
