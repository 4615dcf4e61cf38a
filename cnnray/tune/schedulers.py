"""Trial schedulers (asha, hyperband, pbt, none), their rung arithmetic, and the budget.

    asha       asynchronous successive halving (Li et al. 2020): at each rung (epochs
               grace * rf**k below `epochs`) a trial below the top 1/rf so far is stopped
    hyperband  synchronous HyperBand (Li et al. 2018) over brackets of rf-spaced rungs
    pbt        population-based training (Jaderberg et al. 2017): every N epochs a trial
               in the bottom quarter takes a top-quarter trial's checkpoint and its
               lr/momentum/weight_decay, perturbed (cnnray.tune.pbt)
    none       every trial runs all its epochs

The budget (`--budget`, trial-epochs: one per epoch any trial reports) ends the whole
sweep once spent; the checks here refuse, before Ray starts, a sweep whose scheduler could
never act: no rung below the last epoch, fewer than two trials to compare, or a budget
too small for every trial to reach the first rung.

A `sweep` argument here is a cnnray.tune.sweep_config.SweepConfig, not imported: it
calls check_scheduler to check itself, and modules do not import each other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cnnray.config import ConfigError

SCHEDULERS = ("asha", "hyperband", "pbt", "none")


def asha_rungs(epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """Epochs at which ASHA may stop a trial: grace * rf**k below `epochs` (ray's
    AsyncHyperBand _Bracket: int(log(max_t / min_t) / log(rf)) + 1 rungs, the last at
    or past max_t, where stop_last_trials=False stops nothing)."""
    count = int(math.log(epochs / grace_period) / math.log(reduction_factor) + 1)
    rungs = [grace_period * reduction_factor**k for k in range(count)]
    return [int(r) if float(r).is_integer() else r for r in rungs if r < epochs]


def hyperband_brackets(epochs: int, reduction_factor: float) -> int:
    """s_max + 1, the number of HyperBand brackets (ray's HyperBandScheduler:
    s_max = floor(log(max_t) / log(eta)))."""
    return int(math.log(epochs) / math.log(reduction_factor)) + 1


def min_budget(sweep: Any) -> int:
    """The fewest trial-epochs with which the scheduler can act at all."""
    epochs, n = sweep.train.epochs, sweep.num_trials
    if sweep.scheduler == "asha":  # every trial reaches the first rung, one the last epoch
        return n * sweep.grace_period + epochs - sweep.grace_period
    if sweep.scheduler == "hyperband":  # every trial runs the smallest bracket's first rung
        smallest = max(1, int(epochs / reduction_power(sweep)))
        return n * smallest + epochs - smallest
    if sweep.scheduler == "pbt":  # every member passes a perturbation point and trains on
        return n * (sweep.perturbation_interval + 1)
    return epochs  # none: one trial runs to the end


def reduction_power(sweep: Any) -> float:
    return sweep.reduction_factor ** (hyperband_brackets(sweep.train.epochs, sweep.reduction_factor) - 1)


def check_scheduler(sweep: Any) -> None:
    """ConfigError (one line) for a scheduler that could never act in this sweep."""
    epochs, name = sweep.train.epochs, sweep.scheduler
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if name != "none" and sweep.num_trials < 2:
        raise ConfigError(f"scheduler {name} compares trials: {sweep.num_trials} trial leaves it nothing to compare; "
                          "raise --samples or use --scheduler none")
    if name == "asha" and not asha_rungs(epochs, sweep.grace_period, sweep.reduction_factor):
        raise ConfigError(f"scheduler asha has no rung before the last epoch (grace_period {sweep.grace_period}, "
                          f"epochs {epochs}): raise --epochs above --grace-period or use --scheduler none")
    if name == "hyperband" and hyperband_brackets(epochs, sweep.reduction_factor) < 2:
        raise ConfigError(f"scheduler hyperband needs epochs >= reduction_factor ({sweep.reduction_factor:g}) "
                          f"for a second bracket, not epochs={epochs}")
    if name == "pbt":
        from cnnray.tune.pbt import check_pbt_space

        if sweep.perturbation_interval >= epochs:
            raise ConfigError(f"scheduler pbt perturbs every {sweep.perturbation_interval} epoch(s): with epochs={epochs} "
                              "it never would; lower --perturbation-interval or raise --epochs")
        if sweep.search != "random":
            raise ConfigError(f"scheduler pbt draws its population at random and evolves it itself: "
                              f"use --search random, not {sweep.search}")
        check_pbt_space(sweep.space)
    if sweep.budget is not None and sweep.budget < min_budget(sweep):
        raise ConfigError(f"--budget {sweep.budget} trial-epochs is too small for scheduler {name} with "
                          f"{sweep.num_trials} trials: it needs at least {min_budget(sweep)}")


def make_scheduler(sweep: Any, out: Path) -> Any:
    """The Tune scheduler for TuneConfig(scheduler=...); None for `none`."""
    if sweep.scheduler == "none":
        return None
    if sweep.scheduler == "pbt":
        from cnnray.tune.pbt import make_pbt

        return make_pbt(sweep, out)
    if sweep.scheduler == "hyperband":
        from ray.tune.schedulers import HyperBandScheduler

        # Synchronous: a paused trial's Train run stops and later continues from its own
        # checkpoint (same run name), like a resumed sweep.
        return HyperBandScheduler(time_attr="epoch", max_t=sweep.train.epochs,
                                  reduction_factor=sweep.reduction_factor, stop_last_trials=False)
    return _resumable_asha(sweep, out)


def _resumable_asha(sweep: Any, out: Path) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    from cnnray.tune.history import read_history

    class ResumableASHA(ASHAScheduler):
        """Tune saves no scheduler state, so after --resume ASHA would judge new results
        against empty rungs; replaying each restored trial's saved epochs refills them."""

        def on_trial_add(self, tune_controller, trial):
            super().on_trial_add(tune_controller, trial)
            for result in read_history(out, trial.trial_id):  # [] for a new trial
                super().on_trial_result(tune_controller, trial, result)

    # The epoch (not Tune's iteration count) is the time axis, so a trial resumed from a
    # checkpoint is judged at the right rung. stop_last_trials=False lets a trial that
    # reaches the last epoch end on its own instead of being stopped at its final report.
    return ResumableASHA(
        time_attr="epoch",
        max_t=sweep.train.epochs,
        grace_period=sweep.grace_period,
        reduction_factor=sweep.reduction_factor,
        stop_last_trials=False,
    )


# sweep folder -> trial-epochs in its histories when this process started the Tuner: a
# resumed sweep's budget stopper is unpickled as it was when the sweep began, so it is
# told here (by cnnray.tune.sweep, before Tuner.fit) what the earlier sessions spent.
_SPENT_BEFORE: dict[str, int] = {}


def record_spent_before(sweep_dir: Path) -> int:
    """Count (and keep for the budget stopper) the trial-epochs `sweep_dir` already holds;
    call it before Tuner.fit, while no trial is running."""
    _SPENT_BEFORE[str(sweep_dir)] = spent = spent_trial_epochs(sweep_dir)
    return spent


def budget_stopper(budget: int, sweep_dir: Path) -> Any:
    """A Tune Stopper that ends the sweep once `budget` trial-epochs were reported, counting
    those of earlier sessions (record_spent_before: a resumed sweep spends what is left)."""
    from ray.tune.stopper import Stopper

    class BudgetStopper(Stopper):
        def __init__(self) -> None:
            # Read at the first result, not here: Tuner.restore unpickles this object as it
            # was when the sweep began.
            self.spent: int | None = None

        def __call__(self, trial_id: str, result: dict) -> bool:
            if self.spent is None:
                self.spent = _SPENT_BEFORE.get(str(sweep_dir), 0)
            # A finished trial's last result comes once more, marked done: not an epoch.
            if "epoch" in result and not result.get("done"):
                self.spent += 1
            return False

        def stop_all(self) -> bool:
            return self.spent is not None and self.spent >= budget

    return BudgetStopper()


def spent_trial_epochs(sweep_dir: Path) -> int:
    """Trial-epochs trained so far: one per epoch in each trial's history."""
    from cnnray.files import HISTORY_DIR
    from cnnray.tune.history import read_history

    folder = Path(sweep_dir) / HISTORY_DIR
    return sum(len(read_history(sweep_dir, f.stem)) for f in folder.glob("*.jsonl")) if folder.is_dir() else 0


def trials_done(tune_dir: Path) -> int:
    """Trials Tune's saved state marks finished or failed (0 before its first save)."""
    from ray.tune import ExperimentAnalysis

    try:
        return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(tune_dir)).trials)
    except (ValueError, OSError):
        return 0
