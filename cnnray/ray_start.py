"""Starting or joining Ray: the one place train, tune and serve get their Ray from.

    from cnnray.ray_start import init_ray
    own = init_ray(address)      # join `address` / $RAY_ADDRESS, else start a private local Ray
    ...
    if own: ray.shutdown()

Nothing here knows about the CLI or about training; it only decides how a local Ray is
started (loopback dashboard, workers at normal priority, Ray Train's local timings).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# Ray Train settings for a local single-node Ray; the user's own values win. Poll the
# workers every 0.5 s, not 2 s (a run's end is seen ~1.5 s sooner), and no preemption
# watcher (no spot nodes here: it would be one more idle process).
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Ray starts its worker processes at niceness 15 (RayConfig `worker_niceness`, default 15) so
# that its own daemons (GCS, raylet, agents, all at 0) stay responsive on a busy node. On a
# machine shared with anything else at niceness 0 (the driver, the user's other programs,
# other Ray daemons), a Ray Train worker then loses the CPU to them: the lecture CNN ran
# at 0.71-0.76x its plain-loop speed. A private local Ray runs its workers at the user's
# own priority instead; joining a cluster keeps the cluster's setting.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


# Ray Train V2 starts a PlacementGroupCleaner actor per run that asks Ray's state API every
# second whether the run's controller is alive. The state API is served by the dashboard
# process, so on a cluster without one (`ray start --include-dashboard=false`, a
# `ray.cluster_utils.Cluster`) every ask fails and the cleaner logs a warning, each of
# which reaches the driver's output: one line a second between the progress lines (and on
# a machine running several Rays, a second "Found multiple active Ray instances" line with
# each, from the state client's address lookup). Ray has no setting for that interval or
# that logger, so every worker process of a cnnray job runs this hook at start-up: it lets
# each of these warnings through once per process and drops the repeats. The cleaner works
# as before (it keeps asking); only its repeated line is gone.
REPEATED_WARNINGS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        "Failed to query Ray Train Controller actor state",
    "ray._private.services": "Found multiple active Ray instances",
}
WORKER_SETUP_HOOK = "cnnray.ray_start.setup_worker"


class _OncePerProcess(logging.Filter):
    """Passes the first record whose message starts with `prefix`, drops later ones."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = f"{record.msg} (cnnray shows this once per process; repeats are dropped)"
        return True


def quiet_repeated_warnings() -> None:
    """Ray's worker_process_setup_hook for cnnray jobs (see REPEATED_WARNINGS)."""
    for name, prefix in REPEATED_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerProcess) for f in logger.filters):
            logger.addFilter(_OncePerProcess(prefix))


def setup_worker() -> None:
    """Ray's worker_process_setup_hook for cnnray's Ray Train jobs: the repeated warnings
    once (REPEATED_WARNINGS), and this worker's own cluster as $RAY_ADDRESS. Ray's state
    API (Ray Train's placement-group cleaner asks it every second whether the run's
    controller lives) finds its cluster from $RAY_ADDRESS, else from the temp dir's
    `ray_current_cluster` (a `ray start` head: maybe someone else's Ray), else fails when
    several Rays run on the machine: it must ask the Ray it runs in."""
    import ray

    quiet_repeated_warnings()
    try:
        own = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 (a failing hook would end the worker: leave the variable unset)
        return
    os.environ.setdefault("RAY_ADDRESS", own)


# Ray's lines that reach a cnnray user's terminal and mean nothing to them; each stays in
# Ray's session logs (<temp dir>/ray/session_latest/logs, printed at start-up). Every other
# line Ray sends to the driver (a worker's exception, an OOM kill, its own warnings) is shown.
# - The driver's own loggers (logger name: start of the message):
DRIVER_NOISE = {
    # A new local Ray turns token authentication on, and says so: cnnray keeps the token
    # private (cnnray.raytoken) and the Ray is the user's own, reached from loopback only.
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    # Replaced by cnnray's own start-up line, which also names the session's log folder.
    "ray._private.worker": "Started a local Ray instance",
    # Serve's start inside `cnnray serve`, which says itself what it serves and where.
    "ray.serve": "Started Serve in namespace",
    # Tune's own Ctrl-C notice; cnnray says itself that the sweep stopped, what was saved
    # and, last, the command that continues it (cnnray.tune.interrupts).
    "ray.tune.tune": "Stop signal received",
}
# - Lines the raylet and GCS send to the driver (their *.err files and their error
#   messages, printed as "(raylet) ..."): regular expressions, matched with re.search.
RAYLET_NOISE = (
    # The worker pool's start-up throttle: Ray Train's controller, workers and helper actors
    # on a 2-core machine are "many" workers by its count; nothing the user can change.
    r"worker processes have been started on node",
    # An actor cnnray or Serve ended on purpose (ray.kill at shutdown) did not exit on its
    # own first: expected while stopping.
    r"graceful_shutdown failed|killed by `?ray\.kill`?",
)
# - Serve's controller lists its performance settings (the ones `cnnray serve` chose) in a
#   banner of "  • ..." lines at every start: dropped with its bullets from any process.
SERVE_BANNER = "Throughput optimized Ray Serve enabled"
# - Serve's own actors (controller, proxy, replicas) log their INFO lines to stderr too when
#   Serve's Python proxy is the ingress ("Removing 1 replica", "Got updated endpoints"):
#   their warnings and errors are shown, the INFO lines only in logs/serve/.
SERVE_ACTORS = ("ServeController", "ProxyActor", "ServeReplica")


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_driver() -> None:
    """Keep DRIVER_NOISE and RAYLET_NOISE off this driver's output (idempotent).

    The raylet's lines reach the driver through one function, Ray's
    `ray._private.worker.print_worker_logs` (both its log stream, log_to_driver, and its
    error messages call it by name): it is wrapped to drop the lines matching RAYLET_NOISE
    from the raylet and the GCS only. Ray has no setting for either: RAY_BACKEND_LOG_LEVEL
    would also thin the session logs, and log_to_driver=False would hide the workers'
    errors too."""
    import re

    import ray._private.worker as ray_worker

    for name, prefix in DRIVER_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
    printer = ray_worker.print_worker_logs
    if getattr(printer, "cnnray_quiet", False):
        return
    noise = re.compile("|".join(f"(?:{r})" for r in RAYLET_NOISE))

    def print_worker_logs(data: dict, print_file: Any, ignore_prefix: bool = False) -> None:
        if any(SERVE_BANNER in line for line in data.get("lines", [])):
            data = {**data, "lines": [line for line in data["lines"] if line.strip() and SERVE_BANNER not in line
                                      and not line.lstrip().startswith("• ")]}
            if not data["lines"]:
                return
        if str(data.get("actor_name") or "").startswith(SERVE_ACTORS):
            data = {**data, "lines": [line for line in data.get("lines", []) if not line.startswith("INFO ")]}
            if not data["lines"]:
                return
        if data.get("pid") in ("raylet", "gcs_server"):
            lines = [line for line in data.get("lines", []) if not noise.search(line)]
            if not lines:
                return
            data = {**data, "lines": lines}
        printer(data, print_file, ignore_prefix)

    print_worker_logs.cnnray_quiet = True
    ray_worker.print_worker_logs = print_worker_logs


def joining_cluster(address: str | None = None) -> bool:
    """Whether init_ray(address) joins an existing cluster (`address` or $RAY_ADDRESS)
    rather than starting a Ray on this machine."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def local_cpu_count() -> int:
    """CPUs a local Ray offers: a running Ray's own count, else the cores this process may
    use (its affinity mask, which is what `taskset` or a container's cpuset leaves).
    Never imports Ray itself: Ray reads some settings from the environment at import
    (`cnnray serve` sets them after asking this), so only an already-imported Ray is asked."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def init_ray(address: str | None = None, ray_train: bool = False) -> bool:
    """Join `address` (or $RAY_ADDRESS) if given, else start a private local single-node
    Ray, even when another Ray (`ray start`) runs on this machine. Returns True when this call started the Ray (the caller shuts it down when done),
    False when Ray was already initialised in this process or a cluster was joined.
    `ray_train`: the job runs Ray Train (train, tune), whose repeated cleaner warning every
    worker process of the job then shows once (REPEATED_WARNINGS)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Every worker process of this job (Ray Train's controller and cleaner included) runs the hook.
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK} if ray_train else None
    from cnnray.interrupts import kept_through_ray_start

    quiet_driver()
    if address:
        with kept_through_ray_start():  # SIGINT/SIGTERM during start-up: cnnray's Interrupted
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        return False
    for var, value in LOCAL_RAY_TRAIN_ENV.items():
        os.environ.setdefault(var, value)
    from cnnray.raytoken import secure_auth_token

    # The dashboard (if installed) listens on loopback only. Ray may create the auth token
    # here, readable by every local user: keep it (and its folder) to this user.
    secure_auth_token()
    # address="local": always a new Ray of our own. With no address, ray.init() would join
    # the newest `ray start` head recorded in <temp dir>/ray/ray_current_cluster (another
    # user's, or an earlier experiment's): a cluster is joined only on purpose (--address).
    try:
        with kept_through_ray_start():  # SIGINT/SIGTERM during start-up: cnnray's Interrupted
            ctx = ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True, runtime_env=runtime_env,
                     _system_config=dict(LOCAL_SYSTEM_CONFIG))
    except BaseException:
        ray.shutdown()  # the processes a start-up cut short had started (nothing: a no-op)
        raise
    secure_auth_token()
    print(f"[cnnray] started a private Ray{_dashboard_text(ctx)}; Ray's own logs: {_log_dir()}", flush=True)
    return True


def _dashboard_text(ctx: Any) -> str:
    url = getattr(ctx, "dashboard_url", None)
    return f" (dashboard http://{url})" if url else ""


def _log_dir() -> str:
    """This driver's Ray session's log folder (every Ray process's logs, raylet.out and
    the workers' worker-*.err included)."""
    import ray

    try:
        return str(ray._private.worker._global_node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 (only a hint: the usual place)
        return "<temp dir>/ray/session_latest/logs"


def local_ray_alive(wait_s: float = 1.0) -> bool:
    """False when this driver started the local Ray and one of the processes it started
    (GCS, raylet, log monitor, dashboard...) has exited; True otherwise (a joined cluster
    is not ours to judge). A SIGTERM sent to the whole process group (systemd's
    control-group stop, `kill -TERM -- -PGID`) reaches Ray's processes and its workers as
    well as the driver: Serve's controller dies with them, and a graceful stop that asks
    it (serve.shutdown) would wait out its 30 s timeout while Ray restarts it. None of
    these processes exits on its own while the driver runs, so one that has is the sign.
    A process that got the signal takes a moment to exit: watch `wait_s` seconds for that."""
    import time

    ray = sys.modules.get("ray")
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    if node is None:
        return True
    deadline = time.monotonic() + wait_s
    while True:
        if node.dead_processes():
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.1)
