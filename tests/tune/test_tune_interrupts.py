"""`cnnray tune` stopped at the moments that lost a trial's history, then resumed: Ctrl-C
during epoch 2, and SIGTERM just after the trial's last checkpoint (before Tune saw the
trial end). One sweep (one trial of 3 epochs) serves both, run three times:

1. Ctrl-C once epoch 1's checkpoint is registered (epoch 2 is training): exit 130;
2. `--resume`; once epoch 3's checkpoint is registered the trial actor is frozen (SIGSTOP)
   so that Tune cannot see the trial end, and the sweep gets SIGTERM: exit 143, the trial
   saved unfinished; the actor is thawed once Tune has saved its state;
3. `--resume` to the end: the trial's Train run restores epoch 3's checkpoint, has nothing
   left to train and reports nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.tune import (spawn_sweep, trial_actor_pid, trial_statuses, wait_for_checkpoint,
                                wait_for_session_end)


def _driver_tracebacks(err: str) -> list[str]:
    """Tracebacks of `cnnray tune` itself (Ray's actors' log lines come prefixed with their
    name, e.g. a TrainController's timeouts on a loaded machine)."""
    return [line for line in err.splitlines() if line.startswith("Traceback")]


def _ended(proc, log, timeout_s=180):
    """(exit status, stdout, stderr) of a sweep once it has exited."""
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


@pytest.fixture(scope="module")
def interrupted_sweep(mnist_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupted-sweep")
    out, cache = tmp / "sweep", tmp / "cache"
    space = tmp / "space.yaml"
    space.write_text("lr: {grid: [0.05]}\n")
    args = ["tune", "--model", "cnn", "--data-dir", str(mnist_dir), "--subset", "1000", "--batch-size", "100",
            "--epochs", "3", "--samples", "1", "--space", str(space), "--scheduler", "none", "--seed", "0",
            "--out", str(out)]
    seen: dict = {"out": out}

    proc = spawn_sweep(args, cache, tmp / "ctrl-c")
    try:
        wait_for_checkpoint(proc, out / "runs", "epoch-0001")
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGINT)
    seen["ctrl_c"] = _ended(proc, tmp / "ctrl-c")
    seen["ctrl_c_left"] = wait_for_session_end(proc.pid)

    proc = spawn_sweep([*args, "--resume"], cache, tmp / "term")
    try:
        wait_for_checkpoint(proc, out / "runs", "epoch-0003")
        actor = trial_actor_pid(proc)
        assert actor, "no trial actor found"
        os.kill(actor, signal.SIGSTOP)  # the trial cannot return: Tune still sees it running
        try:
            proc.send_signal(signal.SIGTERM)
            time.sleep(5)  # Tune saves its state as soon as its loop sees the signal, then stops trials
        finally:
            try:
                os.kill(actor, signal.SIGCONT)
            except ProcessLookupError:
                pass  # the sweep did not survive the signal, and took its Ray with it
    finally:
        seen["term"] = _ended(proc, tmp / "term")
    seen["term_left"] = wait_for_session_end(proc.pid)
    seen["term_statuses"] = trial_statuses(out / "tune")

    proc = spawn_sweep([*args, "--resume"], cache, tmp / "resumed")
    seen["resumed"] = _ended(proc, tmp / "resumed", timeout_s=600)
    return seen


@pytest.mark.slow
def test_ctrl_c_during_epoch_2_then_resume_keeps_epochs_1_2_3(interrupted_sweep):
    rc, out, err = interrupted_sweep["ctrl_c"]
    assert rc == 130, out[-2000:] + err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("cnnray: interrupted (SIGINT); continue with: cnnray tune ") and last.endswith("--resume")
    assert not _driver_tracebacks(err)
    assert not interrupted_sweep["ctrl_c_left"], "processes left running after Ctrl-C"

    rc, out, err = interrupted_sweep["resumed"]
    assert rc == 0, out[-3000:] + err[-3000:]
    sweep = interrupted_sweep["out"]
    [(trial, history)] = json.loads((sweep / "histories.json").read_text()).items()
    assert [h["epoch"] for h in history] == [1, 2, 3]  # not [3]: the epochs before the interrupt stay


@pytest.mark.slow
def test_sigterm_just_after_the_last_checkpoint_then_resume_keeps_the_results(interrupted_sweep):
    import pandas as pd

    rc, out, err = interrupted_sweep["term"]
    assert rc == 143, out[-2000:] + err[-2000:]
    assert err.strip().splitlines()[-1].endswith("--resume") and not _driver_tracebacks(err)
    assert "SIGTERM received" not in err + out  # Ray's stack dump and abort
    assert not interrupted_sweep["term_left"], "processes left running after SIGTERM"
    [status] = interrupted_sweep["term_statuses"].values()
    assert status != "TERMINATED"  # what makes the resume rerun a trial that has nothing left to train

    rc, out, err = interrupted_sweep["resumed"]
    assert rc == 0, out[-3000:] + err[-3000:]
    sweep = interrupted_sweep["out"]
    [row] = pd.read_csv(sweep / "trials.csv").to_dict("records")
    assert row["status"] == "TERMINATED" and row["epochs_run"] == 3 and not row["stopped_early"]
    best = json.loads((sweep / "best.json").read_text())
    assert best["epoch"] in (1, 2, 3) and best["test_accuracy"] > 0.5
