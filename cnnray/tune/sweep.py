"""A hyperparameter sweep in which every trial is a Ray Train run (Train V2, DDP).

    from cnnray.config import TrainConfig
    from cnnray.tune.space import default_space
    from cnnray.tune.sweep import SweepConfig, run_sweep   # SweepConfig: tune/sweep_config.py
    best = run_sweep(SweepConfig(train=TrainConfig(model="cnn", dataset="mnist"),
                                 space=default_space(), samples=8, out="sweeps/x"))

Ray Tune runs `cnnray.tune.trial.train_trial` once per sampled config: a Ray Train run
like `cnnray train`, named by the trial id, that reports to Tune after every epoch, so
ASHA can stop a trial early. Layout of `<out>`:

    sweep.json            the sweep's settings (what --resume reruns)
    tune/                 Tune's experiment: state, one folder per trial
    runs/<trial_id>/      Ray Train's run folder of each trial: epoch-NNNN checkpoints
    history/<trial_id>.jsonl  every epoch the trial's Train runs reported (cnnray.tune.history)
    trials.csv|parquet, histories.json, best.json, sweep.png, models/<name>/<version>/
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from cnnray.config import ConfigError, TrainConfig
from cnnray.files import PBT_DIR, RUNS_DIR, TUNE_DIR, atomic_write_json
from cnnray.tune.results import finish_sweep, format_value
from cnnray.tune.sweep_config import SWEEP_FILE, SweepConfig
from cnnray.tune.trial import train_trial

# A Tune trial here only waits on its Train controller, so it must hold no CPU or GPU the
# workers need. Tune refuses an empty resource request; a small logical memory
# reservation (bytes) is a non-empty request that takes nothing the workers use.
TRIAL_DRIVER_MEMORY = 128 * 2**20
# Seconds between saves of Tune's experiment state (Tune's default is at least 10 s): a
# driver killed just after a trial finished must still find that trial finished on resume.
EXPERIMENT_SAVE_PERIOD_S = "2"


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial is named by its id alone, like its Ray Train run."""
    return trial.trial_id


def concurrency(cfg: TrainConfig, requested: int | None, gpus_per_worker: float = 1.0) -> int:
    """Trials that can run at once: the cluster's CPUs (GPUs) over what one trial's workers
    take (cnnray.tune.resources: Ray's fixed-point arithmetic, fractions of a GPU)."""
    import ray

    from cnnray.tune.resources import trials_that_fit

    total = ray.cluster_resources()
    cpus_per_trial = cfg.workers * cfg.cpus_per_worker
    gpus = cfg.workers * gpus_per_worker if cfg.gpu else 0.0
    fit = trials_that_fit(total, cpus_per_trial, gpus, cfg.workers)
    if fit < 1:
        need = f"{cpus_per_trial} CPUs" + (f" and {gpus:g} GPUs" if cfg.gpu else "")
        have = f"{total.get('CPU', 0):g} CPUs" + (f" and {total.get('GPU', 0):g} GPUs" if cfg.gpu else "")
        raise ConfigError(f"one trial needs {need} but the Ray cluster has {have}: lower --workers-per-trial")
    return fit if requested is None else min(requested, fit)


def _trial_progress(sweep: SweepConfig, echo: Callable[[str], None]) -> Any:
    """One line per trial that finishes, is stopped early, or fails."""
    from ray.tune import Callback

    epochs, swept, total = sweep.train.epochs, list(sweep.space), sweep.num_trials

    class TrialProgress(Callback):
        def _line(self, trials, trial, what: str) -> None:
            done = sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials)
            params = "  ".join(f"{k} {format_value(trial.config.get(k))}" for k in swept)
            best = (trial.last_result or {}).get("best_val_accuracy", math.nan)
            echo(f"[cnnray] trial {trial.trial_id} {what}: {params}  best val_acc {best:.4f}  ({done}/{total} done)")

        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = int((trial.last_result or {}).get("epoch", 0))
            what = "finished" if epoch >= epochs else f"stopped early after epoch {epoch}/{epochs}"
            self._line(trials, trial, what)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "FAILED")

    return TrialProgress()


def _resolved(sweep: SweepConfig, out: Path) -> SweepConfig:
    """Absolute paths (trials run in their own working directories) and the per-trial
    settings a sweep imposes: what sweep.json stores and --resume compares against."""
    store = Path(sweep.model_store) if sweep.model_store else out / "models"
    # Trials run on Ray Train workers (Tune reports through Ray Train's callbacks, which local
    # mode does not run) and share the cluster: one CPU per worker unless set.
    train = sweep.train.replace(out=str(out), verbose=False, resume=False, local_mode=False,
                                cpus_per_worker=sweep.train.cpus_per_worker or 1)
    return SweepConfig(**{**sweep.__dict__, "train": train,
                          "out": str(out), "model_store": str(store)})


def _prepare(sweep: SweepConfig, echo: Callable[[str], None]) -> tuple[SweepConfig, Path, bool]:
    """The new-or-resume decision: (resolved sweep, out, restore?)."""
    from ray.tune import Tuner

    out = Path(sweep.out)  # absolute (SweepConfig)
    exists = Tuner.can_restore(str(out / TUNE_DIR))
    if exists and not sweep.resume:
        raise ConfigError(f"{out} already holds a sweep: pass --resume to continue it, or choose another --out")
    wanted = _resolved(sweep, out)
    if exists:
        stored = SweepConfig.from_dict(json.loads((out / SWEEP_FILE).read_text()), resume=True)
        changed = sorted(k for k, v in wanted.to_dict().items() if stored.to_dict()[k] != v)
        if changed:
            echo(f"[cnnray] resuming with the settings saved in {out / SWEEP_FILE}; ignoring changed {', '.join(changed)}")
        return stored, out, True
    if sweep.resume:
        echo(f"[cnnray] no earlier sweep under {out}: starting a new one")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(wanted.to_dict(), out / SWEEP_FILE)
    return wanted, out, False


def run_sweep(sweep: SweepConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep, then write the table, histories, plot, best.json and the
    exported best model into `<out>`; returns best.json's content."""
    from cnnray.train.run_dir import lock_folder

    # Held until the sweep ends: a second sweep on the same --out is refused at once.
    from cnnray.leftovers import removed_on_failure
    from cnnray.train.driver import CLAIM_FILE

    from cnnray.tune.interrupts import Interrupts

    interrupts = Interrupts()  # Ctrl-C and SIGTERM: exit 130/143 with Tune's state saved
    interrupts.install()
    try:
        # A sweep that fails before any trial wrote anything leaves no folder behind.
        with removed_on_failure(Path(sweep.out), own=(CLAIM_FILE, SWEEP_FILE)):
            claim = lock_folder(Path(sweep.out), "cnnray tune")  # absolute: SweepConfig resolved it
            try:
                return _run_sweep(sweep, echo, interrupts)
            finally:
                os.close(claim)
    finally:
        interrupts.restore()


def _run_sweep(sweep: SweepConfig, echo: Callable[[str], None], interrupts: Any) -> dict[str, Any]:
    from cnnray.ray_start import init_ray
    from cnnray.train.driver import preflight

    started = time.perf_counter()
    sweep, out, restore = _prepare(sweep, echo)
    cfg = sweep.train
    from cnnray.tune.space import space_configs

    # Decode the data once here; fail fast on unreadable data and on any point of the space
    # whose sizes cannot train (cnnray.train.sizes), before Ray starts.
    variants = [(", ".join(f"{k}={v!r}" for k, v in combo.items()), c) for combo, c in space_configs(sweep.space, cfg)]
    preflight(cfg, variants=variants, echo=echo)
    from cnnray.tracking.sweep import start_sweep_run

    tracking = start_sweep_run(sweep, out, echo)  # an unreachable tracker: exit 2 before Ray starts
    own = init_ray(cfg.address, ray_train=True)
    try:
        return _fit_and_finish(sweep, out, restore, tracking, started, echo, interrupts)
    finally:
        if own:  # stopped here, not by Ray's exit hook: no Ray line can follow cnnray's last one
            import ray

            ray.shutdown()


def _fit_and_finish(sweep: SweepConfig, out: Path, restore: bool, tracking: Any, started: float,
                    echo: Callable[[str], None], interrupts: Any) -> dict[str, Any]:
    """Tune's fit on the running Ray, then the sweep's results (cnnray.tune.results)."""
    from ray import tune

    from cnnray.tracking.sweep import finish_sweep_run, sweep_callbacks

    cfg = sweep.train
    interrupts.install()  # ray.init replaced SIGTERM's handler with Ray's (a stack dump and an abort)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_SAVE_PERIOD_S)
    limit = concurrency(cfg, sweep.max_concurrent, sweep.worker_gpus or 1.0)
    if sweep.max_concurrent and limit < sweep.max_concurrent:
        echo(f"[cnnray] running {limit} trials at once, not {sweep.max_concurrent}: that is what the cluster fits")

    runs_dir = str(out / RUNS_DIR)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=cfg.to_dict(), runs_dir=runs_dir, sweep_dir=str(out),  # keeps its mixins
                             pbt_dir=str(out / PBT_DIR) if sweep.scheduler == "pbt" else None,
                             gpus_per_worker=sweep.worker_gpus or 1.0),
        tune.PlacementGroupFactory([{"memory": TRIAL_DRIVER_MEMORY}]),
    )
    if restore:
        from cnnray.tune.schedulers import trials_done

        if trials_done(out / TUNE_DIR) >= sweep.num_trials:
            echo(f"[cnnray] every trial of the sweep in {out / TUNE_DIR} had ended: its results are written again "
                 "from their histories and checkpoints")
        else:
            echo(f"[cnnray] resuming the sweep in {out / TUNE_DIR}: finished trials are kept, the others continue")
        # Tune restores its settings (space, scheduler and searcher state, callbacks) from
        # the experiment; only the trainable is given again.
        tuner = tune.Tuner.restore(str(out / TUNE_DIR), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        from cnnray.tune.schedulers import budget_stopper, make_scheduler
        from cnnray.tune.search import make_searcher, tune_space

        if sweep.scheduler == "pbt":
            import random

            random.seed(cfg.seed)  # PBT picks donors and perturbations with Python's random
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep.search, sweep.space),
            tune_config=tune.TuneConfig(
                metric="val_accuracy",
                mode="max",
                scheduler=make_scheduler(sweep, out),
                # Seeded (cfg.seed), so the same command proposes the same configs.
                search_alg=make_searcher(sweep.search, cfg.seed, limit),
                num_samples=sweep.samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(out),
                # Train retries failed workers inside a trial; a trial that still fails is
                # reported, not rerun from scratch.
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_trial_progress(sweep, echo), *sweep_callbacks(tracking, sweep)],
                stop=budget_stopper(sweep.budget, out) if sweep.budget else None,
                verbose=0,  # our progress lines and summary table replace Tune's tables
            ),
        )
    echo(
        f"[cnnray] sweeping {cfg.model} on {cfg.dataset}: {sweep.num_trials} trials of "
        f"{', '.join(f'{k} {d.describe()}' for k, d in sweep.space.items())}; {cfg.epochs} epochs, "
        f"{cfg.workers} {'GPU' if cfg.gpu else 'CPU'} worker(s) per trial, up to {limit} at once, "
        f"search {sweep.search}, scheduler {sweep.scheduler}"
        + (f", budget {sweep.budget} trial-epochs" if sweep.budget else "")
    )
    from cnnray.tune.schedulers import record_spent_before, spent_trial_epochs

    record_spent_before(out)
    interrupts.fit(tuner)
    if interrupts.signum is not None:
        from cnnray.tune.interrupts import SweepInterrupted
        from cnnray.tune.schedulers import trials_done

        done = trials_done(out / TUNE_DIR)
        echo(f"[cnnray] sweep stopped with {done} of {sweep.num_trials} trials done; "
             f"Tune's state and every trial's history are saved in {out}")
        raise SweepInterrupted(interrupts.signum)
    spent = spent_trial_epochs(out)
    if sweep.budget:
        echo(f"[cnnray] spent {spent} of a budget of {sweep.budget} trial-epochs")
    best = finish_sweep(sweep, out, seconds=time.perf_counter() - started, echo=echo,
                        budget_spent=bool(sweep.budget and spent >= sweep.budget))
    finish_sweep_run(tracking, sweep, out, best, echo)
    return best
