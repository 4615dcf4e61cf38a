"""Image folders: every format the decoder reads is trained on; unreadable files are named,
and the user chooses to stop (exit 2) or go on without them (--skip-unreadable)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cnnray.cli import main
from cnnray.data import DataError, load_dataset

# (extension, Pillow format, save options): what cameras, browsers and scanners leave in folders.
FORMATS = [(".png", "PNG", {}), (".JPG", "JPEG", {"quality": 95}), (".webp", "WEBP", {"lossless": True}),
           (".tif", "TIFF", {}), (".gif", "GIF", {}), (".bmp", "BMP", {}), (".ppm", "PPM", {})]


def _image(seed: int, fmt: str, options: dict) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format=fmt, **options)
    return buf.getvalue()


def write_folder(root, per_format: int = 2, extra: dict | None = None) -> int:
    """root/{train,test}/{cat,dog}/ with `per_format` files of every format; returns the count."""
    n = 0
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for ext, fmt, options in FORMATS:
                for i in range(per_format):
                    (d / f"{i}{ext}").write_bytes(_image(n, fmt, options))
                    n += 1
    for rel, data in (extra or {}).items():
        (root / rel).write_bytes(data)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: never an image
    return n


def test_every_readable_format_is_trained_on(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    total = write_folder(tmp_path / "imgs")
    ds = load_dataset("imagefolder", tmp_path / "imgs")
    assert len(ds.train_labels) + len(ds.test_labels) == total == 56  # not only the .png and .JPG
    assert ds.classes == ("cat", "dog")


BAD = {"train/cat/notes.txt": b"feed at 6\n", "train/dog/9.heic": b"\0\0\0\x18ftypheic....",
       "test/cat/cut.png": _image(99, "PNG", {})[:70]}


def test_unreadable_files_stop_the_load_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    total = write_folder(tmp_path / "imgs", extra=BAD)
    with pytest.raises(DataError) as info:
        load_dataset("imagefolder", tmp_path / "imgs")
    msg = str(info.value)
    assert "\n" not in msg and f"3 of {total + 3} files cannot be read as images" in msg
    for rel in BAD:
        assert rel in msg
    assert "--skip-unreadable" in msg


def test_skip_unreadable_goes_on_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    total = write_folder(tmp_path / "imgs", extra=BAD)
    for _ in range(2):  # the second load is a cache hit: the choice and the message apply again
        ds = load_dataset("imagefolder", tmp_path / "imgs", skip_unreadable=True)
        assert len(ds.train_labels) + len(ds.test_labels) == total
        err = capsys.readouterr().err
        assert f"3 of {total + 3} files cannot be read as images" in err and "train/cat/notes.txt" in err
        assert "training without them (--skip-unreadable)" in err
    with pytest.raises(DataError, match="3 of"):  # the cache does not hide them from a run without the flag
        load_dataset("imagefolder", tmp_path / "imgs")


def test_cli_exits_2_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    write_folder(tmp_path / "imgs", extra=BAD)
    code = main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--local-mode",
                 "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--skip-unreadable" in lines[0], captured.err
    assert "[cnnray] training" not in captured.out


def test_flag_and_yaml_field(tmp_path):
    import yaml

    from cnnray.cli import build_parser
    from cnnray.config import TrainConfig
    from cnnray.cli.flags import config_from_args

    assert not TrainConfig().skip_unreadable
    assert TrainConfig.from_dict(yaml.safe_load("skip_unreadable: true")).skip_unreadable
    args = build_parser().parse_args(["train", "--skip-unreadable"])
    assert config_from_args(args).skip_unreadable


def test_stream_scan_batch_names_every_unreadable_file():
    from cnnray.data.stream import _scan_batch

    good = _image(1, "WEBP", {"lossless": True})
    batch = {"path": np.array(["t/a/1.webp", "t/a/x.txt", "t/a/2.webp", "t/a/y.png"]),
             "bytes": np.array([good, b"text", good, b"\x89PNG\r\n\x1a\n"], dtype=object)}
    row = _scan_batch(batch, (12, 12), frozenset({"t/a/1.webp", "t/a/2.webp"}))
    assert [name for name, _ in json.loads(row["error"][0])] == ["t/a/x.txt", "t/a/y.png"]
    assert row["n"] == [2]  # both readable train images counted in the statistics


@pytest.mark.slow
def test_stream_scan_names_and_skips_like_memory(local_ray, tmp_path, monkeypatch):
    """The streamed loader (Ray Data) applies the same rule: named, or left out of every split."""
    from cnnray.config import TrainConfig
    from cnnray.data.stream import build_datasets, scan

    total = write_folder(tmp_path / "imgs", extra=BAD)
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), data_loader="ray-data")
    with pytest.raises(DataError, match=f"3 of {total + 3} files cannot be read as images"):
        scan(cfg.dataset, cfg.data_dir, tmp_path / "cache")
    info = scan(cfg.dataset, cfg.data_dir, tmp_path / "cache", skip_unreadable=True)  # from the scan's cache now
    memory = load_dataset("imagefolder", tmp_path / "imgs", skip_unreadable=True, cache_dir=tmp_path / "mcache")
    assert (info.n_train, info.n_test) == (len(memory.train_labels), len(memory.test_labels))
    assert len(info.skipped) == 3 and info.input_shape == tuple(memory.input_shape)
    test = build_datasets(info, cfg.data_dir, augment="none", pad=0, subset=cfg.subset, seed=cfg.seed,
                          val_fraction=cfg.val_fraction, splits=("test",), cache_dir=tmp_path / "cache")["test"]
    assert test.count() == info.n_test  # the unreadable test file is not decoded (it would raise)
