"""`--data-loader ray-data` (cnnray.data.stream) against the in-memory loader, on small
generated image folders and tarballs: the same split, pixels, statistics, augmentation
rule, checkpoint metadata and served predictions; bad inputs exit 2 with one line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnray.checkpoint import load_model
from cnnray.cli import main
from cnnray.config import ConfigError, TrainConfig
from cnnray.data import DataError, load_dataset, split_train_val, take_subset
from cnnray.data.loader import crop_flip, normalize
from cnnray.data.sources import list_source
from cnnray.data.stream import build_datasets, decode_batch, scan
from cnnray.train.worker_data import resolve_loader
from cnnray.train.epoch import evaluate

CLASSES = ("circle", "square")


def _image(cls: int, i: int, size: int, gray: bool) -> Image.Image:
    """A class-dependent pattern (bright left or right half) plus seeded noise."""
    rng = np.random.default_rng(cls * 10_000 + i)
    x = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    half = slice(0, size // 2) if cls == 0 else slice(size // 2, size)
    x[:, half] += 150
    img = Image.fromarray(x, "RGB")
    return img.convert("L") if gray else img


def make_folder(root: Path, *, train: int = 40, test: int = 12, size: int = 16, gray: bool = False,
                odd_size: bool = True) -> Path:
    """root/{train,test}/<class>/*.png|jpg; one train image of another size (resized, as
    the in-memory loader resizes), so the shape rule is exercised too."""
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                s = size + 4 if odd_size and split == "train" and c == 1 and i == 3 else size
                fmt = "PNG" if i % 2 else "JPEG"
                _image(c, i + (0 if split == "train" else 500), s, gray).save(d / f"{i:03d}.{fmt.lower()}", fmt)
    return root


def make_tarball(tree: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(tree, arcname="images")
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder") / "images")


@pytest.fixture(scope="module")
def tarball(folder, tmp_path_factory) -> Path:
    return make_tarball(folder, tmp_path_factory.mktemp("tar") / "images.tar.gz")


def _cfg(data_dir, loader: str, **kw) -> TrainConfig:
    base = dict(model="cnn", dataset="imagefolder", data_dir=str(data_dir), data_loader=loader, batch_size=16,
                epochs=1, lr=0.05, val_fraction=0.2, seed=3, schedule="constant")
    return TrainConfig(**{**base, **kw})


def _rows(ds) -> tuple[np.ndarray, np.ndarray]:
    rows = ds.take_all()
    x = np.stack([r["image"] for r in rows])
    y = np.array([r["label"] for r in rows])
    return x, y


def _sorted(x: np.ndarray, y: np.ndarray) -> list[tuple[int, bytes]]:
    return sorted((int(label), img.tobytes()) for img, label in zip(x, y))


@pytest.mark.parametrize("source", ["tree", "tarball", "file_uri"])
def test_stream_matches_memory_split_pixels_and_stats(local_ray, folder, tarball, tmp_path, source):
    data_dir = {"tree": str(folder), "tarball": str(tarball), "file_uri": f"file://{folder}"}[source]
    memory_dir = tarball if source == "tarball" else folder
    cfg = _cfg(data_dir, "ray-data", subset=60)
    info = scan(cfg.dataset, cfg.data_dir, tmp_path)
    ds = load_dataset("imagefolder", memory_dir, cache_dir=tmp_path / "npz")
    # Statistics, classes and shape exactly as the in-memory loader computes them.
    assert info.mean == ds.mean and info.std == ds.std
    assert info.classes == ds.classes and info.input_shape == ds.input_shape
    # The same split rule: the subset, then round(N * val_fraction) held out; same pixels.
    x, y = take_subset(ds.train_images, ds.train_labels, cfg.subset, cfg.seed)
    tx, ty, vx, vy = split_train_val(x, y, cfg.val_fraction, cfg.seed)
    sets = build_datasets(info, cfg.data_dir, augment="none", pad=cfg.crop_padding, subset=cfg.subset, seed=cfg.seed,
                          val_fraction=cfg.val_fraction, splits=("train", "val", "test"), cache_dir=tmp_path)
    for name, (ex, ey) in {"train": (tx, ty), "val": (vx, vy)}.items():
        got = _rows(sets[name])
        assert _sorted(*got) == _sorted(ex.numpy(), ey.numpy()), name
    ex, ey = take_subset(ds.test_images, ds.test_labels, cfg.subset, cfg.seed)
    assert _sorted(*_rows(sets["test"])) == _sorted(ex.numpy(), ey.numpy())


def test_gray_folder_streams_one_channel(local_ray, tmp_path):
    root = make_folder(tmp_path / "gray", train=10, test=4, gray=True)
    info = scan("imagefolder", str(root), tmp_path)
    ds = load_dataset("imagefolder", root, cache_dir=tmp_path / "npz")
    assert info.input_shape == ds.input_shape == (1, 16, 16)
    assert info.mean == ds.mean and info.std == ds.std


def test_stream_augmentation_is_the_memory_rule():
    """Every augmented image is one of the in-memory loader's crops/flips of its normalised
    image (zero-padded by 4 after normalisation), and both flips and several offsets occur."""
    x = np.random.default_rng(0).integers(0, 256, (64, 3, 8, 8), dtype=np.uint8)
    blobs = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img.transpose(1, 2, 0), "RGB").save(buf, "PNG")
        blobs.append(buf.getvalue())
    batch = {"path": np.array([f"/r/train/a/{i}.png" for i in range(64)], dtype=object),
             "bytes": np.array(blobs, dtype=object)}
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    out = decode_batch(batch, classes=["a"], shape=[3, 8, 8], augment="crop_flip", pad=4, mean=mean, std=std)
    assert out["image"].dtype == np.float32 and out["label"].tolist() == [0] * 64
    base = normalize(torch.from_numpy(x), mean, std)
    seen = set()
    for i in range(64):
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                if torch.equal(crop_flip(base[i:i + 1], torch.tensor([dy]), torch.tensor([dx]),
                                         torch.tensor([f]), 4)[0], torch.from_numpy(out["image"][i]))]
        assert hits, f"image {i} is no crop/flip of its normalised pixels"
        seen.add(hits[0])
    assert {f for _, _, f in seen} == {False, True} and len(seen) > 10


@pytest.mark.parametrize("source,path", [("tree", dict(workers=2, local_mode=False)),
                                         ("tarball", dict(workers=1, local_mode=True))])
def test_both_loaders_give_the_same_checkpoint_metadata_and_served_predictions(
        local_ray, folder, tarball, tmp_path, source, path):
    from cnnray.serve.preprocess import EncodedImage, batch_inputs
    from cnnray.train.driver import run_training
    from cnnray.train.worker_data import held_out_batches

    data_dir = tarball if source == "tarball" else folder
    metas, results = {}, {}
    for loader in ("memory", "ray-data"):
        cfg = _cfg(data_dir, loader, out=str(tmp_path / loader), **path)
        summary = run_training(cfg)
        _, meta = load_model(summary["checkpoint"])
        metas[loader], results[loader] = meta, summary
        assert summary["config"]["data_loader"] == loader
        assert [h["epoch"] for h in summary["history"]] == [1]
    assert metas["ray-data"]["data"] == metas["memory"]["data"]
    assert metas["ray-data"]["model"] == metas["memory"]["model"]
    # The workers' test accuracy of the ray-data checkpoint is the offline one, and the
    # offline one is what Serve's preprocessing of each test file gives.
    cfg = _cfg(data_dir, "memory")
    model, meta = load_model(results["ray-data"]["checkpoint"])
    offline = evaluate(model, held_out_batches(cfg, torch.device("cpu")), torch.device("cpu"))
    assert offline.accuracy == pytest.approx(results["ray-data"]["test_accuracy"])
    assert offline.count == results["ray-data"]["test_samples"] == 2 * 12
    # The driver's own test evaluation of a ray-data run (held_out_batches streams it) too.
    streamed = evaluate(model, held_out_batches(_cfg(data_dir, "ray-data"), torch.device("cpu")), torch.device("cpu"))
    assert (streamed.count, streamed.correct) == (offline.count, offline.correct)
    assert streamed.loss == pytest.approx(offline.loss, rel=1e-5)
    d = meta["data"]
    correct = 0
    with torch.no_grad():
        for c, name in enumerate(d["classes"]):
            for f in sorted((folder / "test" / name).iterdir()):
                x, errors = batch_inputs([EncodedImage(f.read_bytes(), 1 << 24)], d["input_shape"], d["mean"], d["std"])
                assert errors == [None]
                correct += int(model(x).argmax(1).item() == c)
    assert correct / offline.count == pytest.approx(offline.accuracy)


def test_auto_picks_memory_for_small_and_ray_data_for_large(folder, data_cache, monkeypatch):
    import cnnray.data.sources as sources

    assert resolve_loader(_cfg(folder, "auto")) == "memory"
    assert resolve_loader(TrainConfig(dataset="mnist")) == "memory"
    # 104 images x 3 x 16 x 16 = 80 KB decoded: over a quarter of 200 KB per worker.
    monkeypatch.setattr(sources, "memory_per_worker", lambda workers: 200_000 // workers)
    assert resolve_loader(_cfg(folder, "auto")) == "ray-data"
    with pytest.raises(ConfigError, match="ray-data"):
        resolve_loader(TrainConfig(dataset="mnist", data_loader="ray-data"))


def test_data_loader_is_a_typed_choice():
    with pytest.raises(ConfigError, match="data_loader"):
        TrainConfig(data_loader="stream")
    assert TrainConfig.from_dict({"data_loader": "ray-data"}).data_loader == "ray-data"


def _one_line_exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnray: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("case", ["corrupt", "truncated_tar", "empty", "missing_uri", "bad_scheme", "mnist"])
def test_bad_inputs_exit_2_with_one_line(local_ray, folder, tmp_path, capsys, case):
    if case == "corrupt":  # like the in-memory loader: the run is refused, naming the file
        bad = make_folder(tmp_path / "bad", train=10, test=4)
        (bad / "train" / "square" / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        data_dir, want = str(bad), "005.png"
    elif case == "truncated_tar":
        t = make_tarball(folder, tmp_path / "t.tar.gz")
        t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
        data_dir, want = str(t), "t.tar.gz"
    elif case == "empty":
        (tmp_path / "empty" / "train").mkdir(parents=True)
        data_dir, want = str(tmp_path / "empty"), "no train images"
    elif case == "missing_uri":
        data_dir, want = f"file://{tmp_path}/nowhere", "does not exist"
    elif case == "bad_scheme":
        data_dir, want = "nosuchfs://bucket/images", "nosuchfs://bucket/images"
    else:
        data_dir, want = None, "memory"
    argv = ["train", "--dataset", "mnist" if case == "mnist" else "imagefolder", "--data-loader", "ray-data",
            "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run")]
    argv += ["--data-dir", data_dir] if data_dir else []
    assert want in _one_line_exit_2(capsys, argv)


def test_scan_names_a_corrupt_file_directly(local_ray, tmp_path):
    bad = make_folder(tmp_path / "bad", train=10, test=4)
    (bad / "test" / "circle" / "002.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    with pytest.raises(DataError, match="002.jpg"):
        scan("imagefolder", str(bad), tmp_path)
    assert list_source(str(bad)).train[0].name.endswith("train/circle/000.jpeg")
    json.dumps(scan("imagefolder", str(make_folder(tmp_path / "ok", train=10, test=4)), tmp_path).to_dict())


def test_the_alternating_flip_is_refused_for_a_stream_and_keeps_auto_in_memory(folder, tmp_path):
    """crop_altflip flips each image the other way in odd epochs, which needs the image's
    identity across epochs: the in-memory loader's; a stream would silently not flip."""
    from cnnray.config import ConfigError

    with pytest.raises(ConfigError, match="crop_altflip"):
        resolve_loader(_cfg(folder, "ray-data", augment="crop_altflip"))
    assert resolve_loader(_cfg(folder, "auto", augment="crop_altflip")) == "memory"
