"""Search spaces are checked against the model and the rest of the config before any trial
starts (issue 18): exit 2 with one line naming the field, never N failed trials."""

from __future__ import annotations

import pytest

from cnnray.cli import main
from cnnray.config import ConfigError, TrainConfig
from cnnray.tune.space import Dist, parse_space


@pytest.fixture
def no_sweep(monkeypatch):
    import cnnray.tune.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "run_sweep", lambda sweep: pytest.fail("the sweep would start its trials"))


def test_cnn_with_swept_hidden_sizes_is_exit_2_naming_the_field(tmp_path, no_sweep, capsys):
    """The issue's example: the cnn has no hidden sizes, so every trial would fail."""
    space = tmp_path / "space.yaml"
    space.write_text("hidden_sizes: {choice: [[512], [1024, 256]]}\nlr: {loguniform: [0.001, 0.1]}\n")
    assert main(["tune", "--model", "cnn", "--space", str(space), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnnray: error: search space")
    assert "hidden_sizes: model 'cnn' does not take hidden_sizes (models that do: mlp)" in err


def test_the_same_space_is_fine_for_the_mlp():
    from cnnray.tune.space import check_space

    space, _ = parse_space({"hidden_sizes": {"choice": [[512], [1024, 256]]}}, TrainConfig(model="mlp"))
    check_space(space, TrainConfig(model="mlp"))


def test_fixed_value_the_model_does_not_take(tmp_path, no_sweep, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("hidden_sizes: [256]\nlr: {choice: [0.01, 0.1]}\n")
    assert main(["tune", "--model", "lenet5", "--space", str(space), "--out", str(tmp_path / "s")]) == 2
    assert "model 'lenet5' does not take hidden_sizes" in capsys.readouterr().err


def test_train_flag_the_model_does_not_take(tmp_path, capsys, monkeypatch):
    """The same kind outside tune: `cnnray train --model cnn --hidden-sizes 512`."""
    import cnnray.train.driver as driver

    monkeypatch.setattr(driver, "preflight", lambda cfg: pytest.fail("data would be loaded"))
    assert main(["train", "--model", "cnn", "--hidden-sizes", "512", "--out", str(tmp_path / "r")]) == 2
    assert "model 'cnn' does not take hidden_sizes" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="hidden_sizes"):
        TrainConfig.from_dict({"model": "resnet18", "hidden_sizes": [10]}).validate()


def test_values_no_trial_could_run_with_name_the_field(tmp_path, no_sweep, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("batch_size: {grid: [2, 64]}\n")
    assert main(["tune", "--space", str(space), "--workers-per-trial", "4", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "must be a multiple of workers=4" in err and err.count("\n") == 1
    space.write_text("label_smoothing: {uniform: [0.0, 1.0]}\n")  # the high endpoint is out of range
    assert main(["tune", "--space", str(space), "--out", str(tmp_path / "s")]) == 2
    assert "label_smoothing" in capsys.readouterr().err


def test_flags_that_make_the_space_unrunnable(tmp_path, no_sweep, capsys):
    """The space alone is fine; with the flags given on top of it no trial could run."""
    space = tmp_path / "space.yaml"
    space.write_text("hidden_sizes: {choice: [[64], [32, 16]]}\n")
    assert main(["tune", "--model", "vgg11", "--space", str(space), "--out", str(tmp_path / "s")]) == 2
    assert "model 'vgg11' does not take hidden_sizes" in capsys.readouterr().err


@pytest.fixture
def picky_model():
    """A registered model whose constructor rejects some hidden sizes (only its build
    can tell), removed from the registry afterwards."""
    from torch import nn

    from cnnray.models import registry

    @registry.register_model("picky_test", in_channels=1, image_size=(28, 28), description="test only")
    def picky(*, num_classes, in_channels, image_size, norm, hidden_sizes=(8,)):
        if any(h % 2 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be even, got {list(hidden_sizes)}")
        return nn.Linear(in_channels * image_size[0] * image_size[1], num_classes)

    yield "picky_test"
    registry._REGISTRY.pop("picky_test")


def test_every_combination_builds_its_model(picky_model):
    from cnnray.tune.space import check_space

    base = TrainConfig(model=picky_model)
    check_space({"hidden_sizes": Dist("choice", ((8,), (16,)))}, base)
    space = {"hidden_sizes": Dist("grid", ((8,), (3,))), "norm": Dist("choice", ("none", "batch"))}
    expected = r"hidden_sizes=\(3,\), norm='none': model 'picky_test' cannot be built: .*must be even"
    with pytest.raises(ConfigError, match=expected):
        check_space(space, base)


def test_sweep_config_checks_its_space(picky_model):
    from cnnray.tune.sweep import SweepConfig

    with pytest.raises(ConfigError, match="picky_test"):
        SweepConfig(train=TrainConfig(model=picky_model), space={"hidden_sizes": Dist("choice", ((5,),))})
