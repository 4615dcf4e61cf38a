"""The report of a sweep (`cnnray tune` output): `<sweep>/report/report.html` and its PNGs.

    from cnnray.report.sweep import write_sweep_report
    write_sweep_report("runs/sweep-mnist")

A sweep folder holds `trials.parquet`/`trials.csv` (one row per trial: `trial_id`, the
swept TrainConfig fields such as `lr`, `momentum`, `norm`, then `epochs_run`,
`best_val_accuracy`, `stopped_early`, `status`), `histories.json` (trial id -> per-epoch
metric dicts) and `best.json` (`trial_id`, `config`, `val_accuracy`, `test_accuracy`,
`checkpoint`, `model_store`). The page shows every trial's validation curve on one
chart, validation accuracy against learning rate, momentum and norm, the trial table,
and for the best trial's checkpoint the same test-set and model sections as a run report.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from cnnray.config import ConfigError, TrainConfig
from cnnray.report import html, plots
from cnnray.report.run import PAGE, REPORT_DIR, config_table, read_json
from cnnray.files import BEST_FILE as BEST
from cnnray.files import HISTORIES_FILE as HISTORIES
from cnnray.files import TRIALS_CSV, TRIALS_PARQUET

LEGEND_MAX = 12  # trials named in a chart's legend; more would hide the curves
NORM_MARKERS = {"none": "o", "batch": "s", "group": "^", "layer": "D"}


def is_sweep_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / TRIALS_CSV).is_file() or (p / TRIALS_PARQUET).is_file() or (p / HISTORIES).is_file()


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rows of the trial table (parquet keeps the types; the CSV is typed by pyarrow)."""
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if (sweep_dir / TRIALS_PARQUET).is_file():
            return pyarrow.parquet.read_table(sweep_dir / TRIALS_PARQUET).to_pylist()
        if (sweep_dir / TRIALS_CSV).is_file():
            return pyarrow.csv.read_csv(sweep_dir / TRIALS_CSV).to_pylist()
    except Exception as e:  # pyarrow's ArrowInvalid and OSError: a broken table is bad input
        raise ConfigError(f"cannot read the trial table in {sweep_dir}: {e}") from None
    return []


def _acc(trial: dict[str, Any]) -> float | None:
    """best_val_accuracy, or None for a trial that reported no epoch (NaN or missing)."""
    v = trial.get("best_val_accuracy")
    return float(v) if isinstance(v, (int, float)) and not math.isnan(v) else None


def swept_keys(trials: list[dict[str, Any]]) -> list[str]:
    """TrainConfig fields that appear in the table and take more than one value."""
    names = {f.name for f in fields(TrainConfig)}
    keys = [k for k in (trials[0] if trials else {}) if k in names]
    return [k for k in keys if len({str(t.get(k)) for t in trials}) > 1] or keys


def _label(trial: dict[str, Any], keys: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return f"{trial['trial_id']} " + " ".join(f"{k}={fmt(trial.get(k))}" for k in keys)


def plot_trial_curves(
    histories: dict[str, list[dict[str, Any]]], trials: list[dict[str, Any]], best_id: str | None, path: Path
) -> Path:
    """Validation accuracy and loss per epoch of every trial on one chart; the best trial
    is drawn thick, early-stopped trials dashed and ending in a cross."""
    by_id = {str(t["trial_id"]): t for t in trials}
    keys = swept_keys(trials)
    fig = plots.new_figure(12, 4.6)
    ax_acc, ax_loss = fig.subplots(1, 2)
    named = len(histories) <= LEGEND_MAX
    for trial_id, hist in sorted(histories.items()):
        if not hist:
            continue
        trial = by_id.get(str(trial_id), {"trial_id": trial_id})
        epochs = [h["epoch"] for h in hist]
        best = str(trial_id) == str(best_id)
        stopped = bool(trial.get("stopped_early"))
        style = dict(lw=3 if best else 1.2, ls="--" if stopped else "-", alpha=1 if best else 0.75,
                     label=(_label(trial, keys) + (" (best)" if best else "") + (" (stopped early)" if stopped else ""))
                     if named or best else None)
        line, = ax_acc.plot(epochs, [100 * h["val_accuracy"] for h in hist], marker="o", ms=3, **style)
        if "val_loss" in hist[0]:
            ax_loss.plot(epochs, [h["val_loss"] for h in hist], marker="o", ms=3, color=line.get_color(),
                         **{**style, "label": None})
        if stopped:
            ax_acc.plot(epochs[-1], 100 * hist[-1]["val_accuracy"], "x", ms=9, mew=2, color=line.get_color())
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_title(f"Validation accuracy of {len(histories)} trials")
    ax_loss.set_ylabel("validation loss")
    ax_loss.set_title("Validation loss")
    for ax in (ax_acc, ax_loss):
        plots.epoch_axis(ax)
    plots.as_typed(ax_acc.legend(fontsize=7, loc="lower right"))  # trial ids and swept values, as typed
    return plots.save_png(fig, path)


def plot_hyperparameters(trials: list[dict[str, Any]], best_id: str | None, path: Path) -> Path | None:
    """Best validation accuracy against the learning rate (colour: momentum, marker: norm),
    and the lr-momentum plane coloured by accuracy. None when no numeric field was swept."""
    from matplotlib.lines import Line2D

    keys = swept_keys(trials)
    numeric = [k for k in keys if all(isinstance(t.get(k), (int, float)) and not isinstance(t.get(k), bool) for t in trials)]
    if not numeric or not trials:
        return None
    x_key = "lr" if "lr" in numeric else numeric[0]
    c_key = "momentum" if "momentum" in numeric and x_key != "momentum" else next((k for k in numeric if k != x_key), None)
    trials = [t for t in trials if _acc(t) is not None]  # failed trials have no accuracy to plot
    if not trials:
        return None
    acc = np.array([100 * _acc(t) for t in trials])
    xs = np.array([float(t[x_key]) for t in trials])
    log_x = bool((xs > 0).all() and xs.max() / xs.min() > 3)
    norms = [str(t.get("norm", "none")) for t in trials]
    fig = plots.new_figure(12, 4.6)
    ax_acc, ax_plane = fig.subplots(1, 2)
    cvals = np.array([float(t[c_key]) for t in trials]) if c_key else None
    for norm in sorted(set(norms)):
        idx = [i for i, n in enumerate(norms) if n == norm]
        marker = NORM_MARKERS.get(norm, "P")
        colour = (dict(c=cvals[idx], cmap="viridis", vmin=cvals.min(), vmax=cvals.max()) if cvals is not None
                  else dict(color="tab:blue"))
        sc = ax_acc.scatter(xs[idx], acc[idx], marker=marker, s=60, edgecolors="black", linewidths=0.5, **colour)
        if c_key:
            ax_plane.scatter(xs[idx], cvals[idx], c=acc[idx], cmap="plasma", vmin=acc.min(), vmax=acc.max(),
                             marker=marker, s=80, edgecolors="black", linewidths=0.5)
    if c_key:
        fig.colorbar(sc, ax=ax_acc).set_label(c_key, **plots.AS_TYPED)
        fig.colorbar(ax_plane.collections[0], ax=ax_plane, label="best validation accuracy (%)")
    for i, t in enumerate(trials):
        if str(t["trial_id"]) == str(best_id):
            ax_acc.scatter([xs[i]], [acc[i]], s=260, facecolors="none", edgecolors="red", linewidths=2)
            if c_key:
                ax_plane.scatter([xs[i]], [cvals[i]], s=280, facecolors="none", edgecolors="red", linewidths=2)
    ax_acc.set_xlabel(x_key, **plots.AS_TYPED)
    ax_acc.set_ylabel("best validation accuracy (%)")
    ax_acc.set_title(f"Accuracy vs {x_key}" + (f" (colour: {c_key}; marker: norm)" if c_key else " (marker: norm)"),
                     **plots.AS_TYPED)
    # Proxy handles in grey: the scatter's own would show the first point's colour.
    handles = [Line2D([], [], ls="", marker=NORM_MARKERS.get(n, "P"), color="lightgray", mec="black", ms=8,
                      label=f"norm {n}") for n in sorted(set(norms))]
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="red", mew=2, ms=13, label="best trial"))
    plots.as_typed(ax_acc.legend(handles=handles, fontsize=8))
    if c_key:
        ax_plane.set_xlabel(x_key, **plots.AS_TYPED)
        ax_plane.set_ylabel(c_key, **plots.AS_TYPED)
        ax_plane.set_title(f"{x_key} and {c_key} tried (colour: accuracy; ring: best)", **plots.AS_TYPED)
    else:
        ax_plane.axis("off")
    for ax in (ax_acc, ax_plane):
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    return plots.save_png(fig, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_sweep_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *, tensorboard: bool = True) -> Path:
    """Write the report of the sweep in `sweep_dir`; return the HTML page's path."""
    from cnnray.checkpoint import CheckpointError, read_meta
    from cnnray.report import tensorboard as tb
    from cnnray.checkpoint import resolve_checkpoint
    from cnnray.report.sections import checkpoint_report

    from cnnray.paths import resolve_path

    sweep_dir = Path(resolve_path(sweep_dir, "sweep folder"))  # as typed where the command ran
    trials = read_trials(sweep_dir)
    histories = read_json(sweep_dir / HISTORIES, "cnnray tune folder") if (sweep_dir / HISTORIES).is_file() else {}
    best = read_json(sweep_dir / BEST, "cnnray tune folder") if (sweep_dir / BEST).is_file() else {}
    if not trials and not histories:
        raise ConfigError(f"{sweep_dir} holds no trials ({TRIALS_CSV} and {HISTORIES} are missing or empty)")
    if not trials:  # a histories.json alone: rebuild the table's accuracy columns from it
        trials = [{"trial_id": k, "epochs_run": len(v), "best_val_accuracy": max((h["val_accuracy"] for h in v), default=None)}
                  for k, v in histories.items()]
    trials.sort(key=lambda t: -(_acc(t) if _acc(t) is not None else -1.0))
    best_id = best.get("trial_id") or trials[0]["trial_id"]
    out = Path(resolve_path(out_dir, "--out", lasting=True)) if out_dir else sweep_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots.remove_old_pngs(out)

    keys = swept_keys(trials)
    sections, findings = [], []
    body = []
    if histories:
        body.append(html.figure(plot_trial_curves(histories, trials, best_id, out / "trials.png"),
                                "Validation accuracy and loss of every trial per epoch; the best trial is thick, "
                                "early-stopped trials are dashed and end in a cross."))
    hp = plot_hyperparameters(trials, best_id, out / "hyperparams.png")
    body.append(html.figure(hp, "Each trial's best validation accuracy against its learning rate, momentum and "
                            "normalisation (left), and where the trials sat in the lr-momentum plane (right).")
                if hp else html.note("No numeric setting varied between trials: nothing to plot against."))
    sections.append(html.Section("Trials", "".join(body)))
    columns = ["trial_id", *keys, "epochs_run", "best_val_accuracy", "stopped_early", "status", "error"]
    columns = [c for c in columns if any(t.get(c) not in (None, "") for t in trials)]
    sections.append(html.Section("Trial table", html.table(
        columns, [[_fmt(t.get(c)) for c in columns] for t in trials],
        numeric=[i for i, c in enumerate(columns) if c in ("epochs_run", "best_val_accuracy")])))

    accs = [a for a in map(_acc, trials) if a is not None]
    stopped = sum(bool(t.get("stopped_early")) for t in trials)
    best_row = next((t for t in trials if str(t["trial_id"]) == str(best_id)), trials[0])
    failed = sum(str(t.get("status")) == "ERROR" for t in trials)
    findings.append(f"{len(trials)} trials, {stopped} stopped early, {failed} failed; best validation accuracy "
                    + (f"{100 * max(accs):.2f}%, worst {100 * min(accs):.2f}%." if accs else "unknown."))
    findings.append(f"Best trial {best_id}: " + ", ".join(f"{k}={_fmt(best_row.get(k))}" for k in keys) + ".")

    rep = None
    if best.get("checkpoint"):
        with ExitStack() as stack:
            try:
                ckpt = resolve_checkpoint(str(best["checkpoint"]), sweep_dir, stack)
                cfg = TrainConfig.from_dict(read_meta(ckpt)["config"])
                rep = checkpoint_report(ckpt, cfg, out, recorded_test_accuracy=best.get("test_accuracy"))
            except CheckpointError as e:
                sections.append(html.Section("Best trial", html.note(f"Best checkpoint not shown: {e}")))
    if rep is not None:
        intro = html.paragraph(f"Trial {best_id}, checkpoint {best['checkpoint']}"
                               + (f", published as {best['model_store']}" if best.get("model_store") else "") + ".")
        sections.append(html.Section("Best trial", intro + config_table(cfg)))
        sections += rep.sections
        findings += rep.findings
    if tensorboard:
        written = [tb.write_events(h, sweep_dir / "tensorboard" / str(k)) for k, h in histories.items()]
        if any(written):
            findings.append(f"TensorBoard: tensorboard --logdir {sweep_dir / 'tensorboard'}")

    header = [(str(len(trials)), "trials")]
    if accs:
        header.append((f"{100 * max(accs):.2f}%", "best validation accuracy"))
    if best.get("test_accuracy") is not None:
        header.append((f"{100 * best['test_accuracy']:.2f}%", "best trial's test accuracy"))
    header.append((str(stopped), "stopped early"))
    page = html.page(f"Sweep {sweep_dir.name}", f"cnnray sweep report · {sweep_dir}", html.cards(header),
                     [html.Section("What happened", html.bullet_list(findings)), *sections])
    return html.write_page(page, out / PAGE)
