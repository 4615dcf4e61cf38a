"""Population-based training over Ray Train trials, and the record of every exploit.

Ray Tune's PopulationBasedTraining decides who exploits whom; what it cannot do here is
move a checkpoint, because a cnnray trial's checkpoints belong to its Ray Train run, not
to Tune (TuneReportCallback reports only their path). So `CnnrayPBT`:

- ranks a trial that reports epoch t (every `perturbation_interval` epochs) against every
  trial's score at epoch t, finished or running (Ray's ranks only the live trials' latest
  scores, which on a loaded machine rarely overlap), and keeps a copy of each trial's
  Train checkpoint at those epochs (`<out>/pbt/checkpoints/<trial>-e<epoch>`), since the
  donor's own run deletes older checkpoints as it goes on (CheckpointConfig.num_to_keep);
- on an exploit appends it to `<out>/exploits.json` (from, to, epoch, the recipient's old
  values, the donor's values and the new (perturbed) ones, the new run), then writes
  `<out>/pbt/<trial>.json`: the Train run the trial continues in (`<trial>-x<n>`, a new
  run per exploit) and the donor checkpoint that run starts from; `train_trial` reads it
  when the trial restarts, and the run's loop loads the donor's weights, optimizer state
  and epoch, with the trial's new lr/momentum/weight_decay in effect from its first step
  (cnnray.train.optim.load_optimizer_state, build_scheduler). In that order, a trial's
  history (cnnray.tune.history) never holds rows of a run no exploit names.

Only optimizer settings can change mid-run (PBT_FIELDS): a new model, norm or batch size
would not fit the donor's checkpoint or its schedule, so such a space is refused.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from cnnray.config import FIELD_RANGES, ConfigError
from cnnray.files import EXPLOITS_FILE, PBT_DIR, atomic_write_json, read_exploits

if TYPE_CHECKING:
    from cnnray.tune.space import Dist

PBT_FIELDS = ("lr", "momentum", "weight_decay")  # what an exploited trial can take over at once
QUANTILE = 0.25  # bottom quarter exploits the top quarter (Jaderberg et al. 2017)
RESAMPLE_PROBABILITY = 0.25  # else multiply by 0.8 or 1.2 (Ray's default factors)


def check_pbt_space(space: Mapping[str, "Dist"]) -> None:
    bad = [k for k in space if k not in PBT_FIELDS]
    if bad:
        raise ConfigError(f"scheduler pbt cannot perturb {', '.join(bad)} mid-run (the donor's checkpoint and schedule "
                          f"fix it); pbt sweeps only {', '.join(PBT_FIELDS)}: fix the others in the space or with flags")


def clip_to_space(config: dict[str, Any], space: Mapping[str, "Dist"]) -> dict[str, Any]:
    """PBT multiplies values by 0.8 or 1.2 without bounds: keep each inside its range
    (momentum 0.95 * 1.2 would be refused by every trial) and the config's own limits."""
    out = dict(config)
    for key, d in space.items():
        if key in out and d.kind in ("loguniform", "uniform"):
            out[key] = min(max(float(out[key]), d.values[0]), d.values[1])
        if key in out and key in FIELD_RANGES and isinstance(out[key], float):
            allowed = FIELD_RANGES[key]
            if not allowed.contains(out[key]):  # a choice perturbed past the config's range
                out[key] = random.choice(list(d.values))
    return out


def segment_file(pbt_dir: Path, trial_id: str) -> Path:
    return pbt_dir / f"{trial_id}.json"


def read_segment(pbt_dir: str | Path | None, trial_id: str) -> dict[str, Any] | None:
    """{"run": Train run name, "init_checkpoint": donor checkpoint} of an exploited trial."""
    if pbt_dir is None:
        return None
    try:
        return json.loads(segment_file(Path(pbt_dir), trial_id).read_text())
    except (OSError, ValueError):
        return None


def make_pbt(sweep: Any, out: Path) -> Any:
    """Ray's PopulationBasedTraining for `sweep` (a SweepConfig; not imported, see
    cnnray.tune.schedulers), recording exploits and segments under `out`."""
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.train import Checkpoint

    space = dict(sweep.space)
    mutations = {k: (list(d.values) if d.kind in ("choice", "grid") else d.to_tune()) for k, d in space.items()}
    pbt_dir = out / PBT_DIR
    epochs = sweep.train.epochs

    class CnnrayPBT(PopulationBasedTraining):
        """Ray's PBT, with trials compared at equal epochs and checkpoints kept per epoch.

        Ray ranks the live trials by their latest scores; on a loaded cluster whose trials
        start minutes apart, the first trial has often finished before the last reports,
        so no two trials are ever live together and nothing is exploited. Here a trial
        reporting epoch t is ranked against every trial's score at epoch t, running or
        finished, and may take over the epoch-t checkpoint of one in the top quarter."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self._at: dict[int, dict[str, tuple[float, dict[str, Any], str | None]]] = {}

        def on_trial_result(self, tune_controller, trial, result):
            from ray.tune.experiment import Trial
            from ray.tune.schedulers import TrialScheduler

            super().on_trial_result(tune_controller, trial, result)
            # Ray's PBT pauses trials to time-share the cluster with pending ones; a paused
            # cnnray trial restarts its whole Train run, so only an exploit pauses one.
            return TrialScheduler.NOOP if trial.status == Trial.PAUSED else TrialScheduler.CONTINUE

        def _keep_checkpoint(self, trial: Any, result: Mapping[str, Any]) -> str | None:
            """A copy of the Train checkpoint `result` names (its run deletes old ones)."""
            path = result.get("checkpoint_path")
            if not path or not Path(path).is_dir():
                return None
            kept = pbt_dir / "checkpoints" / f"{trial.trial_id}-e{int(result['epoch']):04d}"
            if not kept.is_dir():
                tmp = kept.with_name(kept.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(path, tmp)
                tmp.rename(kept)
            return str(kept)

        def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
            state = self._trial_state[trial]
            result = dict(state.last_result or {})
            epoch = int(result["epoch"])
            self._at.setdefault(epoch, {})[trial.trial_id] = (state.last_score, result, self._keep_checkpoint(trial, result))
            self._num_checkpoints += 1
            ranked = sorted(self._at[epoch], key=lambda t: self._at[epoch][t][0])
            n = min(math.ceil(len(ranked) * self._quantile_fraction), len(ranked) // 2)
            if n == 0 or epoch >= epochs or trial.trial_id not in ranked[:n]:
                return  # too few to compare, the last epoch, or not in the bottom quarter
            donors = [t for t in ranked[-n:] if self._at[epoch][t][2]]
            by_id = {t.trial_id: t for t in tune_controller.get_trials()}
            if not donors:
                return
            donor = by_id[random.choice(donors)]
            donor_state = self._trial_state[donor]
            saved = (donor_state.last_checkpoint, donor_state.last_result, donor_state.last_score,
                     donor_state.last_train_time, donor_state.last_perturbation_time)
            score, donor_result, ckpt = self._at[epoch][donor.trial_id]
            # Ray's _exploit reads the donor's state: give it the donor as it was at `epoch`.
            donor_state.last_checkpoint = Checkpoint.from_directory(ckpt)
            donor_state.last_result, donor_state.last_score = donor_result, score
            donor_state.last_train_time = donor_state.last_perturbation_time = epoch
            try:
                self._exploit(tune_controller, trial, donor)
            finally:
                (donor_state.last_checkpoint, donor_state.last_result, donor_state.last_score,
                 donor_state.last_train_time, donor_state.last_perturbation_time) = saved

        def _exploit(self, tune_controller, trial, trial_to_clone):
            donor_state = self._trial_state[trial_to_clone]
            old = {k: trial.config.get(k) for k in space}
            donor_values = {k: trial_to_clone.config.get(k) for k in space}
            exploits = read_exploits(out)
            count = sum(e["to"] == trial.trial_id for e in exploits) + 1
            ckpt = donor_state.last_checkpoint.path
            epoch = int(donor_state.last_result["epoch"])
            run = f"{trial.trial_id}-x{count}"
            score_to = (self._trial_state[trial].last_result or {}).get(self._metric)
            super()._exploit(tune_controller, trial, trial_to_clone)  # pauses the trial: it restarts later
            exploits.append({
                "from": trial_to_clone.trial_id, "to": trial.trial_id, "epoch": epoch,
                "old": old, "donor": donor_values, "new": {k: trial.config.get(k) for k in space},
                "score_from": donor_state.last_result.get(self._metric), "score_to": score_to,
                "checkpoint": ckpt, "run": run,
            })
            # The record first, then the segment the restarted trial reads: a history never
            # holds rows of a run its exploits do not name (cnnray.tune.history).
            atomic_write_json(exploits, out / EXPLOITS_FILE)
            atomic_write_json({"run": run, "init_checkpoint": ckpt, "donor": trial_to_clone.trial_id, "epoch": epoch},
                              segment_file(pbt_dir, trial.trial_id))

    pbt_dir.mkdir(parents=True, exist_ok=True)
    return CnnrayPBT(
        time_attr="epoch",
        perturbation_interval=sweep.perturbation_interval,
        hyperparam_mutations=mutations,
        quantile_fraction=QUANTILE,
        resample_probability=RESAMPLE_PROBABILITY,
        custom_explore_fn=lambda config: clip_to_space(config, space),
        synch=False,
    )
