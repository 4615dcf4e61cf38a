"""One Tune trial = one Ray Train run, and a clean stop when Tune ends the trial early.

Tune runs `train_trial` in a trial actor; it builds the same TorchTrainer as `cnnray
train`, named by the trial id, whose controller forwards rank 0's metrics to the trial
after every epoch (`_forward_reports_callback`), and the trial reports them to Tune.

Why the trial reports them itself, not Ray's `TuneReportCallback`: that callback hands the
metrics to the trial actor's main thread, which reports them from inside Tune's `train()`
call, while the trial function's own end-of-run report comes from the trial's thread. In
Ray 2.60 nothing orders the two: when Tune's driver asks for the next result later than the
run's last epoch plus its shutdown (a slow driver loop: a tracker's HTTP call, a loaded
machine), the function's final report fills the one-slot result queue first and the main
thread blocks for ever putting the last epoch behind it (session.py
`_report_training_result`, `result_queue.put`): the sweep hangs. Here every report goes
through the trial function's thread, in order, the last epoch before the end.

Why the extra machinery for stopping: when ASHA stops a trial, Tune ends the trial actor, and with it
the Train controller that actor owns. Ray does not free a placement group when the actor
that created it dies, and Train V2's detached cleaner finds the cluster through the state
API, which fails on a machine running several Ray instances ("Found multiple active Ray
instances"). The workers' CPUs would stay reserved and the next trials would never start.
So the controller hands its own actor handle to the trial on its first report, and the
trial's `cleanup` (which Tune runs before ending the actor) aborts the run the way Ctrl-C
does: workers stopped, placement group removed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from cnnray.config import TrainConfig

logger = logging.getLogger(__name__)
# trial id -> queue holding the Train controller's handle, for runs still in progress.
# Lives in the trial actor's process: the trial function fills it, `cleanup` reads it.
_RUNNING: dict[str, Any] = {}
ABORT_TIMEOUT_S = 120  # the controller stops its workers and removes their placement group
FIT_ENDED = "fit ended"  # the last item of a trial's report queue (the others are metric dicts)


def _controller_handle_callback(queue: Any) -> Any:
    """A Train callback, run in the controller, that sends the controller's handle once."""
    import ray
    from ray.train import UserCallback

    class SendControllerHandle(UserCallback):
        def __init__(self) -> None:
            self.sent = False

        def after_report(self, run_context, metrics, checkpoint):
            if not self.sent:  # before the metrics go to the trial (_forward_reports_callback)
                queue.put(ray.get_runtime_context().current_actor)
                self.sent = True

    return SendControllerHandle()


def _forward_reports_callback(queue: Any) -> Any:
    """A Train callback, run in the controller, that sends rank 0's metrics of each report
    (with the checkpoint's path, as Ray's TuneReportCallback does) to the trial's `queue`.
    The queue holds one item: a report waits until the trial took the previous one."""
    from ray.train import UserCallback
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            item = dict(metrics[0])
            if checkpoint:
                item[CHECKPOINT_PATH_KEY] = checkpoint.path
            queue.put(item)

    return ForwardReports()


class TrialDiverged(RuntimeError):
    """The trial's training diverged (NaN or infinite loss or weights): Tune marks the
    trial ERROR with this one-line message, and the sweep goes on with the others."""



def train_trial(config: dict[str, Any], *, base: dict[str, Any], runs_dir: str, sweep_dir: str,
                pbt_dir: str | None = None, gpus_per_worker: float = 1.0) -> None:
    """One Tune trial: a Ray Train run of `base` with the sampled `config` values, whose
    every epoch is appended to the trial's history in `sweep_dir` (cnnray.tune.history).

    Under PBT (`pbt_dir`), a trial that exploited another continues in the Train run its
    segment file names, starting from the donor's checkpoint (cnnray.tune.pbt)."""
    import ray.tune
    from ray.util.queue import Queue

    from cnnray.train.driver import make_trainer
    from cnnray.tune.history import history_callback
    from cnnray.tune.pbt import read_segment

    trial_id = ray.tune.get_context().get_trial_id()
    # No test pass per trial: the sweep tests its winner once (results.finish_sweep).
    cfg = TrainConfig.from_dict({**base, **config, "out": f"{runs_dir}/{trial_id}", "test_at_end": False})
    handle_queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})  # epoch metrics, then FIT_ENDED
    # Same name and storage on a rerun (Tuner.restore): Ray Train continues the run from
    # its last checkpoint instead of epoch 0.
    segment = read_segment(pbt_dir, trial_id)  # None unless PBT made this trial exploit another
    run = segment["run"] if segment else trial_id
    trainer = make_trainer(
        cfg,
        name=run,
        storage_path=runs_dir,
        # The history first, right after Train registers the epoch's checkpoint: on disk
        # before Tune (and a Ctrl-C) sees the epoch.
        callbacks=[history_callback(sweep_dir, trial_id, run), _controller_handle_callback(handle_queue),
                   _forward_reports_callback(reports)],
        init_checkpoint=segment["init_checkpoint"] if segment else None,
        gpus_per_worker=gpus_per_worker,
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 (raised again in the trial's thread below)
            outcome["error"] = e
        finally:
            # After every report: the controller put each one before its run could end.
            reports.put(FIT_ENDED)

    _RUNNING[trial_id] = handle_queue
    fitting = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    try:
        fitting.start()
        # Each epoch's metrics reach Tune from this thread, in order: ray.tune.report
        # returns when Tune asks for the next result (or ends the trial here when Tune stops it).
        while (metrics := reports.get()) != FIT_ENDED:
            ray.tune.report(metrics)
        fitting.join()
    finally:
        _RUNNING.pop(trial_id, None)
    if "error" in outcome:  # the run failed after its retries: Tune marks the trial ERROR
        raise outcome["error"]
    result = outcome["result"]
    if isinstance(result.return_value, str):  # the workers' divergence line (see the loop)
        raise TrialDiverged(result.return_value)


def abort_train_run(trial_id: str) -> None:
    """Abort the trial's Train run if it is still going (no-op once it has finished)."""
    import ray
    from ray.util.queue import Empty

    handle_queue = _RUNNING.pop(trial_id, None)
    if handle_queue is None:
        return
    try:
        controller = handle_queue.get(block=False)
    except Empty:
        return  # stopped before its first report: no handle (only on an interrupted sweep)
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except ray.exceptions.RayActorError:
        pass  # abort ends the controller actor: this is the expected outcome
    except Exception as e:  # a stuck controller must not keep the trial from stopping
        logger.warning("could not abort the Train run of trial %s: %s", trial_id, e)


class AbortTrainRunOnStop:
    """Tune trainable mixin: abort the trial's Train run before Tune ends the trial actor."""

    def cleanup(self) -> None:
        abort_train_run(self.trial_id)
        super().cleanup()  # type: ignore[misc]


# Tune builds the trial's Trainable class from the function and these mixins.
train_trial.__mixins__ = (AbortTrainRunOnStop,)  # type: ignore[attr-defined]
