"""Ctrl-C and SIGTERM of `cnnray train` at any moment: a short message, exit 130/143, no
process left running, the last line says how to continue, and `--resume` continues with
the whole history. Each test also checks that Ray's start-up and shutdown noise stays off
the user's terminal while cnnray's own lines are there."""

from __future__ import annotations

import json
import signal
import time

import pytest

from cnnray.cli import main
from tests.helpers.signals import Interruptible, processes_with

# Tiny and quick: a few seconds an epoch on a loaded 2-core machine.
TINY = ["--model", "cnn", "--dataset", "mnist", "--subset", "2000", "--batch-size", "64", "--no-report"]
# Ray's lines a user must not see (each is in Ray's session logs), and a crash's.
NOISE = ("Token authentication is enabled", "SIGTERM received", "PreemptionWatcher",
         "worker processes have been started", "graceful_shutdown failed", "core_worker.cc")


def _assert_quiet(output: str) -> None:
    """None of NOISE, and no traceback from the driver (a Ray actor's lines, prefixed
    "(TrainController pid=...)", may hold one of Ray's own on an overloaded machine)."""
    for noise in NOISE:
        assert noise not in output, f"{noise!r} in:\n{output[-3000:]}"
    driver = [line for line in output.splitlines() if "pid=" not in line.split(")", 1)[0]]
    assert not any(line.startswith("Traceback") for line in driver), output[-3000:]


def _history(out) -> list[int]:
    return [h["epoch"] for h in json.loads((out / "result.json").read_text())["history"]]


def _resume_in_local_mode(args: list[str]) -> None:
    """The hint's command, continued in local mode (no Ray: a resume may change --workers)."""
    args = [a for a in args if a != "cnnray"][1:]  # drop "cnnray train"
    i = args.index("--workers")
    args[i + 1] = "1"
    assert main(["train", *args]) == 0


def _hint(output: str) -> list[str]:
    """The last line, which must be the way to continue: the train command with --resume."""
    last = output.strip().splitlines()[-1]
    assert "to continue: cnnray train " in last and last.endswith("--resume"), output[-3000:]
    return last.split("to continue: ", 1)[1].split()


@pytest.mark.slow
def test_sigterm_of_a_ray_train_run_mid_epoch_stops_cleanly_and_resumes(mnist_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--data-dir", str(mnist_dir), "--epochs", "3", "--workers", "2", "--out", str(out)]
    run = Interruptible(args, data_cache)
    try:
        run.wait_for(r"\[cnnray\] epoch 1/3")
        run.send(signal.SIGTERM)  # `kill -TERM`, as a scheduler stops a job
        rc, output = run.finish()
        assert run.left_running() == []  # no raylet, GCS, worker or agent outlives the driver
    finally:
        run.kill_all()
    assert rc == 143, output[-3000:]
    assert "cnnray: interrupted (SIGTERM)" in output
    for line in ("[cnnray] started a private Ray", "Ray's own logs: ", "[cnnray] training cnn on mnist"):
        assert line in output, line
    _assert_quiet(output)
    hint = _hint(output)
    assert hint[:2] == ["cnnray", "train"] and f"--out {out}" in " ".join(hint)

    _resume_in_local_mode(hint)
    assert _history(out) == [1, 2, 3]  # continued, not restarted


@pytest.mark.slow
def test_ctrl_c_of_a_local_mode_run_exits_130_and_resumes(mnist_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--data-dir", str(mnist_dir), "--epochs", "3", "--workers", "1", "--out", str(out)]
    run = Interruptible(args, data_cache)
    try:
        run.wait_for(r"\[cnnray\] epoch 1/3")
        run.ctrl_c()  # the terminal's SIGINT, to the whole foreground group
        rc, output = run.finish()
        assert run.left_running() == []
    finally:
        run.kill_all()
    assert rc == 130, output[-3000:]
    assert "cnnray: interrupted (SIGINT)" in output
    _assert_quiet(output)
    assert "its last checkpoint is epoch" in output.strip().splitlines()[-1]
    _resume_in_local_mode(_hint(output))
    assert _history(out) == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_during_ray_start_up_leaves_nothing_running(mnist_dir, data_cache, tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--data-dir", str(mnist_dir), "--epochs", "1", "--workers", "2", "--out", str(out)]
    run = Interruptible(args, data_cache)
    try:
        # Ray is starting: its GCS runs, the driver has not connected (no training line yet).
        run.wait_until(lambda: any("gcs_server" in p for p in processes_with(run.marker)))
        assert "[cnnray] training" not in run.output
        run.send(signal.SIGTERM)
        time.sleep(0.5)
        run.send(signal.SIGTERM)  # impatient: a second one while it stops
        rc, output = run.finish()
        assert run.left_running() == []
    finally:
        run.kill_all()
    assert rc == 143, output[-3000:]
    _assert_quiet(output)
    assert "no epoch was checkpointed yet" in output.strip().splitlines()[-1]
    assert "cnnray: interrupted (SIGTERM)" in output  # the second signal changed nothing


@pytest.mark.slow
def test_a_run_stopped_after_its_last_checkpoint_finishes_on_resume(mnist_dir, data_cache, tmp_path):
    """An interrupt during the end-of-run test leaves every epoch checkpointed and no
    result.json: --resume with the same --epochs trains nothing more and finishes the run
    (it used to refuse: "has already trained 2 epoch(s)")."""
    out = tmp_path / "run"
    args = ["train", *TINY, "--data-dir", str(mnist_dir), "--epochs", "2", "--workers", "1", "--out", str(out)]
    assert main(args) == 0
    (out / "result.json").unlink()  # the state an interrupt after the last checkpoint leaves
    assert main([*args, "--resume"]) == 0
    assert _history(out) == [1, 2]
    assert main([*args, "--resume"]) == 2  # finished now: more epochs are needed to go on
