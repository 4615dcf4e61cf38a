"""Training metrics exported through Ray's metrics system (`ray.util.metrics`).

They appear on every node's Prometheus endpoint (and the Ray dashboard's Grafana) beside
Ray's own series, named `ray_cnnray_train_*` and labelled by `run` and `rank`. Each rank
exports its own shard's figures, so a slow or diverging worker stands out.
"""

from __future__ import annotations

from typing import Any

# (metric name, description with units)
GAUGES = (
    ("epoch", "last finished epoch"),
    ("loss", "mean training loss of the last epoch on this rank's shard"),
    ("accuracy", "training accuracy of the last epoch on this rank's shard (0-1)"),
    ("val_accuracy", "validation accuracy of the last epoch, all ranks (0-1)"),
    ("samples_per_second", "training samples per second of the last epoch on this rank"),
    ("epoch_seconds", "seconds of the last training epoch on this rank"),
)


class TrainMetrics:
    def __init__(self, run: str, rank: int) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = ("run", "rank")
        self._gauges = {
            name: Gauge(f"cnnray_train_{name}", description=desc, tag_keys=tags) for name, desc in GAUGES
        }
        self._samples = Counter("cnnray_train_samples", description="training samples processed", tag_keys=tags)
        self._tags = {"run": run, "rank": str(rank)}

    def record(self, epoch: int, local: Any, val_accuracy: float) -> None:
        """`local` is this rank's EpochStats (before the all-reduce)."""
        values = {
            "epoch": epoch,
            "loss": local.loss,
            "accuracy": local.accuracy,
            "val_accuracy": val_accuracy,
            "samples_per_second": local.count / max(local.seconds, 1e-9),
            "epoch_seconds": local.seconds,
        }
        for name, value in values.items():
            self._gauges[name].set(float(value), tags=self._tags)
        self._samples.inc(float(local.count), tags=self._tags)
