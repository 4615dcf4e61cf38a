"""TensorBoard event files from a run's per-epoch history (optional).

Written with `tensorboardX` (installed with Ray Tune) or, failing that, with
`torch.utils.tensorboard` (needs the `tensorboard` package); with neither, nothing is
written and the caller says so. View with `tensorboard --logdir <run>/tensorboard`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

EVENT_PREFIX = "events.out.tfevents."
# history key -> TensorBoard tag; grouped by prefix so train and val share a chart section
SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_accuracy": "accuracy/train",
    "val_accuracy": "accuracy/val",
    "lr": "lr",
    "samples_per_second": "speed/samples_per_second",
    "epoch_seconds": "speed/epoch_seconds",
}


def _writer_class():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard
        except ImportError:
            return None
    return SummaryWriter


def available() -> bool:
    return _writer_class() is not None


def write_events(
    history: Sequence[dict[str, Any]], log_dir: Path, *, test_accuracy: float | None = None
) -> Path | None:
    """Scalars of every epoch (step = epoch) into log_dir; returns log_dir, or None when no
    TensorBoard writer is installed. Earlier event files there are replaced, so rerunning
    the report does not show every curve twice."""
    writer_class = _writer_class()
    if writer_class is None:
        return None
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob(f"{EVENT_PREFIX}*"):
        old.unlink()
    writer = writer_class(str(log_dir))
    try:
        for h in history:
            for key, tag in SCALARS.items():
                if key in h:
                    writer.add_scalar(tag, float(h[key]), int(h["epoch"]))
        if test_accuracy is not None and history:
            writer.add_scalar("accuracy/test", float(test_accuracy), int(history[-1]["epoch"]))
    finally:
        writer.close()
    return log_dir
