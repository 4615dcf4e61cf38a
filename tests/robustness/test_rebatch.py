"""Every DDP rank takes the same number of full batches whatever block sizes Ray Data yields."""

from __future__ import annotations

import pytest
import torch

from cnnray.data.rebatch import ShortStreamError, full_batches
from cnnray.data.stream_batches import StreamBatches

BATCH = 1024


def _uneven_pieces(total: int, sizes: list[int]):
    """Batches as iter_torch_batches yields them with a shuffle buffer over uneven blocks:
    short ones mid-stream (ray-project/ray#66085). Rows are numbered to check order."""
    start = 0
    for size in sizes:
        size = min(size, total - start)
        if size <= 0:
            break
        x = torch.arange(start, start + size, dtype=torch.float32).reshape(-1, 1, 1, 1)
        yield {"image": x, "label": torch.arange(start, start + size)}
        start += size


class _Shard:
    """A stand-in for a Ray Data shard: yields the given uneven batches."""

    def __init__(self, total: int, sizes: list[int]) -> None:
        self.total, self.sizes = total, sizes

    def iter_torch_batches(self, **kwargs):
        return _uneven_pieces(self.total, self.sizes)


def _uneven_sizes(total: int) -> list[int]:
    # 26 batches for 24 full batches' worth of rows (the issue's count): two short ones mid-stream.
    sizes = [BATCH] * 5 + [700] + [BATCH] * 10 + [500] + [BATCH] * 20
    assert sum(sizes) >= total
    return sizes


def test_stream_batches_full_and_equal_over_uneven_blocks():
    rows = 24 * BATCH + 300  # this rank's rows (n_train // world): 24 full batches
    shard = _Shard(rows, _uneven_sizes(rows))
    assert sum(1 for _ in shard.iter_torch_batches()) == 26  # what the old code trained on
    sb = StreamBatches(shard, rows=rows, batch_size=BATCH, drop_last=True, shuffle=True,
                       device=torch.device("cpu"), mean=[0.0], std=[1.0], sample_shape=(1, 1, 1))
    got = list(sb)
    assert len(got) == len(sb) == 24
    assert all(len(x) == BATCH and len(y) == BATCH for x, y in got)
    labels = torch.cat([y for _, y in got])
    assert torch.equal(labels, torch.arange(24 * BATCH))  # in order, none lost or repeated


@pytest.mark.parametrize("sizes", [[3, 5, 1, 7, 2, 9, 4], [17], [1] * 17, [4, 4, 4, 4, 1]])
def test_full_batches_recut(sizes):
    x = torch.arange(sum(sizes))
    pieces, start = [], 0
    for s in sizes:
        pieces.append((x[start : start + s], x[start : start + s]))
        start += s
    full = list(full_batches(iter(pieces), 4, steps=None, drop_last=True))
    assert [len(b) for b, _ in full] == [4] * (sum(sizes) // 4)
    tail = list(full_batches(iter(pieces), 4, steps=None, drop_last=False))
    assert torch.equal(torch.cat([b for b, _ in tail]), x)  # evaluation: every row once
    capped = list(full_batches(iter(pieces), 4, steps=2))
    assert len(capped) == 2


def test_short_stream_fails_instead_of_hanging():
    pieces = [(torch.zeros(3), torch.zeros(3))] * 2  # 6 rows: one full batch of 4
    with pytest.raises(ShortStreamError, match="1 full batches of 4, but every rank takes 2"):
        list(full_batches(iter(pieces), 4, steps=2))
