"""The sweep's MLflow calls run on one background thread: in order, never on Tune's driver
loop, bounded at the end, and a tracker that fails or hangs is one warning line. No server:
a port that accepts connections and never answers stands in for a tracker that hangs."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

import cnnray.tracking.client as client
from cnnray.tracking.background import BackgroundLogger


@pytest.fixture()
def warnings(monkeypatch):
    """The warning lines (one per process in real use: reset here for each test)."""
    monkeypatch.setattr(client, "_warned", threading.Event())
    lines: list[str] = []
    monkeypatch.setattr(client.SafeLogger, "__init__", _with_echo(client.SafeLogger.__init__, lines.append))
    return lines


def _with_echo(init, echo):
    def patched(self, uri, _echo=None, goes_on="training"):
        init(self, uri, echo, goes_on)
    return patched


def test_calls_run_in_order_off_the_callers_thread(warnings):
    done, callers = [], []

    def slow(i):
        time.sleep(0.2)
        done.append(i)
        callers.append(threading.current_thread().name)

    worker = BackgroundLogger("http://tracker", goes_on="the sweep")
    started = time.monotonic()
    for i in range(5):
        worker.submit(f"call {i}", slow, i)
    assert time.monotonic() - started < 0.1  # submit only queues
    assert worker.close(timeout_s=10) is True
    assert done == [0, 1, 2, 3, 4] and set(callers) == {"cnnray-mlflow"} and warnings == []


def test_the_first_failure_is_one_line_and_stops_tracking(warnings):
    done = []

    def fail():
        raise ConnectionError("Connection refused\nsecond line")

    worker = BackgroundLogger("http://tracker", goes_on="the sweep")
    worker.submit("ok", done.append, 1)
    worker.submit("trial metrics", fail)
    worker.submit("later", done.append, 2)
    assert worker.close(timeout_s=10) is False
    assert done == [1]  # nothing after the failure
    assert warnings == ["[cnnray] warning: MLflow tracking at http://tracker failed (trial metrics: Connection refused); "
                        "the sweep goes on without it"]
    worker.submit("after close", done.append, 3)
    assert done == [1]


def test_close_waits_a_bounded_time_for_a_hanging_tracker(warnings):
    release = threading.Event()
    worker = BackgroundLogger("http://tracker", goes_on="the sweep")
    worker.submit("trial start", release.wait, 30)
    worker.submit("trial metrics", lambda: None)
    started = time.monotonic()
    assert worker.close(timeout_s=0.5) is False
    assert time.monotonic() - started < 2
    assert len(warnings) == 1 and "(flush: 1 calls still queued after 0.5 s, left unsent)" in warnings[0], warnings
    release.set()


def test_a_full_queue_gives_up_instead_of_holding_the_caller(warnings):
    release = threading.Event()
    worker = BackgroundLogger("http://tracker", goes_on="the sweep", queue_size=2)
    for _ in range(4):  # one running, two queued, the fourth does not fit
        worker.submit("trial metrics", release.wait, 30)
    assert worker.broken and len(warnings) == 1 and "2 calls waiting" in warnings[0], warnings
    release.set()
    worker.close(timeout_s=5)


class FakeTrial:
    """What the callback reads of a Tune trial."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id, self.config, self.last_result = trial_id, {"lr": 0.1}, {}

    def __str__(self) -> str:
        return self.trial_id


def trial(trial_id: str) -> FakeTrial:
    return FakeTrial(trial_id)


def test_child_runs_are_written_in_order_and_a_restart_keeps_the_params(warnings):
    """Per child: created under the parent, params, trial_id, metrics by epoch, stop reason,
    ended; a trial started again with a new config (PBT's exploit) logs no changed param,
    which MLflow would refuse (and tracking would stop)."""
    pytest.importorskip("mlflow")
    from cnnray.tracking.sweep import PARENT_TAG, sweep_callbacks

    calls = []

    class Client:
        def set_tag(self, run, key, value):
            calls.append(("tag", run, key, value))

        def log_batch(self, run, metrics):
            calls.append(("metrics", run, sorted({m.step for m in metrics})))

        def get_run(self, run):
            return SimpleNamespace(info=SimpleNamespace(experiment_id="1"))

        def search_runs(self, *args, **kwargs):
            return []

    class Util:  # Ray's _MLflowLoggerUtil, as MLflowLoggerCallback calls it
        def setup_mlflow(self, **kwargs):
            pass

        def _get_client(self):
            return Client()

        def start_run(self, tags, run_name):
            calls.append(("start", run_name, tags[PARENT_TAG]))
            return SimpleNamespace(info=SimpleNamespace(run_id=f"run-{run_name}"))

        def log_params(self, run_id, params_to_log):
            calls.append(("params", run_id, dict(params_to_log)))

        def end_run(self, run_id, status):
            calls.append(("end", run_id, status))

    [callback] = sweep_callbacks({"uri": "http://tracker", "run_id": "parent", "experiment": "e"},
                                 SimpleNamespace(train=SimpleNamespace(epochs=2)))
    callback.mlflow_util = Util()
    callback.setup()
    t = trial("t1")
    callback.log_trial_start(t)
    callback.log_trial_result(1, t, {"epoch": 1, "val_accuracy": 0.5})
    t.config = {"lr": 0.2}  # PBT copied another trial's config and restarts this one
    callback.log_trial_start(t)
    callback.log_trial_result(2, t, {"epoch": 2, "val_accuracy": 0.6})
    callback.log_trial_end(t, failed=False)
    assert callback._worker.close(timeout_s=10) is True
    assert calls == [("start", "t1", "parent"), ("params", "run-t1", {"lr": 0.1}), ("tag", "run-t1", "trial_id", "t1"),
                     ("metrics", "run-t1", [1]), ("metrics", "run-t1", [2]),
                     ("tag", "run-t1", "stop_reason", "finished"), ("end", "run-t1", "FINISHED")], calls
    assert warnings == []


def test_the_sweep_callback_never_waits_for_a_hanging_tracker(warnings, monkeypatch):
    """Every hook returns at once although each MLflow request would wait for its timeout."""
    pytest.importorskip("mlflow")
    import cnnray.tracking.background as background
    from cnnray.tracking.sweep import sweep_callbacks

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as hanging:  # listens, never answers
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(16)
        uri = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        sweep = SimpleNamespace(train=SimpleNamespace(epochs=2))
        [callback] = sweep_callbacks({"uri": uri, "run_id": "parent", "experiment": "e"}, sweep)
        started = time.monotonic()
        callback.setup()
        t = trial("t1")
        callback.log_trial_start(t)
        for epoch in (1, 2):
            callback.log_trial_result(epoch, t, {"epoch": epoch, "val_accuracy": 0.5, "train_loss": 1.0})
        callback.log_trial_end(t, failed=False)
        assert time.monotonic() - started < 1.0, "a Tune hook waited for the tracker"
        monkeypatch.setattr(background, "FLUSH_TIMEOUT_S", 1.0)
        callback._worker.close(timeout_s=1.0)  # what on_experiment_end does, with a shorter wait
        assert time.monotonic() - started < 3.0
        assert len(warnings) == 1 and warnings[0].startswith(f"[cnnray] warning: MLflow tracking at {uri} failed ("), warnings
        assert warnings[0].endswith("the sweep goes on without it")
        # The worker thread is still in Ray's setup (a 3 s request); it exports
        # MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI (mlflow.set_registry_uri) whenever it gets
        # there, so it must end inside this test, before the environment is restored: a
        # later test's `cnnray serve` once inherited this dead registry.
        callback._worker._thread.join(timeout=30)
        assert not callback._worker._thread.is_alive()
