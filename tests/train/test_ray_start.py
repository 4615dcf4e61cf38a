"""What every worker process of a cnnray Ray Train job runs first (cnnray.ray_start)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("given", [None, "10.0.0.1:6379"])
def test_workers_ask_the_ray_they_run_in(monkeypatch, given):
    """Ray's state API in a worker (Ray Train's placement-group cleaner) would otherwise
    ask the newest `ray start` head on the machine, or fail with several Rays running."""
    import ray

    from cnnray.ray_start import setup_worker

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:40123"))
    if given is None:
        # set, then deleted: monkeypatch restores the environment afterwards only for a
        # variable it changed (a delenv of an absent one is not undone, and the variable
        # setup_worker sets would leak into later tests: `cnnray serve` would join it)
        monkeypatch.setenv("RAY_ADDRESS", "unset")
        monkeypatch.delenv("RAY_ADDRESS")
    else:
        monkeypatch.setenv("RAY_ADDRESS", given)
    setup_worker()
    assert os.environ["RAY_ADDRESS"] == (given or "127.0.0.1:40123")
