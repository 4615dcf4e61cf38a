"""`ShardedBatches`: one worker's shard of an in-memory dataset, batched with tensor ops only.

The shard is moved to the device once, as uint8 (a quarter of float32's memory). Each
batch is then one gather, one fused normalisation (`addcmul`) and, when augmenting, one
more gather that crops and flips every sample at once (as in airbench), so no Python
runs per sample. All randomness comes from torch.Generators seeded from
(seed, epoch, rank), so a run is reproducible and every rank sees a different stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cnnray.data.base import Dataset, take_subset

AUGMENTS = ("none", "crop", "crop_flip", "crop_altflip")

# Stream ids mixed into the seed, so the shard split, the per-epoch order and the
# augmentation draws never share random numbers.
_SHARD, _ORDER, _AUGMENT, _ALTFLIP = 0, 1, 2, 3


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by hashing `parts` (SeedSequence), so that nearby tuples such
    as (seed, epoch=1, rank=0) and (seed, epoch=0, rank=1) give unrelated streams."""
    entropy = [int(p) % (1 << 64) for p in parts]  # SeedSequence wants non-negative ints
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)  # 63 bits: a valid manual_seed


def shard_indices(
    n: int, rank: int, world_size: int, *, shuffle: bool, drop_last: bool, seed: int
) -> torch.Tensor:
    """Indices of `rank`'s shard of n samples (CPU, int64).

    drop_last=True (training): every rank gets exactly n // world_size samples, disjoint,
    so DDP ranks run the same number of steps; with shuffle the samples left over are a
    random few, chosen by `seed` (identical on every rank). drop_last=False (evaluation):
    rank r takes positions r::world_size, so every sample is seen exactly once.
    """
    order = torch.randperm(n, generator=_generator(seed, _SHARD)) if shuffle else torch.arange(n)
    shard = order[rank::world_size]
    # order[r::w][:n//w] over all r covers exactly order[:n//w * w], disjointly.
    return shard[: n // world_size] if drop_last else shard


def normalization(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with (x / 255 - mean) / std == x * scale + shift: one addcmul a batch."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (255.0 * std_t)).to(device), (-mean_t / std_t).to(device)


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """N x C x H x W uint8 -> float32 normalised exactly as training batches are (Serve uses it)."""
    scale, shift = normalization(mean, std, images_uint8.device)
    return torch.addcmul(shift, images_uint8, scale)


def augment_offsets(
    n: int, pad: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flips) for n samples: crop offsets uniform in [0, 2 * pad], flips with p=0.5.
    The one rule for the in-memory and the streamed (cnnray.data.stream) loaders."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    return dy, dx, torch.rand(n, generator=generator) < 0.5


def crop_flip(
    x: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor | None,
    pad: int,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random crops of normalised B x C x H x W images (offsets dy, dx in [0, 2 * pad]) and
    optional flips, in one gather; `rows`/`cols` are arange(H)/arange(W) on x's device
    (made here when not given).

    Padding is applied after normalisation, so the zero border is the dataset's mean
    colour rather than black: it adds no artificial edge the first conv could key on.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device) if rows is None else rows
    cols0 = torch.arange(w, device=x.device) if cols is None else cols
    p = pad
    padded = F.pad(x, (p, p, p, p)) if p else x
    src_rows = dy[:, None] + rows  # B x H: source row of each output row
    src_cols = cols0.expand(b, w)
    if flip is not None:
        # Flipping is reading the columns backwards: choose per sample with torch.where
        # on the (small) index tensor instead of on the images.
        src_cols = torch.where(flip[:, None], cols0.flip(0).expand(b, w), src_cols)
    src_cols = src_cols + dx[:, None]  # B x W
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, src_rows[:, None, :, None], src_cols[:, None, None, :]]


class ShardedBatches:
    """Batches of (normalised float32 images, int64 labels) from one rank's shard, on `device`.

    `len()` is the number of batches per epoch; call `set_epoch(e)` before each epoch to
    get that epoch's order and augmentation (the same for the same seed, epoch and rank).
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        mean: Sequence[float],
        std: Sequence[float],
        augment: str = "none",
        pad: int = 4,
        channels_last: bool = False,
    ) -> None:
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
            raise ValueError("images_uint8 must be a uint8 N x C x H x W tensor")
        if labels.ndim != 1 or len(labels) != len(images_uint8):
            raise ValueError(f"{len(images_uint8)} images, labels of shape {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        channels = images_uint8.shape[1]
        if not len(mean) == len(std) == channels:
            raise ValueError(f"mean and std need {channels} values (one per channel)")

        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.augment, self.pad = seed, augment, pad
        self.channels_last = channels_last
        self.device = torch.device(device)
        self.epoch = 0

        idx = shard_indices(
            len(labels), rank, world_size, shuffle=shuffle, drop_last=drop_last, seed=seed
        )
        # Select on the source device, then one copy of the shard (uint8) to the target.
        self._images = images_uint8[idx.to(images_uint8.device)].to(self.device).contiguous()
        self._labels = labels[idx.to(labels.device)].to(self.device, torch.int64)
        self._scale, self._shift = normalization(mean, std, self.device)
        h, w = self._images.shape[2:]
        self._rows = torch.arange(h, device=self.device)
        self._cols = torch.arange(w, device=self.device)

    @property
    def num_samples(self) -> int:
        """Samples in this rank's shard (per epoch, before dropping a last partial batch)."""
        return len(self._labels)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def first_images(self, n: int) -> torch.Tensor:
        """The shard's first n images (fewer if it holds fewer), normalised, unaugmented:
        min(n, num_samples) x C x H x W float32 on the device (data-dependent inits)."""
        return torch.addcmul(self._shift, self._images[:n], self._scale)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation the next iteration uses."""
        self.epoch = epoch

    def _crop_flip(
        self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor | None
    ) -> torch.Tensor:
        return crop_flip(x, dy, dx, flip, self.pad, self._rows, self._cols)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        order = None
        if self.shuffle:
            g = _generator(self.seed, _ORDER, self.epoch, self.rank)
            order = torch.randperm(n, generator=g).to(self.device)
        if self.augment != "none":
            # Draw the whole epoch's offsets at once: one small host-to-device copy.
            g = _generator(self.seed, _AUGMENT, self.epoch, self.rank)
            dy, dx, flips = (t.to(self.device) for t in augment_offsets(n, self.pad, g))
            if self.augment == "crop_altflip":
                # Jordan 2024 (arXiv 2404.00498, section 3.6), "alternating flip": a random
                # flip per image in even epochs, the opposite one in odd epochs, so every
                # pair of epochs shows each image both ways (not a 1/4 chance of one way).
                per_image = torch.rand(n, generator=_generator(self.seed, _ALTFLIP, self.rank)) < 0.5
                per_image = per_image.to(self.device) ^ bool(self.epoch % 2)
                flips = per_image if order is None else per_image[order]  # by batch position
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            sl = slice(start, min(start + self.batch_size, n))
            if order is None:
                xb, yb = self._images[sl], self._labels[sl]
            else:
                # index_select copies whole rows; `images[idx]` runs the general gather
                # kernel per element: ~8x slower for a uint8 MNIST batch on CPU (~90 us a
                # step, 1-2% of a training step on 2 cores).
                idx = order[sl]
                xb, yb = self._images.index_select(0, idx), self._labels.index_select(0, idx)
            x = torch.addcmul(self._shift, xb, self._scale)  # uint8 -> float32, normalised
            if self.augment != "none":
                flip = flips[sl] if self.augment in ("crop_flip", "crop_altflip") else None
                x = self._crop_flip(x, dy[sl], dx[sl], flip)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, yb


# Evaluation batches. On a GPU larger than training ones (no activations are kept for
# backward): up to EVAL_BATCH images, and at most as many input values as EVAL_BATCH CIFAR
# images, so that 128 x 128 or 224 x 224 images do not multiply activation memory by 16 or
# 49 (a 1,024-batch of 128 x 128 images took ~2 GB in tutorial_cnn); never fewer than a
# training batch, whose activations the worker holds anyway. On a CPU at most
# EVAL_BATCH_CPU images: there a batch's activations should stay in the caches, and
# 1,024-image batches ran 1.7-3x slower per image than 128-image ones (2-core AMX CI
# machine, fp32 channels-last: the lecture cnn 58 against 19 us, airbench 1,008 against
# 565 us, resnet18 9.8 against 4.3 ms; 32-128 were within 5% of each other).
EVAL_BATCH = 1024
EVAL_BATCH_CPU = 128
EVAL_VALUES = EVAL_BATCH * 3 * 32 * 32


def eval_batch_size(input_shape: Sequence[int], *, gpu: bool, train_batch: int) -> int:
    """Images per evaluation batch for images of `input_shape` (C, H, W) on a GPU (`gpu`)
    or a CPU; `train_batch`: the training batch per worker (a GPU floor)."""
    per_image = max(1, int(np.prod(input_shape)))
    fit = max(1, EVAL_VALUES // per_image)
    if not gpu:
        return min(EVAL_BATCH_CPU, fit)
    return max(train_batch, min(EVAL_BATCH, fit))


def test_batches(ds: Dataset, *, subset: int | None, seed: int, batch_size: int, device: torch.device,
                 rank: int = 0, world: int = 1) -> ShardedBatches:
    """The held-out test split of `ds` (its `take_subset(subset, seed)`), in order, this
    rank's shard of it: what the final test of a run and the report evaluate."""
    x, y = take_subset(ds.test_images, ds.test_labels, subset, seed)
    return ShardedBatches(x, y, batch_size=batch_size, rank=rank, world_size=world, shuffle=False,
                          drop_last=False, device=device, mean=ds.mean, std=ds.std)
