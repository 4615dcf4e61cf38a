"""Fast checks of the tracking pieces that need no server: params, metrics, the champion
rule, the config and flags, the models:/ URIs."""

from __future__ import annotations

import math

import pytest

from cnnray.config import ConfigError, TrainConfig
from cnnray.tracking.params import EPOCH_METRICS, MAX_PARAM_CHARS, champion_decision, epoch_metrics, flatten_params
from cnnray.tracking.sweep import stop_reason
from cnnray.tracking.train import split_tracking, with_tracking


def test_every_config_field_is_a_string_param():
    cfg = TrainConfig(model="mlp", hidden_sizes=(512, 256), tracking="mlflow", experiment="e")
    params = flatten_params(cfg.to_dict())
    assert set(params) == set(cfg.to_dict())
    assert all(isinstance(v, str) for v in params.values())
    assert params["hidden_sizes"] == "[512, 256]" and params["data_dir"] == "None" and params["nesterov"] == "True"
    assert params["lr"] == "0.1" and params["tracking"] == "mlflow"


def test_long_param_is_cut_to_mlflows_limit():
    assert len(flatten_params({"x": "a" * 10_000})["x"]) == MAX_PARAM_CHARS


def test_epoch_metrics_keep_finite_numbers_only():
    report = {k: 1.0 for k in EPOCH_METRICS} | {"epoch": 3, "bf16": True, "val_loss": math.nan, "world_size": 2}
    got = epoch_metrics(report)
    assert set(got) == set(EPOCH_METRICS) - {"val_loss"}


@pytest.mark.parametrize(
    "new, champion, promote",
    [
        ({"val_accuracy": "0.9", "dataset": "mnist"}, None, True),  # the first version
        ({"val_accuracy": "0.95", "dataset": "mnist"}, {"val_accuracy": "0.9", "dataset": "mnist"}, True),
        ({"val_accuracy": "0.85", "dataset": "mnist"}, {"val_accuracy": "0.9", "dataset": "mnist"}, False),
        ({"val_accuracy": "0.9", "dataset": "mnist"}, {"val_accuracy": "0.9", "dataset": "mnist"}, False),  # a tie
        ({"val_accuracy": "0.99", "dataset": "cifar10"}, {"val_accuracy": "0.5", "dataset": "mnist"}, False),
        ({"val_accuracy": "0.99", "dataset": "mnist"}, {"dataset": "mnist"}, False),  # champion not comparable
        ({"dataset": "mnist"}, None, False),  # the new version has no score
        ({"val_accuracy": "nan", "dataset": "mnist"}, None, False),
    ],
)
def test_champion_rule(new, champion, promote):
    decision = champion_decision(new, champion, 1 if champion else None)
    assert decision.promote is promote
    assert "champion" in decision.reason and "\n" not in decision.reason


def test_stop_reasons():
    assert stop_reason(True, 1, 3) == "errored"
    assert stop_reason(False, 3, 3) == "finished"
    assert stop_reason(False, 1, 3) == "stopped early"


def test_tracking_config_fields_and_flags():
    assert TrainConfig().tracking == "none"
    cfg = TrainConfig.from_dict({"tracking": "mlflow", "tracking_uri": "http://h:5000", "experiment": "x"})
    assert (cfg.tracking, cfg.tracking_uri, cfg.experiment) == ("mlflow", "http://h:5000", "x")
    with pytest.raises(ConfigError, match="unknown tracking 'wandb'"):
        TrainConfig(tracking="wandb")
    with pytest.raises(ConfigError, match="did you mean 'tracking'"):
        TrainConfig.from_dict({"trackin": "mlflow"})
    from cnnray.cli import build_parser
    from cnnray.cli.flags import config_from_args

    for command in (["train"], ["tune"]):
        args = build_parser().parse_args([*command, "--tracking", "mlflow", "--tracking-uri", "http://h", "--experiment", "e"])
        assert config_from_args(args).tracking_uri == "http://h"


def test_the_tracking_handle_travels_beside_the_config():
    loop = {"model": "cnn"}
    assert with_tracking(loop, None) is loop
    assert split_tracking(with_tracking(loop, {"uri": "u", "run_id": "r"})) == (loop, {"uri": "u", "run_id": "r"})


@pytest.mark.parametrize("uri", ["models:/digits", "models:/digits@", "models:/digits/0", "models:/digits/x", "models:/a/b/c"])
def test_bad_registry_uris_are_one_line_errors(uri):
    from cnnray.serve.registry import parse_registry_uri

    with pytest.raises(ConfigError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        parse_registry_uri(uri)


def test_registry_uris():
    from cnnray.serve.registry import follows_alias, parse_registry_uri

    assert parse_registry_uri("models:/digits@champion").alias == "champion"
    assert parse_registry_uri("models:/digits/3").version == 3
    assert follows_alias("models:/digits@champion") and not follows_alias("models:/digits/3")
    assert not follows_alias("/srv/store")


def test_register_refuses_a_folder_without_a_finished_run(tmp_path, capsys):
    from cnnray.cli import main

    assert main(["register", str(tmp_path), "--name", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a finished `cnnray train` run" in err[0]


def test_register_with_an_unreachable_registry_exits_2(tmp_path, capsys):
    import json

    from cnnray.cli import main
    from tests.conftest import free_port

    pytest.importorskip("mlflow")
    (tmp_path / "result.json").write_text(json.dumps({"checkpoint": str(tmp_path), "best_val_accuracy": 0.5}))
    code = main(["register", str(tmp_path), "--name", "digits", "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cnnray: error: MLflow tracking URI"), err
