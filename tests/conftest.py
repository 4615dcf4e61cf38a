"""Shared fixtures: the real datasets beside the checkout, and one local Ray per session."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def pytest_configure(config) -> None:
    """Ctrl-C works in the processes the tests start, however the test run was started.

    A shell starts a background job (`bash .ci/run &`, nohup) with SIGINT ignored, and an
    ignored signal stays ignored across exec: every `cnnray` a test started then ignored
    the SIGINT the tests send to stop it (serve never stopped, an interrupted training ran
    to its end). A handled signal is reset to the default at exec, so handling it here
    gives each child Python its usual KeyboardInterrupt."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = SHARED_DATASETS / "mnist"
    if not (d / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found in {d}")
    return d


@pytest.fixture(scope="session")
def cifar_tarball() -> Path:
    p = SHARED_DATASETS / "cifar10-jpg.tar.gz"
    if not p.exists():
        pytest.skip(f"real CIFAR-10 tarball not found at {p}")
    return p


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One decoded-data cache for the whole session, never the user's ~/.cache."""
    d = tmp_path_factory.mktemp("cnnray-data")
    os.environ["CNNRAY_DATA"] = str(d)
    return d


@pytest.fixture(scope="session")
def local_ray(data_cache):
    """A private single-node Ray for in-process tests, stopped at the end (only this one)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # The dashboard (loopback only) serves the state API that the worker-kill test uses.
    from cnnray.ray_start import LOCAL_SYSTEM_CONFIG

    # Workers at normal priority, as in the Ray cnnray starts (cnnray.ray_start).
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=True, _system_config=dict(LOCAL_SYSTEM_CONFIG))
    yield
    ray.shutdown()


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
