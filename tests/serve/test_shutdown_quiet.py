"""`cnnray serve` stopped as systemd stops a service (SIGTERM to its whole process group,
Ray's processes included): it ends in seconds, exit 143, nothing left running, and with
none of Ray's start-up or shutdown noise on the terminal (it stays in Ray's session logs).
It used to wait 30 s for Serve's controller, which had died with the raylet, and end with
"Controller failed to shut down within 30.0s"."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.helpers.processes import free_port
from tests.helpers.serve import MNIST_INFO, save_model
from tests.helpers.signals import Interruptible

NOISE = ("Token authentication is enabled", "Controller failed to shut down", "graceful_shutdown failed",
         "killed by `ray.kill`", "worker processes have been started", "SIGTERM received", "core_worker.cc")


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_serve_quickly_and_quietly(tmp_path):
    ckpt = save_model(tmp_path / "ckpt", "cnn", MNIST_INFO)
    port = free_port()
    run = Interruptible(["serve", "--checkpoint", str(ckpt), "--name", "digits", "--port", str(port),
                         "--replicas", "1", "--watch-s", "0"])
    try:
        run.wait_for(r"press Ctrl-C to stop")
        ray_logs = [line for line in run.output.splitlines() if "Ray's own logs: " in line]
        assert ray_logs, run.output[-3000:]  # where Ray's lines went instead
        sent = time.monotonic()
        os.killpg(run.proc.pid, signal.SIGTERM)  # the whole group, as systemd's KillMode=control-group does
        rc, output = run.finish(timeout_s=60)
        took = time.monotonic() - sent
        assert run.left_running() == []
    finally:
        run.kill_all()
    assert rc == 143, output[-3000:]
    assert took < 25, f"stopping took {took:.1f} s:\n{output[-3000:]}"  # Serve's timeout is 30 s
    assert "[cnnray] stopped (SIGTERM)" in output
    for noise in NOISE:
        assert noise not in output, f"{noise!r} in:\n{output[-3000:]}"
    driver = [line for line in output.splitlines() if "pid=" not in line.split(")", 1)[0]]
    assert not any(line.startswith("Traceback") for line in driver), output[-3000:]
