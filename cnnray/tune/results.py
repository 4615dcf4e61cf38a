"""What a finished sweep leaves in `<out>`: the trials table, histories, best.json, the
plot, and the best checkpoint exported into the model store.

Everything here is read back from files (Tune's experiment state, each trial's history
file, cnnray.tune.history; Ray Train's checkpoints), so it gives the same answer after a resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from cnnray.checkpoint import read_meta, verify_checkpoint
from cnnray.config import TrainConfig
from cnnray.errors import CheckpointError, TrainingError
from cnnray.files import (  # noqa: F401  (the sweep folder's names, also read from here)
    BEST_FILE,
    HISTORIES_FILE,
    RUNS_DIR,
    TRIALS_CSV,
    TRIALS_PARQUET,
    TUNE_DIR,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
)
from cnnray.tune.history import read_history  # noqa: F401  (also read from here)
from cnnray.tune.sweep_config import SweepConfig

PLOT_FILE = "sweep.png"
EXPLOITS_CSV = "exploits.csv"  # PBT only: one row per exploit
class SweepError(TrainingError):
    """The sweep ran but left nothing to choose from (every trial failed): the CLI exits 1."""


def collect(sweep: SweepConfig, out: Path) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(one row per trial, {trial_id: history}) from the experiment as saved on disk."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(out / TUNE_DIR))
    rows, histories = [], {}
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        history = read_history(out, trial.trial_id)
        histories[trial.trial_id] = history
        epochs_run = max((h["epoch"] for h in history), default=0)
        error = trial.get_error() if trial.status == "ERROR" else None
        rows.append({
            "trial_id": trial.trial_id,
            **{k: trial.config.get(k) for k in sweep.space},
            "epochs_run": epochs_run,
            "best_val_accuracy": max((h["val_accuracy"] for h in history), default=math.nan),
            "final_val_accuracy": history[-1]["val_accuracy"] if history else math.nan,
            "stopped_early": trial.status == "TERMINATED" and epochs_run < sweep.train.epochs,
            "status": trial.status,
            "error": str(error).strip().splitlines()[-1] if error else "",
            "run_path": str(out / RUNS_DIR / trial.trial_id),
        })
    return rows, histories


def best_checkpoint(run_path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The complete checkpoint of a Ray Train run with the highest validation accuracy
    (the later epoch on a tie), and its meta.json. A PBT trial's later runs (one per
    exploit, `<run>-x<n>`: cnnray.tune.pbt) count as the same trial's."""
    candidates = []
    run_path = Path(run_path)
    for d in [*run_path.glob("epoch-*"), *run_path.parent.glob(f"{run_path.name}-x*/epoch-*")]:
        try:
            meta = read_meta(d)
        except CheckpointError:
            continue  # being written or deleted when the trial stopped
        candidates.append(((meta["metrics"]["val_accuracy"], meta["epoch"]), d, meta))
    for _, d, meta in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            verify_checkpoint(d)
        except CheckpointError:
            continue
        return d, meta
    raise SweepError(f"no complete checkpoint in {run_path}")


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["stopped_early"] = frame["stopped_early"].astype(bool)
    # Written beside the target and renamed, so a reader never sees half a table.
    atomic_write_bytes(frame.to_csv(index=False).encode(), out / TRIALS_CSV)
    atomic_write(out / TRIALS_PARQUET, lambda f: frame.to_parquet(f, index=False))


def format_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict[str, Any]], swept: list[str]) -> str:
    """The summary table: best validation accuracy first, trials without an epoch last."""
    ordered = sorted(rows, key=lambda r: -1.0 if math.isnan(r["best_val_accuracy"]) else r["best_val_accuracy"],
                     reverse=True)
    head = ["trial", *swept, "epochs", "best_val_acc", "status"]
    body = []
    for r in ordered:
        status = "FAILED" if r["status"] == "ERROR" else "stopped early" if r["stopped_early"] else (
            "finished" if r["status"] == "TERMINATED" else r["status"])
        body.append([r["trial_id"], *(format_value(r[k]) for k in swept), str(r["epochs_run"]),
                     f"{r['best_val_accuracy']:.4f}", status])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])


def finish_sweep(sweep: SweepConfig, out: Path, *, seconds: float, echo: Callable[[str], None] = print,
                 budget_spent: bool = False) -> dict[str, Any]:
    """Table, histories, best.json (with test accuracy), plot and model export.
    `budget_spent`: the budget ended the sweep, so trials left unstarted are expected."""
    from ray.train import Checkpoint

    from cnnray.store import export
    from cnnray.train.best_checkpoint import evaluate_on_test
    from cnnray.tune.plots import plot_sweep

    rows, histories = collect(sweep, out)
    done = sum(r["status"] in ("TERMINATED", "ERROR") for r in rows)
    if done < sweep.num_trials and not budget_spent:  # stopped without a signal seen here (Tune's state is saved)
        echo(f"[cnnray] sweep stopped with {done} of {sweep.num_trials} trials done")
        raise KeyboardInterrupt
    exploits = write_exploits(out)
    for row in rows if exploits else []:  # PBT: each trial's exploits in its own row too
        row["exploits"] = "; ".join(f"epoch {e['epoch']} from {e['from']}" for e in exploits if e["to"] == row["trial_id"])
    write_table(rows, out)
    atomic_write_json(histories, out / HISTORIES_FILE)
    ran = [r for r in rows if r["epochs_run"] > 0]
    if not ran:
        raise SweepError(f"no trial reported an epoch; see the errors in {out / TRIALS_CSV}")
    best_row = max(ran, key=lambda r: r["best_val_accuracy"])
    ckpt_dir, meta = best_checkpoint(best_row["run_path"])
    cfg = TrainConfig.from_dict(meta["config"])
    test = evaluate_on_test(Checkpoint.from_directory(str(ckpt_dir)), cfg)

    previous = _read_json(out / BEST_FILE)
    reused = previous.get("checkpoint") == str(ckpt_dir) and Path(previous.get("model_store", "")).is_dir()
    if reused:
        version_dir = Path(previous["model_store"])  # a resumed sweep with the same winner: no new version
    else:
        version_dir = export(ckpt_dir, sweep.model_store, sweep.model_name)
    best = {
        "trial_id": best_row["trial_id"],
        "swept": {k: best_row[k] for k in sweep.space},
        "config": meta["config"],
        "epoch": meta["epoch"],
        "val_accuracy": meta["metrics"]["val_accuracy"],
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "test_samples": test["test_samples"],
        "checkpoint": str(ckpt_dir),
        "model_store": str(version_dir),
        "model_name": sweep.model_name,
        "model_version": int(version_dir.name),
        "trials": len(rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
        "failed": sum(r["status"] == "ERROR" for r in rows),
        "sweep_seconds": seconds,
    }
    atomic_write_json(best, out / BEST_FILE)
    plot_sweep(rows, sweep.train, out / PLOT_FILE, best_trial=best_row["trial_id"])

    echo(format_table(rows, list(sweep.space)))
    if exploits:
        echo(format_exploits(exploits))
    echo(
        f"[cnnray] best trial {best['trial_id']}: val_accuracy {best['val_accuracy']:.4f} (epoch {best['epoch']})  "
        f"test_accuracy {best['test_accuracy']:.4f}  ({best['stopped_early']} of {best['trials']} trials stopped early, "
        f"{best['failed']} failed, {seconds:.0f}s)\n"
        f"[cnnray] {'kept' if reused else 'exported'} {sweep.model_name} version {best['model_version']} "
        f"{'(exported before) in' if reused else 'to'} {version_dir}\n"
        f"[cnnray] wrote {out / TRIALS_CSV}, {TRIALS_PARQUET}, {HISTORIES_FILE}, {BEST_FILE}, {PLOT_FILE}"
    )
    return best


def write_exploits(out: Path) -> list[dict[str, Any]]:
    """exploits.csv from PBT's exploits.json (one row per exploit: from, to, epoch, and
    old/donor/new value of each perturbed field); the list, empty without PBT."""
    import pandas as pd

    from cnnray.files import read_exploits

    exploits = read_exploits(out)
    if exploits:
        frame = pd.DataFrame([exploit_row(e) for e in exploits])
        atomic_write_bytes(frame.to_csv(index=False).encode(), out / EXPLOITS_CSV)
    return exploits


def exploit_row(e: dict[str, Any]) -> dict[str, Any]:
    row = {"from": e["from"], "to": e["to"], "epoch": e["epoch"]}
    for key in e["new"]:
        row.update({f"{key}_old": e["old"].get(key), f"{key}_donor": e["donor"].get(key), f"{key}_new": e["new"][key]})
    return row


def format_exploits(exploits: list[dict[str, Any]]) -> str:
    lines = [f"[cnnray] {len(exploits)} PBT exploit(s):"]
    for e in exploits:
        values = "  ".join(f"{k} {format_value(e['old'].get(k))} -> {format_value(v)}" for k, v in e["new"].items())
        lines.append(f"  epoch {e['epoch']}: {e['to']} took {e['from']}'s checkpoint  {values}")
    return "\n".join(lines)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
