"""cnnray.interrupts (SIGTERM like Ctrl-C, a second signal while stopping only printed) and
the filter that keeps Ray's noise off the driver's output (cnnray.ray_start), without
starting Ray. The end-to-end checks are tests/train/test_interrupts.py and
tests/serve/test_shutdown_quiet.py."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import os, signal, time
    from cnnray import interrupts
    interrupts.install()
    try:
        os.kill(os.getpid(), signal.{first})
        time.sleep(5)
        print("not raised")
    except KeyboardInterrupt as e:
        os.kill(os.getpid(), signal.SIGINT)  # a second signal during the clean-up
        time.sleep(0.2)
        print("clean-up done", interrupts.signal_name(e), interrupts.exit_status(e))
""")


def _run(first: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(first=first)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, preexec_fn=lambda: __import__("signal").signal(2, 0))


def test_sigterm_and_sigint_raise_once_and_a_second_signal_only_prints():
    for first, status in (("SIGTERM", 143), ("SIGINT", 130)):
        done = _run(first)
        assert done.stdout.strip() == f"clean-up done {first} {status}", done.stderr
        assert "while stopping: still cleaning up" in done.stderr and "Traceback" not in done.stderr


def test_an_ignored_sigint_stays_ignored():
    script = ("import os, signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "from cnnray import interrupts; interrupts.install()\n"
              "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
              "assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_rays_noise_is_dropped_and_everything_else_is_printed():
    import ray._private.worker as ray_worker

    from cnnray.ray_start import quiet_driver

    quiet_driver()
    quiet_driver()  # idempotent: one wrapper
    out = io.StringIO()
    worker_count = ("WARNING: 6 PYTHON worker processes have been started on node: abc with address: 127.0.0.1, "
                    "which is 3x the maximum expected startup concurrency (2).")
    killed = ("Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task "
              "will be retried. Error: The actor is dead because it was killed by `ray.kill`.")
    oom = "Task was killed due to the node running low on memory."
    ray_worker.print_worker_logs({"pid": "raylet", "lines": [worker_count, killed, oom], "is_err": False}, out)
    ray_worker.print_worker_logs({"pid": 42, "lines": ["INFO serve -- Throughput optimized Ray Serve enabled with",
                                                       "  • Direct ingress enabled", "", "ValueError: bad"],
                                  "is_err": True}, out)
    ray_worker.print_worker_logs({"pid": 43, "actor_name": "ServeController", "is_err": True, "lines": [
        "INFO 2026-12-06 23:43:38,463 controller 7258 -- Removing 1 replica from Deployment(name='ModelServer')",
        "WARNING 2026-12-06 23:43:39,000 controller 7258 -- Deployment 'ModelServer' has 1 replica that has "
        "taken more than 30s to be scheduled"]}, out)
    text = out.getvalue()
    assert "Removing 1 replica" not in text and "taken more than 30s to be scheduled" in text
    assert "worker processes have been started" not in text and "graceful_shutdown" not in text
    assert "Throughput optimized" not in text and "Direct ingress" not in text
    assert oom in text and "ValueError: bad" in text  # what means something to the user still shows

    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    record = token.makeRecord(token.name, logging.WARNING, __file__, 1,
                              "Token authentication is enabled for this Ray cluster. Set ...", (), None)
    assert not token.filter(record)
    record.msg = "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
    assert token.filter(record)  # a security warning that means something stays
