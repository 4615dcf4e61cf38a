"""One trial's per-epoch metrics: what the sweep's table and histories, ASHA's replay
after --resume and the budget's count all read.

Each trial's Train runs append one line per epoch to `<out>/history/<trial_id>.jsonl`,
from the Train controller right after the epoch's checkpoint is registered
(`history_callback`), so the history and the checkpoints agree whatever moment a sweep
is interrupted at. Tune's own `tune/<trial>/result.json` is not used: Tune writes it in a
staging folder and copies it to the sweep folder every few seconds, and a trial that
restarts (after --resume, or after a PBT exploit, which gives it a checkpoint) starts a
new staging file, or copies the sweep folder's possibly older one over it: the copy
then holds only the epochs after the restart ([3] of [1, 2, 3]), or none.

The history of a trial is the lineage of its weights as the trial lived it:
- an epoch reported twice (rerun after a resume or a worker failure) keeps its latest report;
- a PBT exploit at epoch t (cnnray.tune.pbt) continues the trial in a new Train run from
  the donor's epoch-t checkpoint: the trial's own epochs 1..t, then the new run's t+1..,
  whose first row is marked `"pbt_exploit": {"from": donor, "epoch": t}`; epochs after t
  that the trial's old run reported before it was stopped are dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from cnnray.files import HISTORY_DIR

# Keys Tune adds to every reported result, and the checkpoint path TuneReportCallback
# adds: dropped so that a history holds the metrics exactly as the training loop reports them.
_TUNE_KEYS = frozenset(
    {"training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp", "date",
     "timesteps_total", "episodes_total", "timesteps_since_restore", "iterations_since_restore", "pid",
     "hostname", "node_ip", "done", "trial_id", "experiment_tag", "config", "checkpoint_dir_name",
     "checkpoint_path", "should_checkpoint", "episodes_this_iter", "timesteps_this_iter"}
)
RUN_KEY = "run"  # the Train run (`<trial>` or `<trial>-x<n>` after the n-th exploit) a row came from
EXPLOIT_KEY = "pbt_exploit"


def history_file(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / HISTORY_DIR / f"{trial_id}.jsonl"


def append_row(path: str | Path, run: str, metrics: dict[str, Any]) -> None:
    """Append one epoch's metrics (one JSON line, flushed and fsynced: the epoch's
    checkpoint is already on disk, and a resume reads this file next)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {RUN_KEY: run, **{k: v for k, v in metrics.items() if k not in _TUNE_KEYS}}
    with open(path, "a+b") as f:  # O_APPEND: one write per line, never interleaved
        torn = False  # the last row was cut short (killed mid-line): start on a line of its own
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def _segments(trial_id: str, rows: list[dict[str, Any]],
              exploits: Iterable[dict[str, Any]]) -> list[tuple[int, str, str | None]]:
    """(epoch t, run, donor) of each exploit `trial_id` made, in order: the n-th continues in
    run `<trial>-x<n>` (cnnray.tune.pbt) from the donor's epoch-t checkpoint. A run whose
    exploit record is missing (the sweep was killed while recording it) starts where its
    first row says it resumed (`start_epoch`)."""
    mine = [e for e in exploits if e["to"] == trial_id]
    segments = {e.get("run", f"{trial_id}-x{n}"): (int(e["epoch"]), e["from"]) for n, e in enumerate(mine, 1)}
    for row in rows:
        run = row.get(RUN_KEY, trial_id)
        if run != trial_id and run not in segments and "start_epoch" in row:
            segments[run] = (int(row["start_epoch"]), None)
    return sorted(((at, run, donor) for run, (at, donor) in segments.items()),
                  key=lambda s: (s[0], int(s[1].rsplit("-x", 1)[-1]) if "-x" in s[1] else 0))


def lineage(trial_id: str, rows: Iterable[dict[str, Any]], exploits: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The trial's history from its rows in the order they were written (module docstring)."""
    rows = [r for r in rows if "epoch" in r]
    segments = _segments(trial_id, rows, exploits)

    def run_of(epoch: int) -> str:  # the run whose weights epoch `epoch` of this trial belongs to
        run = trial_id
        for at, seg_run, _ in segments:
            if epoch > at:
                run = seg_run
        return run

    by_epoch: dict[int, dict[str, Any]] = {}
    for row in rows:
        epoch = int(row["epoch"])
        if row.get(RUN_KEY, trial_id) == run_of(epoch):
            by_epoch[epoch] = dict(row)
    for at, run, donor in segments:
        if at + 1 in by_epoch and by_epoch[at + 1].get(RUN_KEY) == run:
            by_epoch[at + 1][EXPLOIT_KEY] = {"from": donor, "epoch": at}
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of `path` ([] when missing); a torn last line (a crash mid-write) is skipped."""
    rows = []
    try:
        text = Path(path).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def registered_rows(sweep_dir: str | Path, trial_id: str) -> list[dict[str, Any]]:
    """Rows for the checkpoints Ray Train registered in the trial's runs (its snapshot of
    kept checkpoints, with their metrics): a sweep stopped between a registration and the
    history's append (the Train controller killed in between) loses no epoch that a resume
    will not train again."""
    from cnnray.files import RUNS_DIR

    rows = []
    for snapshot in sorted(Path(sweep_dir, RUNS_DIR).glob(f"{trial_id}*/checkpoint_manager_snapshot.json")):
        run = snapshot.parent.name
        if run != trial_id and not run.startswith(f"{trial_id}-x"):
            continue
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
        except (OSError, ValueError):  # caught mid-write: the history file has these epochs
            continue
        rows += [{RUN_KEY: run, **r["metrics"]} for r in results if "epoch" in r.get("metrics", {})]
    return rows


def read_history(sweep_dir: str | Path, trial_id: str) -> list[dict[str, Any]]:
    """Per-epoch metrics of one trial of the sweep in `sweep_dir`, oldest first: the rows
    its runs appended, and for an epoch missing there, its registered checkpoint's metrics."""
    from cnnray.files import read_exploits

    rows = read_rows(history_file(sweep_dir, trial_id))
    written = {(r.get(RUN_KEY), r.get("epoch")) for r in rows}
    missing = [r for r in registered_rows(sweep_dir, trial_id) if (r[RUN_KEY], r["epoch"]) not in written]
    return lineage(trial_id, missing + rows, read_exploits(sweep_dir))


def history_callback(sweep_dir: str | Path, trial_id: str, run: str) -> Any:
    """A Ray Train callback, run in the controller, that appends rank 0's metrics of each
    report to the trial's history file."""
    from ray.train import UserCallback

    path = str(history_file(sweep_dir, trial_id))

    class AppendHistory(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                append_row(path, run, metrics[0])

    return AppendHistory()
