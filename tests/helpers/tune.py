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
