"""Is a run's storage path reachable from every node that may host one of its workers?

Ray Train's workers write checkpoints straight into `storage_path`, and the controller
and the driver read them back: on several machines a folder on one machine's own disk
is a different, mostly empty folder on the others, so a restart "from the last
checkpoint" finds nothing, or the driver finds no checkpoint at the end. The decision:

- a URI (`s3://`, `gs://`, `abfs://`, `hdfs://`, ...; not `file://`) is shared;
- a local path is shared when its file system is a network or cluster one (the type
  `/proc/mounts` gives its mount: nfs, cifs, lustre, ceph, a FUSE object-store mount...);
- otherwise it is shared only when every node that can host a worker is this machine
  (the driver's node IP: several raylets on one machine share its disk).

    from cnnray.train.shared_storage import check_shared_storage
    check_shared_storage("/data/runs/x/ray", cpus_per_worker=1, gpu=False)  # ConfigError if not
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from cnnray.config import ConfigError

# File systems whose files every client machine sees (types as /proc/mounts names them).
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs", "beegfs",
    "panfs", "wekafs", "orangefs", "afs", "ocfs2", "gfs2",
    "fuse",  # a bare "fuse" is what mountpoint-s3 (an S3 bucket) shows
})
# FUSE mounts are listed as "fuse.<program>"; these programs serve local files only.
LOCAL_FUSE = frozenset({"fuse.portal", "fuse.gvfsd-fuse", "fuse.lxcfs", "fuse.bindfs", "fuse.fuse-overlayfs",
                        "fuse.squashfuse", "fuse.appimage", "fuse.encfs", "fuse.gocryptfs"})
SHARED_HINT = ("pass --storage-path on a shared file system mounted at the same path on every node "
               "(NFS, CephFS, Lustre, ...) or a URI such as s3://bucket/runs")


def is_remote(storage: str) -> bool:
    """Whether `storage` names remote storage by URI (`file://` is this machine's disk)."""
    scheme, sep, _ = storage.partition("://")
    return bool(sep) and scheme.lower() != "file"


def mount_type(path: str, mounts: str) -> str:
    """The file-system type of the mount holding `path` (absolute; need not exist yet: its
    nearest existing folder counts), from the text of /proc/mounts. "" if none matches."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and probe != os.path.dirname(probe):
        probe = os.path.dirname(probe)
    probe = os.path.realpath(probe)
    best, kind = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        # /proc/mounts escapes space, tab, newline and backslash in octal (\040, ...).
        point = parts[1].encode().decode("unicode_escape") if "\\" in parts[1] else parts[1]
        inside = probe == point or probe.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # the last, deepest mount wins
            best, kind = point, parts[2]
    return kind


def is_network_fs(kind: str) -> bool:
    return kind in NETWORK_FS or (kind.startswith("fuse.") and kind not in LOCAL_FUSE)


def worker_hosts(nodes: Iterable[Mapping[str, Any]], cpus_per_worker: float, gpu: bool) -> set[str]:
    """IPs of the live nodes (records as `ray.nodes()` gives them) whose resources hold at
    least one worker: `cpus_per_worker` CPUs, and a GPU with `gpu`."""
    need = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if gpu else {})}
    return {
        n["NodeManagerAddress"]
        for n in nodes
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items())
    }


def storage_problem(storage: str, hosts: set[str], driver_ip: str, fs_kind: str) -> str | None:
    """Why `storage` cannot serve workers on `hosts` when the driver runs on `driver_ip`
    and the path's file system is `fs_kind`; None when it can."""
    if is_remote(storage) or is_network_fs(fs_kind):
        return None
    others = sorted(hosts - {driver_ip})
    if not others:
        return None
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f"storage_path {storage} is on this machine's own disk ({fs_kind or 'local'}) but Ray may place "
            f"workers on {len(others)} other machine(s) ({shown}) that cannot read it: {SHARED_HINT}")


def check_shared_storage(storage: str, cpus_per_worker: float, gpu: bool) -> None:
    """ConfigError (one line) when the running Ray cluster has nodes beyond this machine that
    could host a worker and `storage` is neither a URI nor on a network file system.
    Checks the nodes alive now: an autoscaler's future nodes are not known here."""
    import ray

    if is_remote(storage):
        return
    hosts = worker_hosts(ray.nodes(), cpus_per_worker, gpu)
    driver_ip = ray.util.get_node_ip_address()
    if hosts <= {driver_ip}:
        return
    path = storage.partition("://")[2] if "://" in storage else storage
    try:
        with open("/proc/mounts") as f:
            mounts = f.read()
    except OSError:  # not Linux: nothing tells a network mount apart; the node IPs decide
        mounts = ""
    problem = storage_problem(storage, hosts, driver_ip, mount_type(path, mounts))
    if problem:
        raise ConfigError(problem)
