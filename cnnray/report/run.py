"""The report of one training run: `<run>/report/report.html` and its PNGs.

    from cnnray.report.run import write_run_report
    write_run_report("runs/mnist-cnn")        # the folder `cnnray train --out` wrote

Reads `result.json` (history, config, best checkpoint), re-evaluates the best checkpoint
on the test split on this machine's CPU, and writes the page, the PNGs beside it, the
layer table as text and (when a writer is installed) TensorBoard event files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from cnnray.config import FEW_STEPS, ConfigError, TrainConfig
from cnnray.report import html, plots
from cnnray.files import RESULT_FILE

REPORT_DIR = "report"
PAGE = "report.html"
STILL_RISING = 0.001  # validation accuracy gained in the last epoch that counts as "still rising"
OVERFIT_GAP = 0.03  # train minus validation accuracy that, with a rising validation loss, is overfitting
FLAT = 0.005  # validation accuracies all within 0.5 points of each other: a flat curve, not a peak
LOSS_SAME = 0.01  # a loss that moved by under 1% of its value "stayed" (neither fell nor rose)
FAIR_GUIDE = 0.02  # test within 2 points of the best validation: validation was a fair guide


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: is this a {what}?") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def lr_schedule(history: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-step learning rate the run used, x in epochs: the rates the training loop
    recorded for every step (each epoch's `step_lrs`), then the rate after the last step.
    None for a history without them (a run from before cnnray recorded them)."""
    if not history or not all(h.get("step_lrs") for h in history):
        return None
    steps = len(history[0]["step_lrs"])
    lrs = [lr for h in history for lr in h["step_lrs"]] + [history[-1]["lr"]]
    return np.arange(len(lrs)) / steps, np.array(lrs)


def _pts(a: float) -> str:
    return f"{100 * a:.1f}"


def _loss_trend(first: float, last: float) -> str:
    """"fell", "rose" or "stayed": a change under LOSS_SAME of the first value is no change."""
    if abs(last - first) <= LOSS_SAME * abs(first):
        return "stayed"
    return "fell" if last < first else "rose"


def _validation_sentence(history: Sequence[dict[str, Any]]) -> str:
    """How validation accuracy went: one epoch, flat, still rising, levelled off, or peaked."""
    val = [h["val_accuracy"] for h in history]
    best = int(np.argmax(val))  # the first epoch with the highest accuracy
    if len(val) == 1:
        return f"One epoch only: validation accuracy {100 * val[0]:.2f}%."
    if max(val) - min(val) <= FLAT:
        return (f"Validation accuracy stayed between {100 * min(val):.2f}% and {100 * max(val):.2f}% over all "
                f"{len(val)} epochs: it did not improve.")
    if best == len(val) - 1 and val[-1] - val[-2] > STILL_RISING:
        return (f"Validation accuracy was still rising at the last epoch ({100 * val[-2]:.2f}% -> {100 * val[-1]:.2f}%): "
                "more epochs would probably help.")
    if best == len(val) - 1:
        return (f"Validation accuracy rose from {100 * val[0]:.2f}% to {100 * val[-1]:.2f}% and levelled off in the "
                f"last epoch (+{100 * (val[-1] - val[-2]):.2f} points).")
    return (f"Validation accuracy peaked at epoch {history[best]['epoch']} ({100 * val[best]:.2f}%) and ended "
            f"{_pts(val[best] - val[-1])} points lower, at {100 * val[-1]:.2f}%; the best checkpoint is the one "
            "evaluated on the test set.")


def _fit_sentence(history: Sequence[dict[str, Any]]) -> str:
    """Train against validation at the end. Overfitting is claimed only when both signs are
    there: training accuracy more than OVERFIT_GAP above validation, and the validation loss
    risen (by more than LOSS_SAME) from its lowest epoch while training went on."""
    last = history[-1]
    gap = last["train_accuracy"] - last["val_accuracy"]
    losses = [h["val_loss"] for h in history]
    low = int(np.argmin(losses))
    rose = low < len(losses) - 1 and _loss_trend(losses[low], losses[-1]) == "rose"
    since = (f"the validation loss rose from {losses[low]:.3f} (epoch {history[low]['epoch']}) to "
             f"{losses[-1]:.3f}" if rose else "the validation loss did not rise")
    if gap > OVERFIT_GAP:
        if rose:
            return f"Training accuracy ends {_pts(gap)} points above validation and {since}: the model overfits."
        return (f"Training accuracy ends {_pts(gap)} points above validation, but {since}: the gap alone does not "
                "show overfitting.")
    if gap < 0:
        return (f"Validation accuracy ends {_pts(-gap)} points above training accuracy: training accuracy is averaged "
                "over the epoch while the weights still change (and measured on augmented images when augmentation "
                "is on), so it lags behind.")
    if rose:
        return f"Training and validation accuracy end {_pts(gap)} points apart, but {since}: an early sign of overfitting."
    return f"Training and validation accuracy end {_pts(gap)} points apart and {since}: no sign of overfitting."


def _steps_sentence(history: Sequence[dict[str, Any]]) -> str | None:
    """The optimizer steps the run took (from the recorded per-step rates), and whether they
    were too few to learn (FEW_STEPS, the bar the training pre-flight warns at)."""
    steps = [len(h.get("step_lrs") or []) for h in history]
    if not all(steps):
        return None
    total = sum(steps)
    sentence = f"The run took {total:,} optimizer steps ({steps[-1]:,} per epoch)"
    if total < FEW_STEPS:
        return sentence + (f": fewer than {FEW_STEPS}, where runs often end far below what the model can learn, or "
                           "at chance; more epochs or a smaller batch give more steps.")
    return sentence + "."


def training_findings(history: Sequence[dict[str, Any]], result: dict[str, Any]) -> list[str]:
    """Plain statements read off the curves, so the page says how training went. Each one
    is chosen by the numbers it quotes (rising, flat, falling; see the thresholds above)."""
    if not history:
        return ["No epoch finished: the run recorded no history."]
    out = []
    bad = [h["epoch"] for h in history if not all(math.isfinite(h[k]) for k in ("train_loss", "val_loss"))]
    if bad:
        out.append(f"Training diverged: the loss is first not finite in epoch {bad[0]}.")
        history = [h for h in history if h["epoch"] < bad[0]]  # what follows reads finite epochs only
        if not history:
            return out
    out.append(_validation_sentence(history))
    out.append(_fit_sentence(history))
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    if len(history) > 1:
        trend = _loss_trend(first, last)
        out.append({"fell": f"Training loss fell from {first:.3f} to {last:.3f}.",
                    "rose": f"Training loss rose from {first:.3f} to {last:.3f}: training made the fit worse.",
                    "stayed": f"Training loss stayed near {first:.3f} ({first:.3f} -> {last:.3f})."}[trend])
    steps = _steps_sentence(history)
    if steps:
        out.append(steps)
    test, best_val = result.get("test_accuracy"), result.get("best_val_accuracy")
    if test is not None and best_val is not None:
        out.append(
            f"Test accuracy {100 * test:.2f}% vs best validation {100 * best_val:.2f}% "
            f"({100 * (test - best_val):+.2f} points): the validation split was a "
            f"{'fair' if abs(test - best_val) < FAIR_GUIDE else 'poor'} guide to unseen data."
        )
    speeds = [h["samples_per_second"] for h in history]
    out.append(
        f"Throughput {min(speeds):,.0f}-{max(speeds):,.0f} samples/s; {sum(h['epoch_seconds'] for h in history):.1f} s "
        f"of training epochs in all."
    )
    return out


def _header(result: dict[str, Any], cfg: TrainConfig, measured: float | None) -> str:
    test = result.get("test_accuracy", measured)
    items = []
    if test is not None:
        items.append((f"{100 * test:.2f}%", "test accuracy"))
    if "best_val_accuracy" in result:
        items.append((f"{100 * result['best_val_accuracy']:.2f}%", f"best validation (epoch {result.get('best_epoch', '?')})"))
    items.append((f"{len(result.get('history', []))} / {cfg.epochs}", "epochs run / planned"))
    items.append((f"{cfg.workers} {'GPU' if cfg.gpu else 'CPU'}", "workers"))
    if "samples_per_second" in result:
        items.append((f"{result['samples_per_second']:,.0f}", "samples / s"))
    if "train_seconds" in result:
        items.append((f"{result['train_seconds']:.0f} s", "training (trainer.fit)"))
    return html.cards(items)


CONFIG_KEYS = ("model", "dataset", "subset", "epochs", "workers", "batch_size", "lr", "lr_scaling", "optimizer",
               "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "augment",
               "norm", "hidden_sizes", "val_fraction", "seed", "data_dir")


def config_table(cfg: TrainConfig) -> str:
    d = cfg.to_dict()
    return html.table(("setting", "value"), [(k, d[k]) for k in CONFIG_KEYS if k in d])


def write_run_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    tensorboard: bool = True,
) -> Path:
    """Write the report of the run in `run_dir`; return the HTML page's path."""
    from cnnray.report import tensorboard as tb
    from cnnray.checkpoint import resolve_checkpoint
    from cnnray.report.sections import checkpoint_report

    from cnnray.paths import resolve_path

    run_dir = Path(resolve_path(run_dir, "run folder"))  # as typed where the command ran
    result = read_json(run_dir / RESULT_FILE, "cnnray train --out folder")
    cfg = TrainConfig.from_dict(result["config"])
    history = result.get("history", [])
    out = Path(resolve_path(out_dir, "--out", lasting=True)) if out_dir else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots.remove_old_pngs(out)

    sections = []
    findings = training_findings(history, result)
    if history:
        curves = plots.plot_curves(history, out / "curves.png", test_accuracy=result.get("test_accuracy"),
                                   best_epoch=result.get("best_epoch"), label_smoothing=cfg.label_smoothing)
        speed = plots.plot_schedule_and_speed(history, out / "lr_speed.png", lr_schedule(history))
        caption = ("Loss and accuracy per epoch. Validation is measured after each epoch on the held-out "
                   f"{cfg.val_fraction:.0%} of the training set"
                   + ("; the test line is the best checkpoint on the test set." if result.get("test_accuracy") is not None
                      else "."))
        if cfg.label_smoothing:
            caption += (f" The training loss includes label smoothing {cfg.label_smoothing:g}: it cannot reach 0 even "
                        "when every answer is right, while the validation loss (plain cross-entropy) can.")
        sections.append(html.Section("Training curves", html.figure(curves, caption)
                                     + html.figure(speed, "The learning-rate schedule the run followed, and training "
                                                   "throughput per epoch (all workers together).")))
    with ExitStack() as stack:
        ckpt = resolve_checkpoint(str(result["checkpoint"]), run_dir, stack)
        rep = checkpoint_report(ckpt, cfg, out, recorded_test_accuracy=result.get("test_accuracy"))
    sections += rep.sections
    findings += rep.findings
    sections.append(html.Section("Configuration", config_table(cfg)))

    if tensorboard:
        tb_dir = tb.write_events(history, run_dir / "tensorboard", test_accuracy=result.get("test_accuracy"))
        sections[-1] = html.Section("Configuration", sections[-1].body + html.paragraph(
            f"TensorBoard event files: tensorboard --logdir {tb_dir}" if tb_dir else
            "No TensorBoard event files: neither tensorboardX nor tensorboard is installed."))
    summary = html.Section("What happened", html.bullet_list(findings))
    title = f"{cfg.model} on {cfg.dataset}: {run_dir.name}"
    subtitle = f"cnnray training report · run folder {run_dir} · checkpoint {Path(str(result['checkpoint'])).name}"
    page = html.page(title, subtitle, _header(result, cfg, rep.test_accuracy), [summary, *sections])
    return html.write_page(page, out / PAGE)
