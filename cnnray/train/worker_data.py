"""From a TrainConfig to one worker's in-memory batches (glue between config and data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cnnray.config import ConfigError, TrainConfig
from cnnray.data import Dataset, ShardedBatches, load_dataset, split_train_val, take_subset
from cnnray.train.loop import use_channels_last

# Evaluation batches are larger than training ones: no activations are kept for backward.
EVAL_BATCH = 1024


@dataclass
class WorkerData:
    train: ShardedBatches
    val: ShardedBatches
    test: ShardedBatches | None  # this rank's shard of the test split, if cfg.test_at_end
    num_classes: int
    input_shape: tuple[int, int, int]
    info: dict[str, Any]  # what Serve needs to preprocess inputs exactly as in training


def resolve_augment(cfg: TrainConfig, ds: Dataset) -> str:
    """'auto': crop+flip for colour images (CIFAR practice); none for digits, where a
    flip changes the class and 3 epochs leave no time to profit from crops."""
    if cfg.augment != "auto":
        return cfg.augment
    return "crop_flip" if ds.input_shape[0] == 3 else "none"


def data_info(ds: Dataset) -> dict[str, Any]:
    return {
        "dataset": ds.name,
        "input_shape": list(ds.input_shape),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "classes": list(ds.classes),
    }


def load_for(cfg: TrainConfig) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)


def check_split_sizes(cfg: TrainConfig, ds: Dataset) -> None:
    """Refuse (ConfigError) what the split sizes alone make impossible: an empty validation
    or test split, or no full training batch per worker. The driver calls this before Ray
    starts; the workers call it too (a cluster run, whose data only the workers see).
    Sizes follow take_subset, split_train_val (round(N * val_fraction) held out) and
    shard_indices (N // workers training examples per worker)."""
    n = len(ds.train_labels) if cfg.subset is None else min(cfg.subset, len(ds.train_labels))
    n_val = int(round(n * cfg.val_fraction))
    n_train = n - n_val
    per_worker = cfg.batch_size_per_worker
    if n_val == 0:
        raise ConfigError(
            f"the validation split is empty ({n} training examples x val_fraction {cfg.val_fraction:g} "
            "rounds to 0): raise --val-fraction or --subset"
        )
    if n_train // cfg.workers < per_worker:
        raise ConfigError(
            f"{n_train} training examples over {cfg.workers} worker(s) give no full batch of {per_worker} "
            "per worker: use a larger --subset, fewer --workers or a smaller --batch-size"
        )
    n_test = len(ds.test_labels) if cfg.subset is None else min(cfg.subset, len(ds.test_labels))
    if cfg.test_at_end and n_test == 0:
        raise ConfigError(f"the {ds.name} dataset has no test examples to evaluate the best checkpoint on")


def prepare_worker_data(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> WorkerData:
    ds = load_for(cfg)
    check_split_sizes(cfg, ds)
    # Every rank draws the same subset and split (same seed), then keeps only its shard.
    x, y = take_subset(ds.train_images, ds.train_labels, cfg.subset, cfg.seed)
    tx, ty, vx, vy = split_train_val(x, y, cfg.val_fraction, cfg.seed)
    common = dict(
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        device=device,
        mean=ds.mean,
        std=ds.std,
        channels_last=use_channels_last(cfg.channels_last, device),
    )
    train = ShardedBatches(
        tx,
        ty,
        batch_size=cfg.batch_size_per_worker,
        shuffle=True,
        drop_last=True,
        augment=resolve_augment(cfg, ds),
        pad=cfg.crop_padding,
        **common,
    )
    # A rank may hold fewer validation (and test) batches than another, or none at all:
    # evaluation enters no collective per batch (see loop.validate).
    val = ShardedBatches(vx, vy, batch_size=EVAL_BATCH, shuffle=False, drop_last=False, **common)
    test = held_out_batches(cfg, device, rank, world, ds) if cfg.test_at_end else None
    return WorkerData(train, val, test, ds.num_classes, ds.input_shape, data_info(ds))


def held_out_batches(
    cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1, ds: Dataset | None = None
) -> ShardedBatches:
    """The held-out test split (or its subset), only for the final evaluation and report;
    with `world` > 1 this rank's shard of it. NCHW, as Serve and the report feed it."""
    ds = ds or load_for(cfg)
    x, y = take_subset(ds.test_images, ds.test_labels, cfg.subset, cfg.seed)
    return ShardedBatches(
        x, y, batch_size=EVAL_BATCH, rank=rank, world_size=world, shuffle=False, drop_last=False,
        device=device, mean=ds.mean, std=ds.std,
    )
