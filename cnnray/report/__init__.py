"""Reports of training runs and sweeps: PNGs and one self-contained HTML page.

    cnnray report runs/mnist-cnn              # a `cnnray train --out` folder
    cnnray report runs/sweep-mnist            # a `cnnray tune` folder (trials.csv, histories.json)

    from cnnray.report import write_report
    page = write_report("runs/mnist-cnn")     # -> runs/mnist-cnn/report/report.html

A run report shows loss and accuracy curves, the learning-rate schedule and throughput,
the confusion matrix and the most confidently misclassified test images (the best
checkpoint re-evaluated on the test split, in-process on the CPU), the first conv
layer's filters, the response maps of one test image at every conv layer, and the layer
table in the lecture's VGG19 format. A sweep report adds every trial's validation curve
on one chart and accuracy against learning rate, momentum and norm. TensorBoard event
files go to `<dir>/tensorboard/` when tensorboardX or tensorboard is installed.
Importing this package does no work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cnnray.config import ConfigError


def write_report(path: str | Path, out_dir: str | Path | None = None, *, tensorboard: bool = True) -> Path:
    """Write the report of the run or sweep folder `path` (into `out_dir`, default
    `<path>/report/`) and return the HTML page's path.

    Raises ConfigError when `path` is neither a run folder (result.json) nor a sweep folder
    (trials.csv / trials.parquet / histories.json); CheckpointError for an unreadable best
    checkpoint. Test data that cannot be read leaves a note on the page instead.
    """
    from cnnray.paths import PathError, check_lasting, resolve_path
    from cnnray.report.run import REPORT_DIR, RESULT_FILE, write_run_report
    from cnnray.report.sweep import is_sweep_dir, write_sweep_report

    try:  # paths as typed where the command ran; the report must not go where Ray deletes it
        p = Path(resolve_path(path, "report folder"))
        out_dir = resolve_path(out_dir, "--out", lasting=True) if out_dir is not None else None
        if out_dir is None:
            check_lasting(str(p / REPORT_DIR), "report folder")
    except PathError as e:
        raise ConfigError(str(e)) from None
    if not p.is_dir():
        raise ConfigError(f"{p} is not a directory: give a run folder (cnnray train --out) or a sweep folder")
    if (p / RESULT_FILE).is_file():
        return write_run_report(p, out_dir, tensorboard=tensorboard)
    if is_sweep_dir(p):
        return write_sweep_report(p, out_dir, tensorboard=tensorboard)
    raise ConfigError(
        f"{p} holds neither {RESULT_FILE} (a training run) nor trials.csv/histories.json (a sweep): "
        "nothing to report (did the run finish?)"
    )


def report_after_training(run_dir: str | Path, echo: Callable[[str], None] = print) -> Path | None:
    """The report at the end of `cnnray train`: write it and say where. A failure is one
    warning line, never an error: the run itself has finished and its result.json stands."""
    try:
        page = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 (any failure here must not fail a finished run)
        echo(f"[cnnray] report not written: {type(e).__name__}: {e} (retry: cnnray report {run_dir})")
        return None
    echo(f"[cnnray] report {page}")
    return page


__all__ = ["report_after_training", "write_report"]
