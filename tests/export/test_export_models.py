"""Every registered model exports to ONNX and to torch.export, and each file gives the
checkpoint's logits on a batch (untrained weights, the heaviest TTA, a dynamic batch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnnray.models import get_model_spec, list_models
from tests.export.checkpoints import random_pixels, save_untrained, shape_of

# Both exports and their checks took 8-29 s per small model and 41-142 s per VGG, ResNet
# or airbench on the loaded 2-core CI machine (fp32 export is graph tracing and ONNX
# rewriting: seconds of Python per model): those run with the slow tests.
FAST = {"cnn", "mlp", "tutorial_cnn"}  # an MNIST conv net, an MLP, a 3-channel conv net
# TTA off here (its graph is the model's six times over): every TTA mode is exported and
# checked on the small cnn in test_tta_exports.
TTA = "none"
MODELS = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in list_models()]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two loaded shared cores: one thread is faster for small models
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_exports_to_both_formats_and_matches(name, tmp_path):
    from cnnray.export.files import export_checkpoint, sidecar_path
    from cnnray.export.onnx import ort_session, read_metadata, run_session
    from cnnray.export.pt2 import load_program

    ckpt = save_untrained(tmp_path / "ckpt", name, tta=TTA)
    shape = shape_of(name)
    images = random_pixels(shape, n=6)
    onnx_report = export_checkpoint(ckpt, "onnx", tmp_path / "m.onnx", images=images)
    pt2_report = export_checkpoint(ckpt, "pt2", tmp_path / "m.pt2", images=images)
    for report in (onnx_report, pt2_report):
        assert report.comparison.ok and report.comparison.images == 6 and report.comparison.mismatched == 0

    # A batch size the exporter never saw (dynamic batch), run from the files themselves.
    other = random_pixels(shape, n=3, seed=1).float()
    a = run_session(ort_session(str(tmp_path / "m.onnx"), 1), other)
    with torch.inference_mode():
        b = load_program(str(tmp_path / "m.pt2"))(other)
    classes = get_model_spec(name).num_classes
    assert a.shape == tuple(b.shape) == (3, classes)
    assert np.abs(a - b.numpy()).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))

    meta = read_metadata(str(tmp_path / "m.onnx"))
    sidecar = json.loads(sidecar_path(tmp_path / "m.pt2").read_text())
    for props in ({k: json.loads(v) if v[:1] in "[{" else v for k, v in meta.items()}, sidecar):
        assert props["cnnray.model"] == name
        assert props["cnnray.input_shape"] == list(shape)
        assert props["cnnray.classes"] == [f"class-{i}" for i in range(classes)]
        assert props["cnnray.mean"] == [0.45] * shape[0] and props["cnnray.std"] == [0.25] * shape[0]
        assert props["cnnray.tta"] == TTA
        assert len(props["cnnray.checkpoint_sha256"]) == 64


def test_tta_exports(tmp_path):
    """flip_translate, the TTA with every op of the others and more: the TTA views (flips,
    reflect-padded shifts, a batch of 2N) are in the graph, with a
    dynamic batch: both files give cnnray's TTA logits on a batch size not traced."""
    from cnnray.export.files import export_checkpoint

    ckpt = save_untrained(tmp_path / "ckpt", "cnn", tta="flip_translate")
    for fmt in ("onnx", "pt2"):
        report = export_checkpoint(ckpt, fmt, tmp_path / f"m.{fmt}", images=random_pixels(shape_of("cnn"), n=5))
        assert report.comparison.ok, report.describe()
