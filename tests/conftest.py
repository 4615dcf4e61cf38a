"""Shared fixtures: the real datasets beside the checkout, and one local Ray per session.

Helpers the tests share live in tests/helpers/ (no test module imports another). Every test
that starts Ray or a server, or reads ../shared/datasets, is marked `slow`: explicitly, or
here by the fixtures that do so (SLOW_FIXTURES), so that `pytest -m "not slow"` is the
quick loop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, SHARED_DATASETS  # noqa: F401  (REPO: also read from here)
# Also importable from here, as tests written before tests/helpers/ import them.
from tests.helpers.processes import free_port, log_tail, registered_checkpoints, spawn_cnnray, wait_http  # noqa: F401


# Fixtures that start Ray or read the real datasets: a test that uses one is slow.
SLOW_FIXTURES = frozenset({"local_ray", "mnist_dir", "cifar_tarball"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=True,
             _system_config=dict(LOCAL_SYSTEM_CONFIG))
    yield
    ray.shutdown()
