"""The run's best checkpoint: which one it is, and its accuracy on the test split.

The workers usually test the best epoch themselves at the end (loop.run_epoch); when they
did not (a resume past the best epoch, a Tune trial), `evaluate_on_test` tests the
checkpoint as a Ray task with a worker's resources, or in this process without Ray.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from cnnray.config import TrainConfig


def _evaluate_checkpoint(checkpoint: Any, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Runs as a Ray task next to the data: test-set accuracy of one checkpoint."""
    import torch

    from cnnray.checkpoint import checkpoint_tta, load_model
    from cnnray.train.epoch import evaluate
    from cnnray.train.worker_data import held_out_batches

    cfg = TrainConfig.from_dict(cfg_dict)
    device = torch.device("cuda" if cfg.gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker or 1)
    with checkpoint.as_directory() as d:
        model, meta = load_model(d, map_location=device)
    # The checkpoint's test-time augmentation, as the workers' own test and Serve use it.
    stats = evaluate(model, held_out_batches(cfg, device), device, checkpoint_tta(meta))
    return {"test_accuracy": stats.accuracy, "test_loss": stats.loss, "test_samples": stats.count}


def evaluate_on_test(checkpoint: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Test-set accuracy of a Ray Train checkpoint: a Ray task with a worker's resources,
    or in this process when no Ray runs here (local mode, which imports no Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return _evaluate_checkpoint(checkpoint, cfg.to_dict())
    resources = {"num_cpus": cfg.cpus_per_worker or 1, "num_gpus": 1 if cfg.gpu else 0}
    return ray.get(ray.remote(**resources)(_evaluate_checkpoint).remote(checkpoint, cfg.to_dict()))


def pick_best(
    best_checkpoints: Sequence[tuple[Any, dict[str, Any]]], last_metrics: dict[str, Any]
) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """(checkpoint, its metrics, test metrics or None): the epoch the workers named best
    (the first with the highest validation accuracy), else the best Ray kept. The test
    metrics come from the last report when the workers tested that same epoch."""
    named = [cm for cm in best_checkpoints if cm[1].get("epoch") == last_metrics.get("best_epoch")]
    ckpt, metrics = named[0] if named else max(best_checkpoints, key=lambda cm: cm[1]["val_accuracy"])
    test = None
    if "test_accuracy" in last_metrics and last_metrics.get("test_epoch") == metrics.get("epoch"):
        test = {k: last_metrics[k] for k in ("test_accuracy", "test_loss", "test_samples")}
    return ckpt, metrics, test
