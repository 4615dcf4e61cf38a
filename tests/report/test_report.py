"""`cnnray report`: every file, PNGs that open and are not blank, a self-contained page.

Fast tests build runs directly: a randomly initialised model saved with save_checkpoint,
a synthetic result.json, and a tiny image-folder dataset this module writes (3 classes
of bars), for several model kinds. One slow test reports on a real 2-worker MNIST run.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnray.checkpoint import save_checkpoint
from cnnray.config import TrainConfig
from cnnray.models import build_model, count_parameters
from cnnray.report import write_report
from cnnray.report.evaluate import Predictions, conv_layers, conv_responses
from tests.helpers.report import CLASSES, make_image_folder, make_run, pattern  # noqa: F401

RUN_PNGS = ("curves.png", "lr_speed.png", "confusion.png", "mistakes.png")
CONV_PNGS = ("filters.png", "responses.png")

# (model, channels, side): "small size" keeps resnet18's forward passes cheap.
MODEL_CASES = [("cnn", 1, 28), ("mlp", 1, 28), ("tutorial_cnn", 3, 32), ("resnet18", 3, 16)]


# --- synthetic data and runs ------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory, data_cache) -> dict[tuple[int, int], Path]:
    """One tiny image-folder dataset per (channels, side) the model cases need."""
    root = tmp_path_factory.mktemp("folders")
    return {(c, s): make_image_folder(root / f"c{c}s{s}", c, s) for _, c, s in MODEL_CASES}


# --- checks -----------------------------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.hrefs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])


def assert_png_not_blank(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= 100, (path, im.size)
        rgb = np.asarray(im.convert("RGB"))
    pixels = rgb.astype(np.float64)
    dark = (pixels.mean(-1) < 128).mean()
    assert pixels.std() > 10 and dark > 0.002, f"{path.name} looks blank (std {pixels.std():.1f}, dark {dark:.4f})"
    # Distinct colours, each packed into one integer: np.unique(axis=0) on the (pixels, 3)
    # rows sorts them as records, ~10 s per figure on the CI machine; this is one 1-D sort.
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    assert len(np.unique(packed)) > 20, f"{path.name} has almost no colours"


def assert_self_contained(page: Path, pngs: list[str]) -> str:
    text = page.read_text()
    refs = _Refs()
    refs.feed(text)
    assert not refs.tags & {"script", "link", "iframe"}, "the page must not load anything"
    assert all(src.startswith("data:image/png;base64,") for src in refs.imgs)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in refs.imgs}
    for name in pngs:
        assert name in refs.hrefs, f"page does not link {name}"
        assert (page.parent / name).read_bytes() in embedded, f"page does not embed {name}"
    assert not [h for h in refs.hrefs if "://" in h], "no external links"
    return text


# --- tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name,channels,side", MODEL_CASES)
def test_run_report_writes_every_file(folders, tmp_path, model_name, channels, side):
    run = tmp_path / "run"
    ckpt = make_run(run, model_name, folders[(channels, side)])

    page = write_report(run)

    assert page == run / "report" / "report.html"
    has_conv = model_name != "mlp"
    pngs = [*RUN_PNGS, *(CONV_PNGS if has_conv else ())]
    for name in pngs:
        assert_png_not_blank(run / "report" / name)
    assert sorted(p.name for p in page.parent.glob("*.png")) == sorted(pngs)
    text = assert_self_contained(page, pngs)

    from cnnray.checkpoint import load_model

    model, _ = load_model(ckpt)
    assert f"Total: {count_parameters(model):,}" in text  # the layer table's parameter total
    assert "Flattening to a vector" in text or model_name == "resnet18"  # resnet pools globally
    assert (page.parent / "layers.txt").read_text().startswith("Layer No.")
    assert "this evaluation gives" not in text  # the report's evaluation agrees with training's
    assert f"{len(CLASSES) * 10} test images" in text
    if has_conv:
        assert f"each of the {len(conv_layers(model))} conv layers" in text
    else:
        assert "has no convolutional layers" in text


def test_report_cli_and_bad_dirs(folders, tmp_path, capsys):
    from cnnray.cli import main

    run = tmp_path / "run"
    make_run(run, "cnn", folders[(1, 28)], epochs=1)
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere"), "--no-tensorboard"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (tmp_path / "elsewhere" / "report.html").is_file() and not (run / "tensorboard").exists()

    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["report", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cnnray: error:") and len(err.splitlines()) == 1, err


def test_report_after_training_warns_instead_of_failing(folders, tmp_path):
    from cnnray.report import report_after_training

    lines: list[str] = []
    assert report_after_training(tmp_path / "no-run", echo=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("[cnnray] report not written: ConfigError")
    run = tmp_path / "run"
    make_run(run, "mlp", folders[(1, 28)], epochs=1)
    assert report_after_training(run, echo=lines.append) == run / "report" / "report.html"
    assert lines[-1] == f"[cnnray] report {run / 'report' / 'report.html'}"


def test_report_survives_missing_test_data(folders, tmp_path):
    """A run trained on a cluster whose data this machine lacks still gets its curves."""
    data = tmp_path / "data"
    make_image_folder(data, 1, 28, per_class=4)
    run = tmp_path / "run"
    make_run(run, "cnn", data)
    write_report(run)
    assert (run / "report" / "confusion.png").is_file()
    (run / "report" / "mine.png").write_bytes(b"not the report's")  # other files in the folder stay
    shutil.rmtree(data)
    text = write_report(run).read_text()  # the rerun also removes the now stale test-set PNGs
    assert "Test set not evaluated" in text
    assert (run / "report" / "curves.png").is_file() and not (run / "report" / "confusion.png").exists()
    assert (run / "report" / "mine.png").read_bytes() == b"not the report's"


def test_predictions_confusion_and_mistakes():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 1, 0, 1])
    p = Predictions(images=torch.zeros(5, 1, 2, 2, dtype=torch.uint8), labels=labels, probs=probs)
    assert p.confusion().tolist() == [[1, 1], [2, 1]]
    assert p.accuracy == pytest.approx(0.4)
    assert p.most_confident_mistakes(2).tolist() == [4, 3]  # wrong with 0.95, then 0.7


def test_conv_responses_follow_the_model():
    model = build_model("tutorial_cnn").eval()
    responses = conv_responses(model, torch.randn(1, 3, 32, 32))
    assert [name for name, _ in responses] == [name for name, _ in conv_layers(model)]
    assert [tuple(r.shape) for _, r in responses] == [(6, 28, 28), (16, 10, 10)]
    assert not any(m._forward_hooks for _, m in conv_layers(model))  # hooks removed


def _write_sweep(sweep: Path, ckpt: Path | None) -> list[dict]:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    rows, histories = [], {}
    for i, (lr, momentum, norm) in enumerate([(0.01, 0.9, "none"), (0.1, 0.9, "batch"), (0.3, 0.5, "none"),
                                              (0.03, 0.0, "group"), (1.0, 0.95, "batch")]):
        epochs = 2 if i == 4 else 4  # the last trial was stopped early
        hist = [{"epoch": e, "train_loss": 1.5 / e, "train_accuracy": 0.5 + 0.08 * e + 0.01 * i,
                 "val_loss": 1.4 / e + 0.05 * i, "val_accuracy": 0.5 + 0.09 * e - 0.03 * i, "lr": lr,
                 "samples_per_second": 100.0, "epoch_seconds": 2.0} for e in range(1, epochs + 1)]
        tid = f"trial_{i:05d}"
        histories[tid] = hist
        rows.append({"trial_id": tid, "lr": lr, "momentum": momentum, "norm": norm, "epochs_run": epochs,
                     "best_val_accuracy": max(h["val_accuracy"] for h in hist), "stopped_early": i == 4,
                     "status": "TERMINATED"})
    sweep.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    pyarrow.csv.write_csv(table, sweep / "trials.csv")
    pyarrow.parquet.write_table(table, sweep / "trials.parquet")
    (sweep / "histories.json").write_text(json.dumps(histories))
    if ckpt is not None:
        from cnnray.checkpoint import read_meta

        (sweep / "best.json").write_text(json.dumps({
            "trial_id": "trial_00000", "config": read_meta(ckpt)["config"], "val_accuracy": rows[0]["best_val_accuracy"],
            "test_accuracy": None, "checkpoint": str(ckpt), "model_store": None}))
    return rows


@pytest.mark.parametrize("with_best", [True, False], ids=["best-checkpoint", "tables-only"])
def test_sweep_report(folders, tmp_path, with_best):
    ckpt = make_run(tmp_path / "trial-run", "cnn", folders[(1, 28)]) if with_best else None
    sweep = tmp_path / "sweep"
    rows = _write_sweep(sweep, ckpt)
    if not with_best:
        (sweep / "trials.parquet").unlink()  # the CSV alone must do

    page = write_report(sweep)

    pngs = ["trials.png", "hyperparams.png", *(["confusion.png", "mistakes.png", *CONV_PNGS] if with_best else [])]
    for name in pngs:
        assert_png_not_blank(sweep / "report" / name)
    text = assert_self_contained(page, pngs)
    for row in rows:
        assert row["trial_id"] in text
    assert "5 trials, 1 stopped early, 0 failed" in text
    assert ("Confusion matrix" in text) == with_best
    assert len(list((sweep / "tensorboard").glob("trial_*/events.out.tfevents.*"))) == (5 if _tb() else 0)


def _tb() -> bool:
    from cnnray.report import tensorboard

    return tensorboard.available()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files, read as TFRecords of Event protos (no tensorboard needed)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])  # length, crc, record, crc
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_events(folders, tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    make_run(run, "cnn", folders[(1, 28)])
    write_report(run)
    write_report(run)  # a rerun replaces the events instead of doubling every curve
    scalars = read_scalars(run / "tensorboard")
    history = json.loads((run / "result.json").read_text())["history"]
    assert scalars["accuracy/val"] == [(h["epoch"], pytest.approx(h["val_accuracy"])) for h in history]
    assert {"loss/train", "loss/val", "accuracy/train", "lr", "speed/samples_per_second",
            "speed/epoch_seconds", "accuracy/test"} <= set(scalars)


@pytest.mark.slow
def test_report_on_a_real_run(local_ray, mnist_dir, tmp_path):
    """A real 2-worker MNIST run through run_training, then its report."""
    from cnnray.train.driver import run_training

    cfg = TrainConfig(model="cnn", dataset="mnist", data_dir=str(mnist_dir), workers=2, subset=2000, epochs=2,
                      batch_size=64, lr=0.05, out=str(tmp_path / "real"))
    summary = run_training(cfg)
    page = write_report(tmp_path / "real")
    pngs = [*RUN_PNGS, *CONV_PNGS]
    for name in pngs:
        assert_png_not_blank(page.parent / name)
    text = assert_self_contained(page, pngs)
    assert f"{summary['test_samples']:,} test images" in text
    assert f"{100 * summary['test_accuracy']:.2f}%" in text and "this evaluation gives" not in text
    assert "Validation accuracy" in text and "each of the 2 conv layers" in text
