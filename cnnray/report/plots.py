"""The report's pictures, one PNG per function, drawn with matplotlib's Agg renderer.

Each function takes plain data (history dicts, tensors) and a path, writes the PNG and
returns the path. Figures are built as `matplotlib.figure.Figure` on an explicit Agg
canvas, never through pyplot: no global backend switch, no GUI, safe in any process
(the Ray driver included) and nothing happens at import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DPI = 100  # PNG pixels per figure inch; the sizes below are in inches
GRID_COLUMNS = 8  # response maps shown per conv layer (the strongest channels)
# Every PNG a report may write: a rerun removes these first, so no stale picture from an
# earlier report (say, a confusion matrix when the test data has since gone) sits beside
# a page that no longer shows it. Other files in an --out folder are never touched.
# Text that comes from data (class, model, run, trial and layer names, swept values) is
# drawn as typed: by default matplotlib reads text between two '$' as mathtext, which
# garbles "$5 off" and raises on "Ba$$in". Pass **AS_TYPED to every such text (titles,
# labels, tick labels) and give legends to `as_typed`. Our own text uses no mathtext.
AS_TYPED = {"parse_math": False}
REPORT_PNGS = ("curves.png", "lr_speed.png", "confusion.png", "mistakes.png", "filters.png", "responses.png",
               "trials.png", "hyperparams.png")


def remove_old_pngs(out_dir: Path) -> None:
    for name in REPORT_PNGS:
        (Path(out_dir) / name).unlink(missing_ok=True)


def as_typed(legend: Any) -> Any:
    """A legend whose entries (trial names, values) are drawn as typed; returns it."""
    if legend is not None:
        for text in legend.get_texts():
            text.set_parse_math(False)
    return legend


def new_figure(width: float, height: float):
    """A Figure of width x height inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas renders the PNG; no pyplot state involved
    return fig


def save_png(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG on a white background (readable in dark-themed viewers too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")
    return path


def epoch_axis(ax: Any) -> None:
    """Integer epoch ticks on x, with a light grid."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def display_image(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """uint8 C x H x W -> (array for imshow, colormap): grey for one channel, RGB for three."""
    a = image.detach().cpu().numpy()
    if a.shape[0] == 3:
        return a.transpose(1, 2, 0), None
    return a[0], "gray"


def _unit(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own range (a flat array becomes mid-grey)."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.full_like(a, 0.5, dtype=np.float64)


def mosaic(tiles: Sequence[np.ndarray], columns: int, gap: int = 1) -> np.ndarray:
    """Tiles of one shape (H x W or H x W x 3) in a grid; gaps are NaN (drawn blank)."""
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / columns)
    shape = (rows * (h + gap) - gap, columns * (w + gap) - gap, *tiles[0].shape[2:])
    out = np.full(shape, np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


# --- training curves -------------------------------------------------------------------
def plot_curves(
    history: Sequence[dict[str, Any]],
    path: Path,
    *,
    test_accuracy: float | None = None,
    best_epoch: int | None = None,
    label_smoothing: float = 0.0,
) -> Path:
    """Loss and accuracy per epoch, train and validation, with the test accuracy."""
    epochs = [h["epoch"] for h in history]
    fig = new_figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    smoothing = f" (label smoothing {label_smoothing:g})" if label_smoothing else ""
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label=f"train{smoothing}")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title("Loss")
    ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train (during the epoch)")
    ax_acc.plot(epochs, [100 * h["val_accuracy"] for h in history], "s-", label="validation (end of epoch)")
    if test_accuracy is not None:
        ax_acc.axhline(100 * test_accuracy, color="black", ls="--", lw=1, label=f"test {100 * test_accuracy:.2f}%")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Accuracy")
    for ax in (ax_loss, ax_acc):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", ls=":", lw=1, label=f"best checkpoint (epoch {best_epoch})")
        epoch_axis(ax)
        ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_schedule_and_speed(
    history: Sequence[dict[str, Any]], path: Path, schedule: tuple[np.ndarray, np.ndarray] | None = None
) -> Path:
    """Left: the learning rate (the configured per-step schedule, and the value recorded at
    each epoch's end). Right: training throughput and seconds per epoch."""
    epochs = [h["epoch"] for h in history]
    fig = new_figure(11, 3.6)
    ax_lr, ax_speed = fig.subplots(1, 2)
    if schedule is not None:
        ax_lr.plot(schedule[0], schedule[1], "-", lw=1.5, label="schedule (per step)")
    ax_lr.plot(epochs, [h["lr"] for h in history], "o", label="recorded at epoch end")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("Learning rate")
    ax_lr.legend(fontsize=8)
    epoch_axis(ax_lr)
    bars = ax_speed.bar(epochs, [h["samples_per_second"] for h in history], color="tab:green", alpha=0.8)
    for bar, h in zip(bars, history):
        ax_speed.annotate(
            f"{h['epoch_seconds']:.1f} s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center", va="bottom", fontsize=8,
        )
    ax_speed.set_ylabel("training samples / s (all workers)")
    ax_speed.set_title("Throughput (label: seconds per epoch)")
    epoch_axis(ax_speed)
    return save_png(fig, path)


# --- test set ----------------------------------------------------------------------------
def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path) -> Path:
    """Rows are true classes, columns predictions; colour is the share of the row, so a
    rare class's errors are as visible as a common one's; cells show the counts."""
    cm = confusion.cpu().numpy().astype(np.int64)
    k = len(classes)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(12.0, 2.5 + 0.45 * k)
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    if k <= 30:  # beyond that the numbers no longer fit in the cells
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{cm[i, j]:,}", ha="center", va="center", fontsize=7 if k > 12 else 9,
                            color="white" if share[i, j] > 0.5 else "black")
    ticks = range(k) if k <= 30 else range(0, k, max(1, k // 20))
    ax.set_xticks(list(ticks), [classes[t] for t in ticks], rotation=90 if max(map(len, classes)) > 3 else 0,
                  **AS_TYPED)
    ax.set_yticks(list(ticks), [classes[t] for t in ticks], **AS_TYPED)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(cm.sum())
    ax.set_title(f"Confusion matrix\n{total:,} test images, accuracy {100 * np.trace(cm) / max(total, 1):.2f}%")
    return save_png(fig, path)


def plot_mistakes(
    images: torch.Tensor,
    true: Sequence[int],
    pred: Sequence[int],
    confidence: Sequence[float],
    classes: Sequence[str],
    path: Path,
    columns: int = 6,
) -> Path:
    """The given test images (uint8 N x C x H x W) with their true and predicted labels."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig = new_figure(1.7 * columns, 1.95 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        img, cmap = display_image(images[i])
        ax.imshow(img, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(
            f"true {classes[true[i]]}\npred {classes[pred[i]]} ({100 * confidence[i]:.0f}%)",
            fontsize=9, color="firebrick", **AS_TYPED,
        )
    return save_png(fig, path)


# --- inside the model ----------------------------------------------------------------------
def plot_filters(weight: torch.Tensor, path: Path, name: str = "first conv layer") -> Path:
    """A conv layer's kernels (O x I x kh x kw), one tile each, 8 to a row.

    Three input channels are shown as colour (each kernel scaled to its own range);
    otherwise the kernel (averaged over input channels) on a diverging map, red for
    positive and blue for negative weights, scaled by its largest |weight|.
    """
    w = weight.detach().float().cpu().numpy()
    o, i, kh, kw = w.shape
    columns = min(o, 8)
    rows = math.ceil(o / columns)
    fig = new_figure(0.8 + 0.75 * columns * max(kw, 3) / 5 + (1.0 if i != 3 else 0), 0.6 + 0.75 * rows * max(kh, 3) / 5)
    ax = fig.subplots()
    if i == 3:
        tiles = [_unit(k.transpose(1, 2, 0)) for k in w]
        ax.imshow(np.nan_to_num(mosaic(tiles, columns), nan=1.0), interpolation="nearest")
    else:
        tiles = [k / (float(np.abs(k).max()) or 1.0) for k in w.mean(1)]  # -1..1 keeps each sign visible
        im = ax.imshow(mosaic(tiles, columns), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, label="weight / max |weight|")
    ax.axis("off")
    ax.set_title(f"{name}: {o} filters of {i} x {kh} x {kw}", fontsize=10, **AS_TYPED)
    return save_png(fig, path)


def plot_responses(
    image: torch.Tensor,
    responses: Sequence[tuple[str, torch.Tensor]],
    path: Path,
    title: str,
    columns: int = GRID_COLUMNS,
) -> Path:
    """The input image, then one row per conv layer: the `columns` response maps with the
    most spatial contrast (standard deviation; flat maps say nothing), each scaled to its
    own range, so bright marks where the image matches that channel's filter best."""
    from cnnray.explain import strongest_channels

    fig = new_figure(1.25 * (columns + 1) + 1.5, 1.35 * (len(responses) + 1) + 0.4)
    grid = fig.add_gridspec(len(responses) + 1, 1)
    ax = fig.add_subplot(grid[0])
    img, cmap = display_image(image)
    ax.imshow(img, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=10, **AS_TYPED)
    ax.axis("off")
    for row, (name, maps) in enumerate(responses, start=1):
        c, h, w = maps.shape
        strongest = strongest_channels(maps, columns)  # the choice `cnnray serve`'s :explain makes
        tiles = [_unit(maps[j].cpu().numpy()) for j in strongest]
        ax = fig.add_subplot(grid[row])
        ax.imshow(mosaic(tiles, len(tiles)), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([(j + 0.5) * (w + 1) - 1 for j in range(len(tiles))], [f"ch {j}" for j in strongest], fontsize=7)
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        flat = float(maps.flatten(1).std(1).max()) == 0.0  # e.g. a zero-initialised residual branch
        ax.set_ylabel(f"{name}\n{c} x {h} x {w}" + ("\n(constant output)" if flat else ""),
                      rotation=0, ha="right", va="center", fontsize=8, **AS_TYPED)
    return save_png(fig, path)
