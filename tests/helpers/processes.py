"""Processes the tests start as a user would: `python -m cnnray.cli ARGS`, servers on free
ports, their logs; and what a Ray Train run has registered."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.helpers import REPO


def registered_checkpoints(run_dir: Path) -> set[str]:
    """Checkpoint folders that Ray Train's controller has registered (not merely uploaded):
    only these are handed back by `get_checkpoint()` after a failure or a restart."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return set()
    return {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}


def spawn_cnnray(args: list[str], data_home: Path | None = None, output=None):
    """Start `python -m cnnray.cli ARGS` as a user would, with no RAY_ADDRESS (it starts its
    own local Ray) and, given `data_home`, a private data cache. Output (stderr merged) goes
    to `output`, an open file, or else to proc.stdout."""
    import subprocess
    import sys

    env = {**os.environ, **({"CNNRAY_DATA": str(data_home)} if data_home is not None else {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "cnnray.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE if output is None else output, stderr=subprocess.STDOUT,
                            text=True)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server a test starts (never a fixed one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log, chars: int = 3000) -> str:
    """The end of a server's output: a path, or an open file (flushed and read back)."""
    if isinstance(log, (str, Path)):
        return Path(log).read_text()[-chars:]
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def wait_http(url: str, proc, log, what: str = "the server", timeout_s: float = 300.0, every_s: float = 0.5) -> None:
    """Poll GET `url` until it answers 200 while `proc` runs; fail with the end of `log`
    if the process exits or `timeout_s` seconds pass."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited:\n{log_tail(log)}"
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{what} did not answer {url}:\n{log_tail(log)}"
        time.sleep(every_s)
