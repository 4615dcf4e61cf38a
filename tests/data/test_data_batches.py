"""Tests of cnnray.data: splits, subsets and ShardedBatches (shards, normalisation,
augmentation, determinism) (CPU only).

Every file is written here, in tmp_path, in the canonical formats (tests/helpers/data_files.py);
downloads go to a local http.server (tests/data/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from cnnray.data import ShardedBatches, split_train_val, take_subset



@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    # Default data and cache dirs go to tmp_path, never to the real ~/.cache/cnnray.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "home"))


def indexed(n: int, c: int = 1, hw: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels all equal their index (n <= 256), labels = index."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, c, hw, hw).contiguous()
    return x, torch.arange(n)


def test_split_train_val_is_seeded_and_disjoint():
    x, y = indexed(100)
    tx, ty, vx, vy = split_train_val(x, y, 0.2, seed=1)
    assert len(vy) == 20 and len(ty) == 80
    assert sorted(ty.tolist() + vy.tolist()) == list(range(100))
    assert torch.equal(vx[:, 0, 0, 0].long(), vy)  # images follow their labels
    again = split_train_val(x, y, 0.2, seed=1)
    assert torch.equal(again[3], vy) and not torch.equal(split_train_val(x, y, 0.2, seed=2)[3], vy)
    tx, ty, vx, vy = split_train_val(x, y, 0.0, seed=1)
    assert torch.equal(ty, y) and vx.shape == (0, 1, 4, 4) and vy.shape == (0,)
    with pytest.raises(ValueError):
        split_train_val(x, y, 1.0, seed=1)


def test_take_subset():
    x, y = indexed(50)
    assert take_subset(x, y, None, seed=0)[1] is y and take_subset(x, y, 50, seed=0)[1] is y
    sx, sy = take_subset(x, y, 7, seed=3)
    assert len(sy) == 7 and len(set(sy.tolist())) == 7 and torch.equal(sx[:, 0, 0, 0].long(), sy)
    assert torch.equal(take_subset(x, y, 7, seed=3)[1], sy)
    assert not torch.equal(take_subset(x, y, 7, seed=4)[1], sy)


# ---------------------------------------------------------------- ShardedBatches


def batches(x, y, **kw):
    c = x.shape[1]
    defaults = {"batch_size": 5, "shuffle": True, "drop_last": True}
    kw = {**defaults, "mean": (0.0,) * c, "std": (1.0,) * c, **kw}
    return ShardedBatches(x, y, **kw)


def labels_of(loader) -> list[int]:
    return [v for _, yb in loader for v in yb.tolist()]


def test_train_shards_equal_and_disjoint():
    x, y = indexed(103)
    loaders = [batches(x, y, rank=r, world_size=4, seed=7) for r in range(4)]
    assert {lo.num_samples for lo in loaders} == {25} and {len(lo) for lo in loaders} == {5}
    seen = [set(labels_of(lo)) for lo in loaders]
    assert sum(len(s) for s in seen) == 100 and len(set.union(*seen)) == 100
    assert [set(labels_of(batches(x, y, rank=r, world_size=4, seed=7))) for r in range(4)] == seen


def test_eval_shards_cover_everything_once():
    x, y = indexed(103)
    kw = {"world_size": 3, "shuffle": False, "drop_last": False, "batch_size": 8}
    loaders = [batches(x, y, rank=r, **kw) for r in range(3)]
    assert [lo.num_samples for lo in loaders] == [35, 34, 34] and len(loaders[0]) == 5
    assert sorted(v for lo in loaders for v in labels_of(lo)) == list(range(103))
    lo = batches(*indexed(10), batch_size=4, shuffle=False, drop_last=False)
    sizes = [len(yb) for _, yb in lo]
    assert sizes == [4, 4, 2]


def test_normalisation_and_dtypes():
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(10)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    lo = ShardedBatches(x, y, batch_size=4, shuffle=False, drop_last=False, mean=mean, std=std)
    xb, yb = next(iter(lo))
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape == (4, 3, 4, 4)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (x[:4].float() / 255 - m) / s
    assert torch.allclose(xb, expected, atol=1e-6) and torch.equal(yb, y[:4])


def test_crop_takes_shifted_windows_of_padded_images():
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    plain = batches(x, torch.arange(16), batch_size=16, shuffle=False, augment="none")
    crop = batches(x, torch.arange(16), batch_size=16, shuffle=False, augment="crop", pad=2)
    (ref, _), (out, _) = next(iter(plain)), next(iter(crop))
    assert out.shape == ref.shape and out.dtype == torch.float32 and not torch.equal(out, ref)
    padded = torch.nn.functional.pad(ref, (2, 2, 2, 2))
    for i in range(16):  # each output is one 8x8 window of its zero-padded image
        windows = [padded[i, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_flips_some_samples():
    x = torch.randint(0, 256, (64, 1, 5, 5), dtype=torch.uint8)
    ref, _ = next(iter(batches(x, torch.arange(64), batch_size=64, shuffle=False)))
    kw = {"batch_size": 64, "shuffle": False, "augment": "crop_flip", "pad": 0}
    out, _ = next(iter(batches(x, torch.arange(64), **kw)))
    same = [torch.equal(out[i], ref[i]) for i in range(64)]
    flipped = [torch.equal(out[i], ref[i].flip(-1)) for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped)) and 10 < sum(flipped) < 54


def test_determinism_epochs_and_ranks():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(40)

    def run(epoch, rank=0, seed=0):
        lo = batches(x, y, batch_size=5, augment="crop_flip", seed=seed, rank=rank, world_size=2)
        lo.set_epoch(epoch)
        return list(lo)

    a, b = run(3), run(3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other = run(4)
    def seen(run_batches):
        return sorted(torch.cat([yb for _, yb in run_batches]).tolist())

    assert seen(other) == seen(a)  # a new order of the same shard
    assert not all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, other))
    assert not torch.equal(run(3, seed=1)[0][0], a[0][0])


def test_channels_last_and_validation():
    x = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    kw = {"batch_size": 4, "shuffle": False, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    cl, _ = next(iter(batches(x, torch.arange(8), channels_last=True, **kw)))
    ref, _ = next(iter(batches(x, torch.arange(8), **kw)))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, ref)
    for bad in ({"augment": "mixup"}, {"rank": 2, "world_size": 2}, {"mean": (0.5,)}):
        with pytest.raises(ValueError):
            batches(x, torch.arange(8), **{**kw, **bad})
