"""The PBT part of a sweep report: every trial's learning rate over the epochs, with each
exploit drawn where it happened, and the table of exploits (`<sweep>/exploits.json`,
written by cnnray.tune.pbt: from, to, epoch, old, donor and new values)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnray.report import html, plots

PNG = "pbt.png"


def plot_pbt_schedules(histories: dict[str, list[dict[str, Any]]], exploits: list[dict[str, Any]],
                       best_id: str | None, path: Path) -> Path:
    """Left: each trial's learning rate at the end of every epoch (log scale); right: its
    validation accuracy. An exploit is a dotted jump from the donor's point at the exploit
    epoch to the recipient's next epoch, which starts from the donor's checkpoint."""
    fig = plots.new_figure(12, 4.6)
    ax_lr, ax_acc = fig.subplots(1, 2)
    colours = {}
    for trial_id, hist in sorted(histories.items()):
        if not hist or "lr" not in hist[0]:
            continue
        best = str(trial_id) == str(best_id)
        colour = None
        for part in _segments(hist):  # a line per stretch of the trial's own training
            epochs = [h["epoch"] for h in part]
            line, = ax_lr.plot(epochs, [h["lr"] for h in part], marker="o", ms=3, lw=3 if best else 1.3, color=colour,
                               label=None if colour else f"{trial_id}" + (" (best)" if best else ""))
            colour = line.get_color()
            ax_acc.plot(epochs, [100 * h["val_accuracy"] for h in part], marker="o", ms=3, lw=3 if best else 1.3,
                        color=colour)
        colours[str(trial_id)] = colour
    by_epoch = {(str(t), h["epoch"]): h for t, hist in histories.items() for h in hist}
    for e in exploits:
        donor, after = by_epoch.get((e["from"], e["epoch"])), by_epoch.get((e["to"], e["epoch"] + 1))
        if donor is None or after is None:
            continue
        colour = colours.get(e["to"], "gray")
        for ax, key, scale in ((ax_lr, "lr", 1), (ax_acc, "val_accuracy", 100)):
            ax.plot([e["epoch"], e["epoch"] + 1], [scale * donor[key], scale * after[key]], ls=":", lw=1.5, color=colour)
            ax.plot([e["epoch"]], [scale * donor[key]], marker="*", ms=10, color=colour, mec="black", mew=0.5)
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    ax_lr.set_title(f"Learning rate per trial; {len(exploits)} exploits (star: donor's checkpoint)")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_title("Validation accuracy")
    for ax in (ax_lr, ax_acc):
        plots.epoch_axis(ax)
    plots.as_typed(ax_lr.legend(fontsize=7, loc="best"))
    return plots.save_png(fig, path)


def _segments(hist: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The history split where the trial restarted from a checkpoint (`start_epoch`
    changes: after an exploit it is the donor's epoch)."""
    parts: list[list[dict[str, Any]]] = []
    for h in hist:
        if not parts or h.get("start_epoch") != parts[-1][-1].get("start_epoch"):
            parts.append([])
        parts[-1].append(h)
    return parts


def pbt_section(histories: dict[str, list[dict[str, Any]]], exploits: list[dict[str, Any]],
                best_id: str | None, out: Path) -> html.Section:
    png = plot_pbt_schedules(histories, exploits, best_id, out / PNG)
    keys = list(exploits[0]["new"]) if exploits else []
    header = ["epoch", "from", "to", *(f"{k} old → new (donor's)" for k in keys), "val acc from / to"]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [[str(e["epoch"]), e["from"], e["to"],
             *(f"{fmt(e['old'].get(k))} → {fmt(e['new'].get(k))} ({fmt(e['donor'].get(k))})" for k in keys),
             f"{fmt(e.get('score_from'))} / {fmt(e.get('score_to'))}"] for e in exploits]
    body = html.figure(png, "Population-based training: each trial's learning rate and validation accuracy per "
                       "epoch; a dotted jump is an exploit (the trial took the starred trial's checkpoint and "
                       "perturbed values, in effect from its next step).")
    return html.Section("PBT exploits", body + html.table(header, rows, numeric=[0]))
