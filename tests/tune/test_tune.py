"""`cnnray tune`: search spaces, a real ASHA sweep on a local Ray, resume after a killed driver."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cnnray.config import ConfigError, TrainConfig
from cnnray.tune.space import Dist, default_space, parse_space, space_from_dict, space_to_dict
from tests.helpers.cli import assert_one_line_exit_2, cnnray_process, run_cli
from tests.helpers.tune import wait_for_a_finished_trial
from tests.helpers.processes import spawn_cnnray

# A subset on which lr 0.05 clearly beats lr 1e-4 after one epoch, in seconds per epoch.
SMOKE = dict(model="cnn", dataset="mnist", subset=2000, epochs=2, batch_size=64, seed=0)


def cnnray(*args: str, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return cnnray_process(*args, env_extra=env_extra, timeout=timeout)


# --- search spaces (no Ray) ----------------------------------------------------------------
def test_default_space_is_lr_momentum_norm():
    space = default_space()
    assert space["lr"].kind == "loguniform" and space["lr"].values[0] > 0
    assert space["momentum"] == Dist("uniform", (0.5, 0.99))
    assert set(space["norm"].values) == {"none", "batch"}
    # Every bound is a value a trial accepts.
    for key, dist in space.items():
        for v in dist.values:
            TrainConfig().replace(**{key: v})


def test_space_file_round_trips_and_fixes_plain_values():
    data = {"lr": {"loguniform": [1e-3, "5e-1"]}, "batch_size": {"grid": [64, 128]},
            "norm": {"choice": ["none", "batch"]}, "weight_decay": 1e-4}
    space, fixed = parse_space(data, TrainConfig())
    assert space["lr"] == Dist("loguniform", (1e-3, 0.5))  # YAML's "5e-1" string read as a float
    assert fixed == {"weight_decay": 1e-4}
    assert space_from_dict(space_to_dict(space), TrainConfig()) == space


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"learning_rate": {"loguniform": [1e-3, 0.1]}}, "unknown TrainConfig field 'learning_rate'; sweepable fields: "),
        ({"momentun": {"uniform": [0.5, 0.9]}}, "unknown TrainConfig field 'momentun' (did you mean 'momentum'?)"),
        ({"lr": {"logrange": [1e-3, 0.1]}}, "unknown distribution 'logrange'"),
        ({"lr": {"loguniform": [0.1, 1e-3]}}, "needs low < high"),
        ({"lr": {"loguniform": [0.1]}}, "needs [low, high]"),
        ({"lr": {"uniform": [0.0, 0.1]}}, "lr=0.0 must be in (0, 100]"),
        ({"momentum": {"uniform": [0.5, 1.5]}}, "momentum=1.5 must be in [0, 1)"),
        ({"batch_size": {"uniform": [32, 256]}}, "needs a float field"),
        ({"norm": {"choice": ["none", "instance"]}}, "unknown norm 'instance'"),
        ({"norm": {"choice": []}}, "needs a non-empty list"),
        ({"norm": {"choice": ["batch", "batch"]}}, "lists a value twice"),
        ({"lr": {"choice": [0.1], "grid": [0.2]}}, "exactly one distribution"),
        ({"epochs": {"grid": [1, 2]}}, "'epochs' cannot be swept"),
        ({"weight_decay": 1e-4}, "no field is swept"),
    ],
)
def test_bad_space_is_a_clear_error(data, fragment):
    with pytest.raises(ConfigError) as e:
        parse_space(data, TrainConfig())
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "space_text, extra, fragment",
    [
        ("lr: {loguniform: [0.001, 0.5]}\nlearning_rate: {choice: [0.1]}\n", [], "unknown TrainConfig field 'learning_rate'"),
        ("lr: {normal: [0.1, 0.01]}\n", [], "unknown distribution 'normal'"),
        ("- lr\n- momentum\n", [], "must hold a mapping"),
        ("lr: {loguniform: [0.001, 0.5]}\n", ["--lr", "0.1"], "--lr is swept by the search space"),
    ],
)
def test_cli_bad_space_exits_2_with_one_line(tmp_path, space_text, extra, fragment, capsys, monkeypatch):
    import cnnray.tune.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "run_sweep", lambda sweep: pytest.fail("the sweep would start its trials"))
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    result = run_cli(capsys, "tune", "--model", "cnn", "--space", str(space), "--out", str(tmp_path / "sweep"), *extra)
    assert_one_line_exit_2(result, fragment)
    assert not (tmp_path / "sweep").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(samples=0), "samples=0 must be at least 1"),
        (dict(scheduler="median"), "unknown scheduler 'median'"),  # hyperband is one now
        (dict(grace_period=4), "grace_period=4 must be between 1 and epochs=3"),
        (dict(reduction_factor=1.0), "reduction_factor=1.0 must be greater than 1"),
        (dict(max_concurrent=0), "max_concurrent=0 must be at least 1"),
        (dict(name="my model"), "invalid model name 'my model'"),
    ],
)
def test_bad_sweep_settings_are_refused(changes, fragment):
    from cnnray.tune.sweep import SweepConfig

    with pytest.raises(ValueError, match=fragment):  # ConfigError, or StoreError for the name
        SweepConfig(train=TrainConfig(epochs=3), **changes)


def test_grids_multiply_the_trials_and_settings_round_trip():
    from cnnray.tune.sweep import SweepConfig

    sweep = SweepConfig(train=TrainConfig(), samples=3, space={"lr": Dist("grid", (0.1, 0.01)),
                                                               "norm": Dist("grid", ("none", "batch")),
                                                               "momentum": Dist("uniform", (0.5, 0.9))})
    assert sweep.num_trials == 12  # 3 samples x 2 lr x 2 norm; the uniform is drawn once per trial
    assert SweepConfig.from_dict(json.loads(json.dumps(sweep.to_dict()))) == sweep
    assert SweepConfig(train=TrainConfig(model="lenet5", dataset="fashion_mnist")).model_name == "lenet5-fashion_mnist"


def test_cli_tune_help_lists_the_sweep_flags(capsys):
    code, out, _ = run_cli(capsys, "tune", "--help")
    assert code == 0
    for flag in ("--samples", "--workers-per-trial", "--max-concurrent", "--scheduler", "--space", "--resume",
                 "--model-store", "--name", "--lr", "--batch-size"):
        assert flag in out, flag


# --- a real sweep on the session's local Ray ------------------------------------------------
def test_asha_sweep_of_4_trials_exports_a_loadable_best(local_ray, mnist_dir, tmp_path):
    """4 trials of 1 DDP worker, 2 at a time: lr 0.05 and lr 1e-4 twice each, so ASHA stops
    a 1e-4 trial at the first rung whatever order the trials report in."""
    import pandas as pd
    import ray
    import torch

    from cnnray.checkpoint import load_model
    from cnnray.train.epoch import evaluate
    from cnnray.train.worker_data import held_out_batches
    from cnnray.tune.sweep import SweepConfig, run_sweep

    out = tmp_path / "sweep"
    sweep = SweepConfig(
        train=TrainConfig(**SMOKE, data_dir=str(mnist_dir), workers=1),
        space={"lr": Dist("grid", (0.05, 1e-4)), "norm": Dist("choice", ("none", "batch"))},
        samples=2,
        out=str(out),
    )
    lines: list[str] = []
    best = run_sweep(sweep, echo=lines.append)

    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 4
    assert {"trial_id", "lr", "norm", "epochs_run", "best_val_accuracy", "stopped_early", "status"} <= set(table.columns)
    assert (table["status"] == "TERMINATED").all()
    stopped = table[table["stopped_early"]]
    assert len(stopped) >= 1 and (stopped["lr"] == 1e-4).all() and (stopped["epochs_run"] < 2).all()
    assert pd.read_parquet(out / "trials.parquet")["trial_id"].tolist() == table["trial_id"].tolist()
    # One progress line per trial, then the summary table.
    assert sum("[cnnray] trial " in line for line in lines) == 4
    assert any("stopped early after epoch 1/2" in line for line in lines)

    histories = json.loads((out / "histories.json").read_text())
    assert set(histories) == set(table["trial_id"])
    for trial_id, epochs_run in zip(table["trial_id"], table["epochs_run"]):
        assert [h["epoch"] for h in histories[trial_id]] == list(range(1, epochs_run + 1))
        assert {"val_accuracy", "train_loss", "samples_per_second", "world_size"} <= set(histories[trial_id][0])

    saved = json.loads((out / "best.json").read_text())
    assert saved == best
    assert saved["config"]["lr"] == 0.05 and saved["val_accuracy"] == table["best_val_accuracy"].max()
    assert saved["model_name"] == "cnn-mnist" and Path(saved["model_store"]) == out / "models" / "cnn-mnist" / "1"
    model, meta = load_model(saved["checkpoint"])
    assert meta["config"]["lr"] == 0.05
    # The exported version serves on its own and reproduces the reported test accuracy.
    served, _ = load_model(saved["model_store"])
    cfg = TrainConfig.from_dict(saved["config"])
    stats = evaluate(served, held_out_batches(cfg, torch.device("cpu")), torch.device("cpu"))
    assert stats.accuracy == pytest.approx(saved["test_accuracy"])
    assert saved["test_accuracy"] > 0.5  # lr 0.05 on 1,800 images, 2 epochs; chance is 0.1
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Stopped trials gave their workers back: both CPUs are free again.
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.time() < deadline, f"CPUs still held after the sweep: {ray.available_resources()}"
        time.sleep(0.5)

    with pytest.raises(ConfigError, match="pass --resume"):
        run_sweep(sweep, echo=lines.append)


# --- resume after the driver is killed ------------------------------------------------------
@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(mnist_dir, tmp_path, capsys, monkeypatch):
    """SIGKILL `cnnray tune` once a trial has finished (and Tune has saved that), then
    rerun with --resume: the finished trial is left alone, the other completes. Two trials,
    one at a time (2 workers each on 2 CPUs): lr 0.05 finishes before the kill, lr 1e-4 runs
    after the resume and meets ASHA's rung."""
    import pandas as pd

    from cnnray.tune.results import read_history

    out = tmp_path / "sweep"
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.05, 0.0001]}\n")
    args = ["tune", "--model", "cnn", "--data-dir", str(mnist_dir), "--subset", "2000", "--epochs", "2",
            "--batch-size", "64", "--samples", "1", "--workers-per-trial", "2", "--space", str(space),
            "--out", str(out)]
    proc = spawn_cnnray(args, tmp_path / "cache")
    try:
        statuses = wait_for_a_finished_trial(proc, out / "tune")
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the driver just dies
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = {t for t, s in statuses.items() if s == "TERMINATED"}
    assert 0 < len(finished) < 2
    before = {t: (out / "tune" / t / "result.json").read_bytes() for t in finished}
    unreported = {t for t in statuses if t not in finished and not read_history(out, t)}
    assert not (out / "best.json").exists()

    # The same command again is refused before anything runs (before Ray): in this process.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    assert_one_line_exit_2(run_cli(capsys, *args), "pass --resume")

    resumed = cnnray(*args, "--resume", env_extra={"CNNRAY_DATA": str(tmp_path / "cache")}, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the sweep" in resumed.stdout
    best = json.loads((out / "best.json").read_text())
    assert best["trials"] == 2 and best["config"]["lr"] == 0.05
    for t in finished:  # neither rerun nor reported again
        assert (out / "tune" / t / "result.json").read_bytes() == before[t]
        assert f"trial {t} " not in resumed.stdout
    histories = json.loads((out / "histories.json").read_text())
    assert all(h for h in histories.values())
    # ASHA's rungs survived the restart: a 1e-4 trial that had not reported before the
    # kill is judged against the trials that ran before it, and stopped after epoch 1.
    rows = {r["trial_id"]: r for r in pd.read_csv(out / "trials.csv").to_dict("records")}
    assert len(rows) == 2 and set(statuses) <= set(rows)
    assert all(r["status"] == "TERMINATED" for r in rows.values())
    for t in unreported:
        if rows[t]["lr"] == 1e-4:
            assert rows[t]["stopped_early"] and rows[t]["epochs_run"] == 1, rows[t]


def test_a_diverging_trial_errors_and_the_sweep_goes_on(local_ray, mnist_dir, tmp_path):
    """Issue 13: a trial whose loss becomes NaN (lr 100) ends as an errored trial with the
    divergence line; the other trial finishes and is the exported best."""
    import pandas as pd

    from cnnray.tune.sweep import SweepConfig, run_sweep

    out = tmp_path / "sweep"
    sweep = SweepConfig(
        train=TrainConfig(**{**SMOKE, "epochs": 1}, data_dir=str(mnist_dir), workers=1),
        space={"lr": Dist("grid", (100.0, 0.05))},
        samples=1,
        scheduler="none",
        out=str(out),
    )
    lines: list[str] = []
    best = run_sweep(sweep, echo=lines.append)
    table = pd.read_csv(out / "trials.csv").set_index("lr")
    assert table.loc[100.0, "status"] == "ERROR"
    assert "training diverged in epoch 1" in table.loc[100.0, "error"]
    assert table.loc[0.05, "status"] == "TERMINATED"
    assert best["config"]["lr"] == 0.05
