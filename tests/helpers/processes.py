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


def spawn_cnnray(args: list[str], data_home: Path | None = None, output=None, new_session: bool = False):
    """Start `python -m cnnray.cli ARGS` as a user would, with no RAY_ADDRESS (it starts its
    own local Ray) and, given `data_home`, a private data cache. Output (stderr merged) goes
    to `output`, an open file, or else to proc.stdout. `new_session`: in a process group of
    its own, which `kill_group_with_stacks` can end with the Ray it started."""
    import subprocess
    import sys

    env = {**os.environ, **({"CNNRAY_DATA": str(data_home)} if data_home is not None else {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "cnnray.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE if output is None else output, stderr=subprocess.STDOUT,
                            text=True, start_new_session=new_session)


# Ray's own daemons, whose stacks say nothing about a hang in cnnray's code.
_RAY_DAEMONS = ("Dashboard", "RuntimeEnvAgent", "dashboard", "autoscaler", "log_monitor", "multiprocessing")


def kill_group_with_stacks(proc, per_process_s: float = 15, most: int = 8) -> str:
    """For a command that ran past its time: the Python stacks (py-spy dump) of up to `most`
    of its processes (its Ray actors first: where a hang sits, then the command itself),
    then SIGKILL to its process group and to every process it started (Ray starts its
    workers in sessions of their own). Returns the stacks."""
    import signal
    import subprocess
    import sys

    parent, command = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        parent[int(stat.parent.name)], command[int(stat.parent.name)] = int(fields[1]), cmd
    tree, grew = {proc.pid}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    python = [pid for pid in tree if ("python" in command.get(pid, "") or command.get(pid, "").startswith("ray::"))
              and not any(d in command.get(pid, "") for d in _RAY_DAEMONS)]
    python.sort(key=lambda pid: (not command[pid].startswith("ray::"), pid != proc.pid, pid))
    spy = Path(sys.executable).parent / "py-spy"
    stacks = []
    for pid in python[:most] if spy.exists() else []:
        try:
            dump = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True,
                                  timeout=per_process_s).stdout
        except subprocess.TimeoutExpired:
            dump = "(py-spy timed out)"
        stacks.append(f"--- {pid} {command[pid][:100]}\n{dump[-2500:]}")
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), *(lambda p=p: os.kill(p, signal.SIGKILL) for p in tree)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    return "\n".join(stacks) or "(no stacks: py-spy missing or no Python process left)"


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
