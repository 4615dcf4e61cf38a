"""One trial's per-epoch metrics, read back from Tune's result.json: what the sweep's
results, ASHA's replay after --resume and the budget's count all read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Keys Tune adds to every reported result, and the checkpoint path TuneReportCallback
# adds: dropped so that a history holds the metrics exactly as the training loop reports them.
_TUNE_KEYS = frozenset(
    {"training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp", "date",
     "timesteps_total", "episodes_total", "timesteps_since_restore", "iterations_since_restore", "pid",
     "hostname", "node_ip", "done", "trial_id", "experiment_tag", "config", "checkpoint_dir_name",
     "checkpoint_path", "should_checkpoint", "episodes_this_iter", "timesteps_this_iter"}
)


def read_history(trial_dir: str | Path) -> list[dict[str, Any]]:
    """Per-epoch metrics of one trial from Tune's result.json (one JSON object a line).
    An epoch reported twice (rerun after a resume) keeps its latest report."""
    path = Path(trial_dir) / "result.json"
    by_epoch: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "epoch" in row:
                    by_epoch[int(row["epoch"])] = {k: v for k, v in row.items() if k not in _TUNE_KEYS}
    return [by_epoch[e] for e in sorted(by_epoch)]
