"""Full batches from a stream of batches of any size, so every DDP rank takes the same steps.

Ray Data's `iter_torch_batches` promises `batch_size` rows per batch, but with a local
shuffle buffer it yields short batches in mid-stream whenever a block boundary falls
badly (ray-project/ray#66085, reproduced on Ray 2.60: buffer = batch = 1024 over uneven
blocks gave 26 batches instead of 24), and `streaming_split(equal=True)` equalises the
rows of each rank, not its blocks. A rank that takes one more optimizer step than another
waits forever in DDP's all-reduce. `full_batches` re-cuts whatever arrives into batches
of exactly `batch_size` rows and stops after `steps` of them: a count every rank computes
the same way from numbers they all share (rows per rank // batch size), so no collective
is needed before the epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class ShortStreamError(RuntimeError):
    """A rank's stream ended before the steps every rank agreed to take (the others would
    wait for it in DDP's all-reduce forever, so the rank fails instead)."""


def full_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    steps: int | None = None,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) pieces of any row counts -> batches of exactly `batch_size` rows, in order.

    steps: stop after this many full batches (the pieces after them are not read); with
        `drop_last`, ShortStreamError when fewer arrive. None: as many as the stream holds.
    drop_last: drop the rows after the last full batch (training); else yield them as one
        short final batch (evaluation counts every row once).
    Memory: at most one batch of pending rows plus the piece being cut.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pending_x: list[torch.Tensor] = []
    pending_y: list[torch.Tensor] = []
    held = done = 0
    if steps is not None and steps <= 0:
        return
    for x, y in batches:
        start = 0
        while start < len(x):
            take = min(batch_size - held, len(x) - start)
            pending_x.append(x[start : start + take])
            pending_y.append(y[start : start + take])
            held += take
            start += take
            if held == batch_size:
                yield _cat(pending_x), _cat(pending_y)
                pending_x, pending_y, held = [], [], 0
                done += 1
                if steps is not None and done >= steps:
                    return
    if steps is not None and drop_last and done < steps:
        raise ShortStreamError(
            f"the data stream ended after {done} full batches of {batch_size}, "
            f"but every rank takes {steps} per epoch"
        )
    if held and not drop_last:
        yield _cat(pending_x), _cat(pending_y)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
