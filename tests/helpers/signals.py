"""A `cnnray` process a test interrupts as a user or a scheduler would, and what it left.

    run = Interruptible(["train", ...], tmp_path)
    run.wait_for(r"epoch 1/3")          # its output so far, once a line matches
    run.send(signal.SIGTERM)            # `kill -TERM <pid>`; run.ctrl_c() is a terminal's Ctrl-C
    rc, output = run.finish()
    assert run.left_running() == []     # every process it started, found by a private marker

Each run has its own RAY_TMPDIR (short: Ray's socket paths have a length limit) and a
marker in its environment, which every process it starts inherits (Ray's GCS, raylet,
workers, Serve's actors): `left_running()` finds them by that marker, whatever their
process group, and never touches any other process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tests.helpers import REPO


class Interruptible:
    def __init__(self, args: list[str], data_home: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.marker = f"CNNRAY_TEST_RUN={uuid.uuid4().hex}"
        self.ray_tmp = tempfile.mkdtemp(prefix="/tmp/ri")
        full_env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "RAY_raylet_start_wait_time_s": "120",
                    "PYTHONPATH": str(REPO), **(env or {})}
        full_env.pop("RAY_ADDRESS", None)
        if data_home is not None:
            full_env["CNNRAY_DATA"] = str(data_home)
        key, value = self.marker.split("=")
        full_env[key] = value
        # Its own session (a terminal's foreground group: ctrl_c() signals all of it), with
        # SIGINT at its default: a background job of a non-interactive shell ignores it.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cnnray.cli", *args], cwd=REPO, env=full_env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    @property
    def output(self) -> str:
        with self._new:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 300.0) -> str:
        """The output so far, once a line matches `pattern`; AssertionError with the output
        if the process ends first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        found = re.compile(pattern)
        with self._new:
            while not any(found.search(line) for line in self.lines):
                assert self.proc.poll() is None or self._reader.is_alive(), \
                    f"ended (rc {self.proc.returncode}) before {pattern!r}:\n{''.join(self.lines)[-4000:]}"
                assert time.monotonic() < deadline, f"no {pattern!r} in {timeout_s:g} s:\n{''.join(self.lines)[-4000:]}"
                self._new.wait(0.5)
            return "".join(self.lines)

    def wait_until(self, check, timeout_s: float = 300.0, every_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert self.proc.poll() is None, f"ended (rc {self.proc.returncode}):\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output[-4000:]}"
            time.sleep(every_s)

    def send(self, signum: int) -> None:
        """The signal to the cnnray process alone (`kill -TERM <pid>`, a scheduler)."""
        os.kill(self.proc.pid, signum)

    def ctrl_c(self) -> None:
        """SIGINT to the whole process group, as a terminal's Ctrl-C does."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout_s: float = 120.0) -> tuple[int, str]:
        """(exit status, all output) once the process ended; kills it (and fails) after `timeout_s`."""
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"still running {timeout_s:g} s after the signal:\n{self.output[-4000:]}") from None
        self._reader.join(10)
        return rc, self.output

    def left_running(self, grace_s: float = 10.0) -> list[str]:
        """Processes this run started that still run `grace_s` seconds after it ended
        (zombies, already dead, are not counted)."""
        deadline = time.monotonic() + grace_s
        while True:
            left = processes_with(self.marker)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def kill_all(self) -> None:
        """SIGKILL every process of this run (a failed test's clean-up: only ours)."""
        for entry in processes_with(self.marker):
            try:
                os.kill(int(entry.split(" ", 1)[0]), signal.SIGKILL)
            except OSError:
                pass


def processes_with(marker: str) -> list[str]:
    """'PID command' of every live process (not a zombie) whose environment holds `marker`."""
    found = []
    needle = marker.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            found.append(f"{pid} {command[:120]}")
    return found
