"""Checkpoints: round trip through the registry alone, digests, and hostile files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cnnray.checkpoint import (
    CheckpointError,
    load_model,
    load_train_state,
    read_meta,
    save_checkpoint,
    verify_checkpoint,
)
from cnnray.models import build_model, list_models, resolve_model_args

SMALL = [m for m in list_models() if "imagenet" not in m]


def _save(tmp_path, name="cnn", **kw):
    args = resolve_model_args(name, **kw)
    model = build_model(name, **args)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, *([args["in_channels"]] + args["image_size"]))).sum().backward()
    opt.step()
    d = save_checkpoint(
        tmp_path / "ckpt",
        model_name=name,
        model_args=args,
        state_dict=model.state_dict(),
        data_info={"classes": [str(i) for i in range(args["num_classes"])]},
        epoch=3,
        config={"model": name},
        metrics={"val_accuracy": 0.5},
        train_state={"optimizer": opt.state_dict(), "epoch": 3},
        history=[{"epoch": 1}, {"epoch": 2}, {"epoch": 3}],
    )
    return d, model


@pytest.mark.parametrize("name", SMALL)
def test_round_trip_rebuilds_every_model(tmp_path, name):
    d, model = _save(tmp_path, name, norm="batch" if name != "mlp" else "none")
    loaded, meta = load_model(d)
    assert meta["epoch"] == 3 and meta["model"]["name"] == name and len(meta["history"]) == 3
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not loaded.training
    state = load_train_state(d)
    assert state["epoch"] == 3 and "state" in state["optimizer"]


@pytest.mark.parametrize("name", SMALL)
def test_loaded_model_evaluates_as_the_training_loop_does(tmp_path, name):
    """A rebuilt checkpoint runs in the inference layout (channels-last 4-D weights on the
    CPU), and the loop's own test evaluation of the trained net (evaluate_weights) gives
    the served/report model's logits exactly, for every model, with and without TTA."""
    from cnnray.train.epoch import evaluate, evaluate_weights

    d, model = _save(tmp_path, name, norm="batch" if name != "mlp" else "none")
    loaded, meta = load_model(d)
    convs = [p for p in loaded.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    shape = [meta["model"]["args"]["in_channels"], *meta["model"]["args"]["image_size"]]
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % meta["model"]["args"]["num_classes"]
    cpu = torch.device("cpu")
    for tta in ("none", "flip"):
        served = evaluate(loaded, [(x, y)], cpu, tta)
        trained = evaluate_weights(model, None, [(x, y)], cpu, tta)
        assert (served.loss_sum, served.correct) == (trained.loss_sum, trained.correct)


def test_leaves_no_temporary_files(tmp_path):
    d, _ = _save(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "model.pt", "train_state.pt"]


def test_corrupt_weights_are_detected(tmp_path):
    d, _ = _save(tmp_path)
    raw = bytearray((d / "model.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.pt is corrupt"):
        load_model(d)


def test_missing_meta_means_incomplete(tmp_path):
    d, _ = _save(tmp_path)
    (d / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        read_meta(d)


def test_missing_file_is_reported(tmp_path):
    d, _ = _save(tmp_path)
    (d / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing train_state.pt"):
        verify_checkpoint(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nothing-here")


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_objects_are_never_executed(tmp_path, monkeypatch):
    """A checkpoint whose weights file smuggles a callable is refused, digest or not."""
    monkeypatch.chdir(tmp_path)
    d, _ = _save(tmp_path)
    with open(d / "model.pt", "wb") as f:
        torch.save({"w": _Evil()}, f, pickle_module=pickle)
    meta = json.loads((d / "meta.json").read_text())
    import hashlib

    meta["files"]["model.pt"] = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot load"):
        load_model(d)
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_do_not_fit(tmp_path):
    d, _ = _save(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["model"]["args"]["num_classes"] = 7
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(d)


def test_unknown_format_version(tmp_path):
    d, _ = _save(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["format_version"] = 99
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        read_meta(d)
