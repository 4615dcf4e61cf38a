"""sweep.png: best validation accuracy of every trial against its learning rate (log x),
coloured by normalisation; hollow markers are trials ASHA stopped early."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cnnray.config import TrainConfig

# One colour per norm, fixed so that sweeps compare at a glance (matplotlib's tab10).
NORM_COLORS = {"none": "tab:blue", "batch": "tab:orange", "group": "tab:green", "layer": "tab:red"}


def plot_sweep(rows: list[dict[str, Any]], base: TrainConfig, path: str | Path, best_trial: str | None = None) -> None:
    """Rows as in trials.csv; a field the sweep did not vary takes its value from `base`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [
        (float(r.get("lr", base.lr)), str(r.get("norm", base.norm)), r["best_val_accuracy"], bool(r["stopped_early"]), r)
        for r in rows
        if not math.isnan(r["best_val_accuracy"])
    ]
    for norm in sorted({p[1] for p in points}):
        color = NORM_COLORS.get(norm, "tab:gray")
        for stopped in (False, True):
            sel = [p for p in points if p[1] == norm and p[3] == stopped]
            if sel:
                ax.scatter(
                    [p[0] for p in sel],
                    [p[2] for p in sel],
                    s=48,
                    facecolors="none" if stopped else color,
                    edgecolors=color,
                    linewidths=1.5,
                    label=f"norm={norm}" + (", stopped early" if stopped else ""),
                )
    best = [p for p in points if p[4]["trial_id"] == best_trial]
    if best:
        ax.scatter([best[0][0]], [best[0][2]], marker="*", s=260, c="gold", edgecolors="black", zorder=3, label="best")
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.08)  # keep edge points (and the star) off the frame
    ax.set_xlabel("peak learning rate (global batch)")
    ax.set_ylabel("best validation accuracy")
    # Names drawn as typed, not as matplotlib mathtext (see cnnray.report.plots.AS_TYPED).
    ax.set_title(f"{base.model} on {base.dataset}: {len(rows)} trials, up to {base.epochs} epochs", parse_math=False)
    ax.grid(True, which="both", alpha=0.3)
    if points:
        for text in ax.legend(loc="best", fontsize=8).get_texts():
            text.set_parse_math(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
