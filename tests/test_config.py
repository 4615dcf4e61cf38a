"""TrainConfig: round trips, YAML, and every kind of bad value or key."""

from __future__ import annotations

import pytest

from cnnray.config import ConfigError, TrainConfig


def test_defaults_round_trip():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_hidden_sizes_list_becomes_tuple_and_back():
    cfg = TrainConfig.from_dict({"model": "mlp", "hidden_sizes": [64, 32]})
    assert cfg.hidden_sizes == (64, 32)
    assert cfg.to_dict()["hidden_sizes"] == [64, 32]


def test_unknown_key_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, r"epochs=0 must be in \[1, 100000\]"),
        ({"epochs": -1}, r"epochs=-1 must be in \[1, 100000\]"),
        ({"lr": 0.0}, r"lr=0.0 must be in \(0, 100\]"),
        ({"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
        ({"workers": 4, "batch_size": 2}, "batch_size=2 must be a multiple of workers=4"),
        # Issue 13: 100 over 3 workers used to train at a global batch of 99 without a word.
        ({"workers": 3, "batch_size": 100}, "batch_size=100 must be a multiple of workers=3.*try 99 or 102"),
        ({"seed": -1}, r"seed=-1 must be in \[0, "),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"model": "alexnet"}, "unknown model 'alexnet'"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"norm": "instance"}, "unknown norm 'instance'"),
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
        ({"epochs": "three"}, "epochs must be an integer"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"gpu": "yes"}, "gpu must be true or false"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"val_fraction": 0.0}, "val_fraction=0.0 must be in"),
        ({"hidden_sizes": []}, r"hidden_sizes=\(\) must be a non-empty list"),
    ],
)
def test_bad_values_raise_clear_errors(changes, message):
    """Building the config, or its validate() (the checks against the registries, which
    training and Tune call before anything starts)."""
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(changes).validate()


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: mlp\nlr: 1e-3\nepochs: 2\nhidden_sizes: [32]\n")
    cfg = TrainConfig.from_yaml(path, overrides={"epochs": 5})
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.hidden_sizes) == ("mlp", 0.001, 5, (32,))


@pytest.mark.parametrize(
    "text, message",
    [("- a\n- b\n", "must hold a mapping"), ("model: [unclosed\n", "is not valid YAML"), ("colour: red\n", "unknown config key")],
)
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(path)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_lr_scaling_and_per_worker_batch():
    cfg = TrainConfig(batch_size=512, lr=0.1, lr_scaling="linear", workers=4)
    assert cfg.effective_lr == pytest.approx(0.4)
    assert cfg.batch_size_per_worker == 128
    assert TrainConfig(batch_size=512, lr=0.1).effective_lr == 0.1
