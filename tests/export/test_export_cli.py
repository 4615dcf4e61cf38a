"""`cnnray export`: files written only when verified, one-line refusals, the store mode, and
a trained MNIST cnn whose ONNX file alone, in ONNX Runtime, gives `cnnray train`'s test
accuracy to the last example."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from cnnray.cli import main
from tests.helpers.processes import spawn_cnnray
from tests.export.checkpoints import random_pixels, save_untrained, shape_of


class _DataDependent(nn.Module):
    """A branch on the values of its input: neither torch.export nor ONNX has a graph for it."""

    def __init__(self, *, num_classes: int, in_channels: int, image_size: tuple[int, int], norm: str) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels * image_size[0] * image_size[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc(x) if x.mean() > 0 else -self.fc(x)


@pytest.fixture
def unexportable(tmp_path):
    """A checkpoint of a model registered for this test only (removed after it)."""
    from cnnray.models import registry

    name = "unexportable_branch"

    def build(*, num_classes: int, in_channels: int, image_size: tuple[int, int], norm: str) -> nn.Module:
        return _DataDependent(num_classes=num_classes, in_channels=in_channels, image_size=image_size, norm=norm)

    registry.register_model(name, in_channels=1, image_size=(28, 28), description="test only")(build)
    try:
        yield name, save_untrained(tmp_path / "ckpt", name)
    finally:
        registry._REGISTRY.pop(name, None)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_model_that_cannot_export_is_refused_with_one_line(unexportable, fmt, tmp_path, capsys):
    name, ckpt = unexportable
    out = tmp_path / f"m.{fmt}"
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("cnnray: error: cannot export") and repr(name) in err, err
    assert not out.exists() and list(tmp_path.glob(".m.*")) == []  # nothing left behind


def test_a_file_that_does_not_match_is_not_written(tmp_path, monkeypatch):
    """Verification is what stands between a wrong graph and `--out`: a graph whose
    normalisation is off by 1/255 in the mean is refused (exit 1) and no file appears."""
    from cnnray.export import files
    from cnnray.export.files import VerificationError, export_checkpoint

    ckpt = save_untrained(tmp_path / "ckpt", "mlp")
    real = files.PixelGraph

    def off_by_one_level(model, mean, std, tta, **kw):
        return real(model, [m + 1 / 255 for m in mean], std, tta, **kw)

    monkeypatch.setattr(files, "PixelGraph", off_by_one_level)
    with pytest.raises(VerificationError, match="does not match the checkpoint"):
        export_checkpoint(ckpt, "pt2", tmp_path / "m.pt2", images=random_pixels(shape_of("mlp")))
    assert not (tmp_path / "m.pt2").exists() and list(tmp_path.glob(".m.pt2*")) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--format", "onnx", "--out", "x.onnx"], "neither a checkpoint folder"),  # source: an empty folder
        (["--format", "store", "--out", "store"], "--format store needs --name"),
        (["--format", "onnx", "--out", "x.onnx", "--name", "m"], "--name is for --format store only"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


def test_uint8_graph_and_store_mode(tmp_path, capsys):
    from cnnray.export.files import export_checkpoint
    from cnnray.export.onnx import ort_session, run_session
    from cnnray.store import scan

    ckpt = save_untrained(tmp_path / "ckpt", "mlp")
    images = random_pixels(shape_of("mlp"), n=8)
    report = export_checkpoint(ckpt, "onnx", tmp_path / "u8.onnx", input_dtype="uint8", images=images)
    assert report.comparison.ok  # uint8 pixels in, cnnray's logits out (checked against the checkpoint)
    assert ort_session(str(tmp_path / "u8.onnx"), 1).get_inputs()[0].type == "tensor(uint8)"
    assert run_session(ort_session(str(tmp_path / "u8.onnx"), 1), images.numpy()).shape == (8, 10)

    assert main(["export", str(ckpt), "--format", "store", "--out", str(tmp_path / "store"), "--name", "digits"]) == 0
    assert "digits version 1" in capsys.readouterr().out
    assert scan(tmp_path / "store").models == {"digits": [1]}


# --- a trained MNIST cnn: ONNX Runtime alone gives `cnnray train`'s test accuracy ----------------
ORT_ALONE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    images, labels = np.load(sys.argv[2]), np.load(sys.argv[3])
    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: images[i:i + 500]})[0] for i in range(0, len(images), 500)])
    assert "cnnray" not in sys.modules and "torch" not in sys.modules
    print(json.dumps({"correct": int((logits.argmax(1) == labels).sum()), "count": len(labels)}))
""")


@pytest.mark.slow
def test_trained_mnist_onnx_file_alone_gives_the_runs_test_accuracy(mnist_dir, data_cache, tmp_path):
    run = tmp_path / "run"
    proc = spawn_cnnray(["train", "--model", "cnn", "--data-dir", str(mnist_dir), "--subset", "2000", "--epochs", "1",
                         "--out", str(run), "--no-report"], data_cache)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads((run / "result.json").read_text())

    proc = spawn_cnnray(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "mnist.onnx")], data_cache)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "0 predictions differ" in out, out[-3000:]

    # The run's test split (its subset and seed), as files: the ONNX Runtime process reads
    # only these and the .onnx file.
    from cnnray.config import TrainConfig
    from cnnray.data import take_subset
    from cnnray.train.worker_data import load_for

    cfg = TrainConfig.from_dict(result["config"])
    ds = load_for(cfg)
    images, labels = take_subset(ds.test_images, ds.test_labels, cfg.subset, cfg.seed)
    np.save(tmp_path / "images.npy", images.float().numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())
    ran = subprocess.run([sys.executable, "-c", ORT_ALONE, str(tmp_path / "mnist.onnx"), str(tmp_path / "images.npy"),
                          str(tmp_path / "labels.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = json.loads(ran.stdout)
    assert got["count"] == len(labels) == 2000
    # To the last example: the same number of correct answers as result.json's accuracy.
    assert got["correct"] == round(result["test_accuracy"] * got["count"]), (got, result["test_accuracy"])
