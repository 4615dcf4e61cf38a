"""Someone else's Ray on the machine (issue 25, item 1).

`ray.init()` with no address joins the newest `ray start` head recorded in the temp dir's
`ray/ray_current_cluster` (Ray 2.60, ray/_private/services.py); cnnray's "own" Ray used to
do that, and `cnnray train --workers 2` then exited 1 with "When connecting to an existing
cluster, _system_config must not be provided". Every command that starts its own Ray now
starts a private one (ray.init(address="local")) and leaves the other Ray alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.processes import free_port

pytestmark = pytest.mark.slow


def _stop(pids: list[int], group: int) -> None:
    """SIGTERM to the head's process group and to each of its processes (by pid), then
    SIGKILL what is left after 10 s (some of its processes ignore SIGTERM: waiting longer only cost 20 s per run). Only these: never `ray stop`, which stops every Ray
    of this user."""
    import psutil

    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    try:
        os.killpg(group, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def foreign_head(tmp_path):
    """A `ray start --head` of "another user": its own RAY_TMPDIR (short: Ray's socket
    paths must fit in 107 bytes) and HOME (its token, ~/.ray/auth_token, stays there).
    Yields (the environment that sees it, its processes, its session folder)."""
    import psutil

    ray_tmp = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))
    home = tmp_path / "home"
    home.mkdir()
    # A loaded machine registers a raylet slowly (Ray's default wait: 10 s).
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "HOME": str(home), "RAY_raylet_start_wait_time_s": "120"}
    env.pop("RAY_ADDRESS", None)
    # Another user's shell: none of this process's Ray settings. An in-process ray.init()
    # of an earlier test sets RAY_AUTH_MODE=token here (Ray's authentication_token_setup),
    # and with it `ray start` refuses to make the new HOME's token itself.
    for key in [k for k in env if k.startswith("RAY_AUTH")]:
        env.pop(key)
    log = open(tmp_path / "head.log", "w+")
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-port", "ray-client-server-port",
                                                    "dashboard-agent-listen-port", "metrics-export-port")]
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", *ports,
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    pids: list[int] = [head.pid]
    try:
        current = ray_tmp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 180
        while not (current.exists() and current.read_text().strip()):
            assert head.poll() is None, f"ray start exited:\n{Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not come up:\n{Path(log.name).read_text()[-3000:]}"
            time.sleep(0.5)
        time.sleep(3)  # its raylet and agents
        pids += [p.pid for p in psutil.Process(head.pid).children(recursive=True)]
        session = (ray_tmp / "ray" / "session_latest").resolve()
        yield env, pids, session, current.read_text()
    finally:
        _stop(pids, head.pid)
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_train_starts_a_private_ray_beside_a_ray_start_head(foreign_head, mnist_dir, data_cache, tmp_path):
    import psutil

    env, pids, session, address = foreign_head
    before = {p: psutil.Process(p).create_time() for p in pids}
    drivers = set((session / "logs").glob("python-core-driver-*"))
    proc = subprocess.run(
        [sys.executable, "-m", "cnnray.cli", "train", "--workers", "2", "--data-dir", str(mnist_dir),
         "--subset", "256", "--batch-size", "64", "--epochs", "1", "--no-report", "--out", str(tmp_path / "run")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run" / "result.json").exists()
    # The other Ray is as it was: every process still the same one, no driver of ours
    # connected to it, and it is still the cluster `ray start` recorded.
    gone = [p for p, t in before.items() if not psutil.pid_exists(p) or psutil.Process(p).create_time() != t]
    assert gone == [], f"processes of the other Ray stopped: {gone}"
    assert set((session / "logs").glob("python-core-driver-*")) == drivers
    assert (Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").read_text() == address
