"""Population-based training over Ray Train trials, and the record of every exploit.

Ray Tune's PopulationBasedTraining decides who exploits whom; what it cannot do here is
move a checkpoint, because a cnnray trial's checkpoints belong to its Ray Train run, not
to Tune (TuneReportCallback reports only their path). So `CnnrayPBT`:

- keeps a copy of each top-quantile trial's latest Train checkpoint when PBT looks at it
  (`<out>/pbt/checkpoints/<trial>-e<epoch>`), since the donor's own run deletes older
  checkpoints as it goes on (CheckpointConfig.num_to_keep);
- on an exploit writes `<out>/pbt/<trial>.json`: the Train run the trial continues in
  (`<trial>-x<n>`, a new run per exploit) and the donor checkpoint that run starts from;
  `train_trial` reads it when the trial restarts, and the run's loop loads the donor's
  weights, optimizer state and epoch, with the trial's new lr/momentum/weight_decay in
  effect from its first step (cnnray.train.optim.load_optimizer_state, build_scheduler);
- appends the exploit to `<out>/exploits.json`: from, to, epoch, the recipient's old
  values, the donor's values and the new (perturbed) ones.

Only optimizer settings can change mid-run (PBT_FIELDS): a new model, norm or batch size
would not fit the donor's checkpoint or its schedule, so such a space is refused.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from cnnray.checkpoint import atomic_write_json
from cnnray.config import FIELD_RANGES, ConfigError

if TYPE_CHECKING:
    from cnnray.tune.space import Dist
    from cnnray.tune.sweep import SweepConfig

PBT_FIELDS = ("lr", "momentum", "weight_decay")  # what an exploited trial can take over at once
PBT_DIR = "pbt"
EXPLOITS_FILE = "exploits.json"
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


def read_exploits(out: str | Path) -> list[dict[str, Any]]:
    try:
        return json.loads((Path(out) / EXPLOITS_FILE).read_text())
    except (OSError, ValueError):
        return []


def make_pbt(sweep: "SweepConfig", out: Path) -> Any:
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pbt import _PBTTrialState  # noqa: F401  (the state PBT keeps per trial)
    from ray.train import Checkpoint

    space = dict(sweep.space)
    mutations = {k: (list(d.values) if d.kind in ("choice", "grid") else d.to_tune()) for k, d in space.items()}
    pbt_dir = out / PBT_DIR

    class CnnrayPBT(PopulationBasedTraining):
        def _keep_checkpoint(self, trial: Any, result: Mapping[str, Any]) -> Any:
            """A copy of the Train checkpoint `result` names, as a Tune Checkpoint."""
            path = result.get("checkpoint_path")
            if not path or not Path(path).is_dir():
                return None
            kept = pbt_dir / "checkpoints" / f"{trial.trial_id}-e{int(result['epoch']):04d}"
            if not kept.is_dir():
                tmp = kept.with_name(kept.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(path, tmp)
                tmp.rename(kept)
            return Checkpoint.from_directory(str(kept))

        def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
            # Ray's own asks the trial to save a Tune checkpoint, which a cnnray trial has
            # not got: the Train checkpoint it just reported is kept instead.
            state = self._trial_state[trial]
            if trial in upper_quantile:
                state.last_checkpoint = self._keep_checkpoint(trial, state.last_result or {})
                self._num_checkpoints += 1
            else:
                state.last_checkpoint = None
            if trial in lower_quantile:
                donor = random.choice(upper_quantile)
                if self._trial_state[donor].last_checkpoint:
                    self._exploit(tune_controller, trial, donor)

        def _exploit(self, tune_controller, trial, trial_to_clone):
            donor_state = self._trial_state[trial_to_clone]
            old = {k: trial.config.get(k) for k in space}
            donor_values = {k: trial_to_clone.config.get(k) for k in space}
            exploits = read_exploits(out)
            count = sum(e["to"] == trial.trial_id for e in exploits) + 1
            ckpt = donor_state.last_checkpoint.path
            epoch = int(donor_state.last_result["epoch"])
            # Before the trial restarts (super() pauses it): where it goes on, from what.
            atomic_write_json({"run": f"{trial.trial_id}-x{count}", "init_checkpoint": ckpt,
                               "donor": trial_to_clone.trial_id, "epoch": epoch},
                              segment_file(pbt_dir, trial.trial_id))
            super()._exploit(tune_controller, trial, trial_to_clone)
            exploits.append({
                "from": trial_to_clone.trial_id, "to": trial.trial_id, "epoch": epoch,
                "old": old, "donor": donor_values, "new": {k: trial.config.get(k) for k in space},
                "score_from": donor_state.last_result.get(self._metric),
                "score_to": (self._trial_state[trial].last_result or {}).get(self._metric),
                "checkpoint": ckpt,
            })
            atomic_write_json(exploits, out / EXPLOITS_FILE)

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
