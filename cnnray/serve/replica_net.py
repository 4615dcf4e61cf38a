"""Where a Serve replica's own servers listen: every replica class (the predict replicas,
the explain replica) calls `replica_grpc_on_loopback()` first in its `__init__`."""

from __future__ import annotations

from typing import Any


def replica_grpc_on_loopback() -> None:
    """On a single-machine Ray (node address 127.0.0.1), have this replica's inter-replica
    gRPC server listen on 127.0.0.1 rather than `[::]`, every interface, which Ray 2.60
    hard-codes (ray/serve/_private/replica.py, `_on_initialized`, which runs after
    `__init__`). Callers reach it at the node address, so nothing else changes; on a
    cluster (a routable node address) Ray's choice stands."""
    import ray
    import ray.serve._private.replica as replica_module

    if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
        return
    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_cnnray_loopback", False):
        return

    def add_port(server: Any, address: str) -> int:
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    add_port._cnnray_loopback = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = add_port
