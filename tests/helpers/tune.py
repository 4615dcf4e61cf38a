"""Watching a `cnnray tune` a test started: its trials' states, and waiting for one to end."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def trial_statuses(exp_dir: Path) -> dict[str, str]:
    """{trial id: Tune's status} of the experiment saved in `exp_dir` ({} before Tune saved one)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_dir)).trials}
    except (ValueError, OSError):  # no experiment state saved yet
        return {}


def wait_for_a_finished_trial(proc: subprocess.Popen, exp_dir: Path, timeout_s: float = 400) -> dict[str, str]:
    """Poll until a trial of the running sweep `proc` is TERMINATED (fails if `proc` exits or
    `timeout_s` seconds pass first); returns the statuses then."""
    deadline = time.time() + timeout_s
    statuses = trial_statuses(exp_dir)
    while "TERMINATED" not in statuses.values():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(0.5)
        statuses = trial_statuses(exp_dir)
    return statuses


def spawn_sweep(args: list[str], data_home: Path, log: Path) -> subprocess.Popen:
    """`python -m cnnray.cli ARGS` in a session of its own (its id is the process's pid), so
    a test can tell afterwards whether any process it or its Ray started is still alive.
    Its output goes to `log`.out and `log`.err (files: a pipe nobody reads could fill and block it)."""
    import os
    import sys

    from tests.helpers import REPO

    env = {**os.environ, "CNNRAY_DATA": str(data_home)}
    env.pop("RAY_ADDRESS", None)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "cnnray.cli", *args], cwd=REPO, env=env, text=True,
                                stdout=out, stderr=err, start_new_session=True)


def session_processes(sid: int) -> list[int]:
    """Pids still alive in session `sid` (a sweep spawn_sweep started, and its Ray)."""
    import os

    import psutil

    alive = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except (OSError, psutil.Error):
            continue
    return alive


def wait_for_session_end(sid: int, timeout_s: float = 60) -> list[int]:
    """Poll until no process of session `sid` is left; returns those still alive at `timeout_s`."""
    deadline = time.time() + timeout_s
    while (alive := session_processes(sid)) and time.time() < deadline:
        time.sleep(0.5)
    return alive


def trial_actor_pid(proc: subprocess.Popen) -> int | None:
    """The Tune trial actor among the processes of the sweep `proc` (spawn_sweep): Tune runs a
    function trainable as the actor class ImplicitFunc, whose process title Ray sets."""
    import psutil

    for pid in session_processes(proc.pid):
        try:
            if psutil.Process(pid).cmdline()[:1] and psutil.Process(pid).cmdline()[0].startswith("ray::ImplicitFunc"):
                return pid
        except psutil.Error:
            continue
    return None


def wait_for_checkpoint(proc: subprocess.Popen, runs_dir: Path, name: str, timeout_s: float = 400) -> Path:
    """Poll until a trial's Train run under `runs_dir` has registered checkpoint `name`
    (e.g. epoch-0002); returns that run's folder."""
    from tests.helpers.processes import registered_checkpoints

    deadline = time.time() + timeout_s
    while True:
        for run in runs_dir.glob("*") if runs_dir.is_dir() else []:
            if name in registered_checkpoints(run):
                return run
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}) before {name}"
        assert time.time() < deadline, f"no {name} checkpoint in time"
        time.sleep(0.2)
