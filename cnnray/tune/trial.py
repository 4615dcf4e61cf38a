"""One Tune trial = one Ray Train run, and a clean stop when Tune ends the trial early.

Tune runs `train_trial` in a trial actor; it builds the same TorchTrainer as `cnnray
train`, named by the trial id, whose controller forwards rank 0's metrics to Tune after
every epoch (`TuneReportCallback`).

Why the extra machinery: when ASHA stops a trial, Tune ends the trial actor, and with it
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
from typing import Any

from cnnray.config import TrainConfig

logger = logging.getLogger(__name__)
# trial id -> queue holding the Train controller's handle, for runs still in progress.
# Lives in the trial actor's process: the trial function fills it, `cleanup` reads it.
_RUNNING: dict[str, Any] = {}
ABORT_TIMEOUT_S = 120  # the controller stops its workers and removes their placement group


def _controller_handle_callback(queue: Any) -> Any:
    """A Train callback, run in the controller, that sends the controller's handle once."""
    import ray
    from ray.train import UserCallback

    class SendControllerHandle(UserCallback):
        def __init__(self) -> None:
            self.sent = False

        def after_report(self, run_context, metrics, checkpoint):
            if not self.sent:  # before TuneReportCallback forwards these metrics
                queue.put(ray.get_runtime_context().current_actor)
                self.sent = True

    return SendControllerHandle()


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
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    from cnnray.train.driver import make_trainer
    from cnnray.tune.history import history_callback
    from cnnray.tune.pbt import read_segment

    trial_id = ray.tune.get_context().get_trial_id()
    # No test pass per trial: the sweep tests its winner once (results.finish_sweep).
    cfg = TrainConfig.from_dict({**base, **config, "out": f"{runs_dir}/{trial_id}", "test_at_end": False})
    handle_queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
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
                   TuneReportCallback()],
        init_checkpoint=segment["init_checkpoint"] if segment else None,
        gpus_per_worker=gpus_per_worker,
    )
    _RUNNING[trial_id] = handle_queue
    try:
        result = trainer.fit()  # raises if the run failed after its retries: Tune marks the trial ERROR
    finally:
        _RUNNING.pop(trial_id, None)
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
