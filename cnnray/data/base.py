"""Core types of the data layer: the error, the in-memory `Dataset`, and seeded splits.

Nothing here touches the disk or the network. The readers in idx.py, cifar.py and
imagefolder.py build a `Dataset`; loader.py turns its tensors into batches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnray.errors import DataError  # noqa: F401  (cnnray.data.DataError)

# Every name `load_dataset` accepts, in the order the CLI lists them.
DATASETS = ("mnist", "fashion_mnist", "cifar10", "imagefolder")


def data_home() -> Path:
    """`$CNNRAY_DATA`, or `~/.cache/cnnray`: the parent of every default data and cache dir."""
    return Path(os.environ.get("CNNRAY_DATA") or "~/.cache/cnnray").expanduser()


def default_data_dir(name: str) -> Path:
    """Where `load_dataset(name)` looks (and downloads) when no data_dir is given."""
    return data_home() / name


def default_cache_dir() -> Path:
    """Where decoded uint8 arrays are cached when no cache_dir is given."""
    return data_home() / "cache"


# eq=False: the generated __eq__ would compare tensors, whose truth value is ambiguous.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory: uint8 images N x C x H x W, int64 labels, per-channel stats."""

    name: str
    train_images: torch.Tensor  # uint8, N x C x H x W, contiguous
    train_labels: torch.Tensor  # int64, N
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Invariants the loaders and models rely on; a violation is a bug in a reader.
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != torch.uint8 or x.ndim != 4 or not x.is_contiguous():
                raise ValueError(f"{split}_images must be contiguous uint8 N x C x H x W")
            if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x):
                raise ValueError(f"{split}_labels must be int64 with one label per image")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError("train and test images must have the same C x H x W")
        if not len(self.mean) == len(self.std) == self.train_images.shape[1]:
            raise ValueError("mean and std need one value per channel")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image, as models take it."""
        c, h, w = self.train_images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def dataset_from_arrays(
    name: str,
    arrays: Mapping[str, np.ndarray],
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
) -> Dataset:
    """Wrap decoded numpy arrays (train_x, train_y, test_x, test_y) as a `Dataset`."""

    # "W": torch.from_numpy warns on read-only arrays (np.frombuffer's), so copy those.
    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(a, np.uint8, ["C", "W"]))

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(a, np.int64, ["C", "W"]))

    return Dataset(
        name=name,
        train_images=images(arrays["train_x"]),
        train_labels=labels(arrays["train_y"]),
        test_images=images(arrays["test_x"]),
        test_labels=labels(arrays["test_y"]),
        classes=tuple(str(c) for c in classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def _check_pair(images: torch.Tensor, labels: torch.Tensor) -> int:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return int(labels.shape[0])


def _select(
    images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # Sorted indices keep the selection in the source order: a pure subset, no reshuffle.
    idx = idx.sort().values
    return images[idx.to(images.device)], labels[idx.to(labels.device)]


def split_train_val(
    images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hold out round(N * val_fraction) random samples: (train_x, train_y, val_x, val_y).

    The same (N, val_fraction, seed) always gives the same split, on every worker.
    """
    n = _check_pair(images, labels)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_x, train_y = _select(images, labels, perm[n_val:])
    val_x, val_y = _select(images, labels, perm[:n_val])
    return train_x, train_y, val_x, val_y


def take_subset(
    images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of n samples, for smoke runs; None or n >= N returns the inputs."""
    total = _check_pair(images, labels)
    if n is None or n >= total:
        return images, labels
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return _select(images, labels, perm[:n])
