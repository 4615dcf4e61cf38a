"""A Tune driver loop that is slow to ask for a trial's next result (a callback doing network
or file work, a loaded machine) must only slow the sweep, never hang a trial.

Ray 2.60's TuneReportCallback hands each epoch's metrics to the trial actor's main thread,
while the trial function's end-of-run report comes from the trial's own thread: when the
driver asked for the next result later than the run's last epoch plus its shutdown, the
final report filled Ray's one-slot result queue first and the last epoch's report blocked
for ever behind it (cnnray.tune.trial says how every report now goes through one thread)."""

from __future__ import annotations

import threading
import time

import pytest

from cnnray.config import TrainConfig

# Longer than the second (last) epoch of this tiny run plus its Train run's shutdown: the
# window in which the old reporting path always deadlocked (seen with 6 s, one trial).
SLOW_S = 6
SWEEP_TIMEOUT_S = 420  # a one-trial, two-epoch sweep took 124-147 s on the loaded 2-core CI machine


@pytest.mark.slow
def test_a_slow_driver_loop_does_not_hang_a_trial(local_ray, mnist_dir, tmp_path, monkeypatch):
    from ray.tune import Callback

    import cnnray.tracking.sweep
    from cnnray.tune.space import default_space
    from cnnray.tune.sweep import SweepConfig, run_sweep

    epochs, slowed = 2, []

    class SlowDriverLoop(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("epoch", epochs) < epochs:  # the last epoch's report is already on its way
                slowed.append(result["epoch"])
                time.sleep(SLOW_S)

    # The sweep's extra Tune callbacks (tracking's seam): here, one that holds the driver loop.
    monkeypatch.setattr(cnnray.tracking.sweep, "sweep_callbacks", lambda handle, sweep: [SlowDriverLoop()])
    train = TrainConfig(model="lenet5", dataset="mnist", data_dir=str(mnist_dir), subset=300, epochs=epochs,
                        schedule="constant", seed=0, workers=1)
    sweep = SweepConfig(train=train, space=default_space(), samples=1, scheduler="none", out=str(tmp_path / "sweep"))
    outcome: dict = {}
    lines: list[str] = []

    def run() -> None:
        try:
            outcome["best"] = run_sweep(sweep, echo=lines.append)
        except BaseException as e:  # noqa: BLE001 (reported by the assertion below)
            outcome["error"] = e

    sweeping = threading.Thread(target=run, daemon=True)
    sweeping.start()
    sweeping.join(SWEEP_TIMEOUT_S)
    assert not sweeping.is_alive(), (
        f"the sweep did not finish in {SWEEP_TIMEOUT_S} s with a driver loop slowed by {SLOW_S} s per result "
        f"(a trial blocked reporting its last epoch?); output so far: {lines}")
    assert "error" not in outcome, outcome.get("error")
    assert slowed == [1]
    assert outcome["best"]["epoch"] in (1, 2) and any("finished" in line for line in lines), lines


def test_a_trial_reports_every_epoch_from_its_own_thread_before_it_ends(monkeypatch, tmp_path):
    """The trial function itself hands each epoch to Tune, in order, the last one before it
    returns (its return is Tune's end-of-run report); the Train controller's callback only
    queues them. No Ray here: the controller is a thread calling the callbacks."""
    import queue

    import ray.tune
    import ray.util.queue

    from cnnray.tune import trial
    from cnnray.tune.history import read_history

    reported: list[tuple[dict, str]] = []

    class Trainer:
        def __init__(self, callbacks):
            self.callbacks = callbacks

        def fit(self):
            for epoch in (1, 2, 3):
                checkpoint = type("Checkpoint", (), {"path": f"/runs/t1/epoch-{epoch}"})()
                for callback in self.callbacks:
                    callback.after_report(None, [{"epoch": epoch}], checkpoint)
            return type("Result", (), {"return_value": None})()

    monkeypatch.setattr(ray.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.setattr(ray.tune, "report", lambda metrics: reported.append((metrics, threading.current_thread().name)))
    monkeypatch.setattr(ray.util.queue, "Queue", lambda maxsize, **kw: queue.Queue(maxsize))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("R", (), {"current_actor": "controller"})())
    monkeypatch.setattr("cnnray.train.driver.make_trainer", lambda cfg, callbacks, **kw: Trainer(callbacks))
    trial.train_trial({"lr": 0.1}, base=TrainConfig().to_dict(), runs_dir=str(tmp_path / "runs"),
                      sweep_dir=str(tmp_path))
    assert [m["epoch"] for m, _ in reported] == [1, 2, 3]
    assert reported[-1][0]["checkpoint_path"] == "/runs/t1/epoch-3"
    assert {thread for _, thread in reported} == {threading.current_thread().name}
    assert "t1" not in trial._RUNNING
    # The history callback runs in the same controller, before the epoch reaches Tune.
    assert [row["epoch"] for row in read_history(tmp_path, "t1")] == [1, 2, 3]
