"""A worker's batches from its Ray Data shard: shuffled locally, re-cut into full batches
(cnnray.data.rebatch, so every DDP rank takes the same steps), normalised on the device.
The datasets themselves are built by cnnray.data.stream.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from cnnray.data.loader import normalization
from cnnray.data.rebatch import full_batches

# Bytes of decoded samples in each trainer's local shuffle buffer, which mixes the blocks
# of files Ray Data delivers: 2,730 CIFAR images (float32), 170 of 128 x 128 RGB; at most
# SHUFFLE_MAX_ROWS, at least one batch.
SHUFFLE_BYTES = 32 * 2**20
SHUFFLE_MAX_ROWS = 4096


class StreamBatches:
    """A worker's batches of (normalised float32 images, int64 labels) from a Ray Data
    shard (a DataIterator, or a Dataset in local mode), with ShardedBatches' interface:
    `len()` batches per epoch (`rows` is this rank's row count), `set_epoch`. Memory: the
    shuffle buffer (SHUFFLE_BYTES) and one prefetched batch."""

    def __init__(self, shard: Any, *, rows: int, batch_size: int, drop_last: bool, shuffle: bool,
                 device: torch.device, mean: Any, std: Any, sample_shape: Any, channels_last: bool = False) -> None:
        self.shard, self.rows, self.batch_size = shard, rows, batch_size
        self.sample_shape = tuple(sample_shape)  # C, H, W
        self.drop_last, self.shuffle, self.device, self.channels_last = drop_last, shuffle, device, channels_last
        self._scale, self._shift = normalization(mean, std, device)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return self.rows

    def __len__(self) -> int:
        n, b = self.rows, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Kept for ShardedBatches' interface: each epoch re-executes the stream, which
        reshuffles the files and draws new augmentations by itself."""
        self.epoch = epoch

    def _shuffle_rows(self) -> int:
        per_sample = 4 * int(np.prod(self.sample_shape))  # float32 after augmentation
        return max(self.batch_size, min(SHUFFLE_MAX_ROWS, SHUFFLE_BYTES // max(per_sample, 1)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.shard.iter_torch_batches(
            # drop_last here would drop a short tail after short mid-stream batches: rows a
            # full batch needs; full_batches drops the remainder itself.
            batch_size=self.batch_size, drop_last=False, device=self.device,
            local_shuffle_buffer_size=self._shuffle_rows() if self.shuffle else None,
        )
        # Re-cut into full batches, exactly len(self) of them in training: every rank takes
        # the same steps whatever block sizes Ray Data yields (cnnray.data.rebatch).
        pieces = ((b["image"], b["label"]) for b in batches)
        steps = len(self) if self.drop_last else None
        for x, y in full_batches(pieces, self.batch_size, steps, self.drop_last):
            if x.dtype == torch.uint8:  # not augmented: normalised here, as ShardedBatches does
                x = torch.addcmul(self._shift, x, self._scale)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
