"""What the report measures from a checkpoint: test-set predictions and conv responses.

    from cnnray.report.evaluate import evaluate_test_set, conv_responses
    model, meta = load_model(checkpoint_dir)
    preds = evaluate_test_set(model, cfg)         # the test split exactly as training evaluated it
    maps = conv_responses(model, preds.normalized(0, meta["data"]))

Everything runs in-process on the CPU: a report needs no Ray and no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnray.config import TrainConfig


@dataclass(frozen=True, eq=False)
class Predictions:
    """The evaluated test split: raw images for display, labels and the model's softmax."""

    images: torch.Tensor  # uint8 N x C x H x W, as stored (not normalised)
    labels: torch.Tensor  # int64 N
    probs: torch.Tensor  # float32 N x K, softmax of the logits

    @property
    def preds(self) -> torch.Tensor:
        return self.probs.argmax(1)

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).float().mean()) if len(self.labels) else 0.0

    def confusion(self) -> torch.Tensor:
        """K x K counts: row = true class, column = predicted class."""
        k = self.probs.shape[1]
        flat = self.labels * k + self.preds
        return torch.bincount(flat, minlength=k * k).view(k, k)

    def most_confident_mistakes(self, n: int) -> torch.Tensor:
        """Indices of up to n misclassified images, the most confidently wrong first."""
        wrong = (self.preds != self.labels).nonzero().flatten()
        confidence = self.probs[wrong, self.preds[wrong]]
        return wrong[confidence.argsort(descending=True)[:n]]

    def normalized(self, index: int, data_info: dict[str, Any]) -> torch.Tensor:
        """Image `index` as the model takes it: 1 x C x H x W float32, normalised as in training."""
        from cnnray.data import normalize

        return normalize(self.images[index : index + 1], data_info["mean"], data_info["std"])


def evaluate_test_set(model: nn.Module, cfg: TrainConfig, tta: str | None = None) -> Predictions:
    """Run `model` over the test split (cfg's subset and seed) on the CPU.

    The batches come from `cnnray.data.test_batches`, as the final test accuracy of a run
    takes them, and the logits average the same test-time augmentation views (`tta`,
    default the run's cfg.tta, which its checkpoints record), so the numbers here match
    result.json's test_accuracy and Serve's predictions.
    """
    from cnnray.data import eval_batch_size, load_dataset, take_subset, test_batches
    from cnnray.models.tta import tta_logits

    cpu = torch.device("cpu")
    ds = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    images, labels = take_subset(ds.test_images, ds.test_labels, cfg.subset, cfg.seed)
    batch = eval_batch_size(ds.input_shape, gpu=cfg.gpu, train_batch=cfg.batch_size_per_worker)
    model = model.to(cpu).eval()
    probs, seen = [], []
    with torch.no_grad():
        # Unshuffled, one rank: the subset's order.
        for x, y in test_batches(ds, subset=cfg.subset, seed=cfg.seed, batch_size=batch, device=cpu):
            probs.append(torch.softmax(tta_logits(model, x, cfg.tta if tta is None else tta), dim=1))
            seen.append(y)
    got = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.int64)
    if not torch.equal(got, labels):  # a bug here would silently mislabel every picture
        raise RuntimeError("held-out batches and the displayed test images are not in the same order")
    k = probs[0].shape[1] if probs else len(ds.classes)
    return Predictions(images=images, labels=labels, probs=torch.cat(probs) if probs else torch.zeros(0, k))


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every Conv2d with its module path, in definition order (`cnnray.explain.conv_layers`)."""
    from cnnray.explain import conv_layers as layers

    return layers(model)


def conv_responses(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(module path, C x H x W output) of every Conv2d for the single image x, in the order
    the layers run, before any norm or activation: the response maps, computed by the code
    that serves them (`cnnray.explain.conv_maps`, which also checks their shapes)."""
    from cnnray.explain import conv_maps

    return [(shape.name, maps) for shape, maps in conv_maps(model, x)]
