"""Each searcher and scheduler on a small MNIST subset on the session's private Ray, PBT's
exploit record, and an interrupted Optuna sweep that resumes where its searcher was."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cnnray.config import TrainConfig
from cnnray.tune.space import Dist
from tests.helpers import REPO
from tests.helpers.tune import trial_statuses, wait_for_a_finished_trial
from tests.helpers.processes import spawn_cnnray

# Seconds per epoch: 900 training images; lr 0.05 clearly beats 1e-4 after one epoch.
TINY = dict(model="cnn", dataset="mnist", subset=1000, batch_size=100, seed=0, workers=1)


def _sweep(tmp_path, mnist_dir, **kw):
    from cnnray.tune.sweep import SweepConfig

    train = TrainConfig(**{**TINY, "epochs": kw.pop("epochs", 2), **kw.pop("train", {})}, data_dir=str(mnist_dir))
    return SweepConfig(train=train, out=str(tmp_path / "sweep"), **kw)


@pytest.mark.slow
def test_optuna_with_asha(local_ray, mnist_dir, tmp_path):
    import pandas as pd

    from cnnray.tune.sweep import run_sweep

    # 2 trials: one wave on the session's 2-CPU Ray (4 took two waves and checked nothing more).
    sweep = _sweep(tmp_path, mnist_dir, search="optuna", scheduler="asha", samples=2,
                   space={"lr": Dist("loguniform", (1e-4, 0.2)), "norm": Dist("choice", ("none", "batch"))})
    best = run_sweep(sweep, echo=lambda line: None)
    table = pd.read_csv(tmp_path / "sweep" / "trials.csv")
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    assert table["lr"].between(1e-4, 0.2).all() and len(set(table["lr"])) == 2  # two distinct TPE proposals
    # Tune saved the Optuna searcher's state beside the experiment (what --resume restores).
    assert list((tmp_path / "sweep" / "tune").glob("searcher-state-*.pkl"))
    assert best["val_accuracy"] == table["best_val_accuracy"].max()


@pytest.mark.slow
def test_grid_with_hyperband(local_ray, mnist_dir, tmp_path):
    import pandas as pd

    from cnnray.tune.sweep import run_sweep

    # --search grid: every choice enumerated (2 trials); HyperBand brackets over 2 epochs.
    sweep = _sweep(tmp_path, mnist_dir, search="grid", scheduler="hyperband", samples=1,
                   space={"lr": Dist("choice", (0.05, 1e-4))})
    best = run_sweep(sweep, echo=lambda line: None)
    table = pd.read_csv(tmp_path / "sweep" / "trials.csv")
    assert sorted(table["lr"]) == [1e-4, 0.05] and (table["status"] == "TERMINATED").all()
    assert best["config"]["lr"] == 0.05


@pytest.mark.slow
def test_pbt_exploits_are_recorded_and_take_effect(local_ray, mnist_dir, tmp_path):
    """One trial at a time (max_concurrent 1): lr 0.05 trains first, then lr 1e-4 reports
    epoch 1, ranks below it at epoch 1 and takes its epoch-1 checkpoint, with the new lr
    in effect in epoch 2 (a constant schedule: the epoch's lr is the trial's lr)."""
    import pandas as pd

    from cnnray.report.sweep import write_sweep_report
    from cnnray.tune.sweep import run_sweep

    out = tmp_path / "sweep"
    sweep = _sweep(tmp_path, mnist_dir, scheduler="pbt", samples=1, max_concurrent=1, perturbation_interval=1,
                   train={"schedule": "constant"}, space={"lr": Dist("grid", (0.05, 1e-4))})
    lines: list[str] = []
    run_sweep(sweep, echo=lines.append)
    table = pd.read_csv(out / "trials.csv").set_index("trial_id")
    good = table.index[table["lr"] == 0.05][0]
    exploits = json.loads((out / "exploits.json").read_text())
    assert len(exploits) == 1, exploits
    e = exploits[0]
    weak = e["to"]
    assert e["from"] == good and weak != good and e["epoch"] == 1
    assert e["old"]["lr"] == 1e-4 and e["donor"]["lr"] == 0.05 and e["score_from"] > e["score_to"]
    assert e["new"]["lr"] in (0.05, 1e-4)  # PBT's list mutation: resample or shift to a neighbour
    history = json.loads((out / "histories.json").read_text())[weak]
    assert [h["epoch"] for h in history] == [1, 2]  # its own epoch 1, then the continued epoch 2
    after = history[1]
    assert after["pbt_exploit"] == {"from": good, "epoch": 1} and "pbt_exploit" not in history[0]
    assert after["start_epoch"] == 1  # continued from the donor's epoch-1 checkpoint ...
    assert after["lr"] == pytest.approx(e["new"]["lr"])  # ... with its new lr from the first step
    donor_epoch1 = json.loads((out / "histories.json").read_text())[good][0]
    if e["new"]["lr"] == 0.05:  # the donor's weights and rate: as good as the donor went on to be
        assert after["val_accuracy"] > history[0]["val_accuracy"]
    assert (Path(e["checkpoint"]) / "meta.json").is_file() and str(good) in e["checkpoint"]
    assert donor_epoch1["val_accuracy"] == pytest.approx(e["score_from"])
    assert table.loc[weak, "exploits"] == f"epoch 1 from {good}"  # the trial table names it too
    csv = pd.read_csv(out / "exploits.csv")
    assert list(csv.columns) == ["from", "to", "epoch", "lr_old", "lr_donor", "lr_new"] and len(csv) == 1
    assert any("PBT exploit" in line for line in lines)
    page = write_sweep_report(out, tensorboard=False).read_text()
    assert "PBT exploits" in page and "pbt.png" in page
    assert (out / "report" / "pbt.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_interrupted_optuna_sweep_resumes_where_the_searcher_was(mnist_dir, tmp_path):
    """Ctrl-C (SIGINT) once a trial has finished, then --resume: finished trials are not
    rerun, and the resumed trials are new TPE proposals. Had the searcher restarted from
    its seed (ray#30861), it would propose the first trial's config again."""
    import pandas as pd

    out = tmp_path / "sweep"
    args = ["tune", "--model", "cnn", "--data-dir", str(mnist_dir), "--subset", "1000", "--batch-size", "100",
            "--epochs", "1", "--samples", "3", "--search", "optuna", "--scheduler", "none", "--max-concurrent", "1",
            "--seed", "0", "--out", str(out)]
    proc = spawn_cnnray(args, tmp_path / "cache")
    try:
        wait_for_a_finished_trial(proc, out / "tune")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, proc.stdout.read()[-3000:]
    finished = {t for t, s in trial_statuses(out / "tune").items() if s == "TERMINATED"}
    assert 0 < len(finished) < 3
    before = {t: (out / "tune" / t / "result.json").read_bytes() for t in finished}

    env = {**os.environ, "CNNRAY_DATA": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    resumed = subprocess.run([sys.executable, "-m", "cnnray.cli", *args, "--resume"], capture_output=True, text=True,
                             timeout=600, cwd=REPO, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 3 and (table["status"] == "TERMINATED").all()
    for t in finished:  # neither rerun nor reported again
        assert (out / "tune" / t / "result.json").read_bytes() == before[t]
        assert f"trial {t} " not in resumed.stdout
    # Every proposal is new: the restored TPE sampler went on from its saved state.
    assert len({(round(r["lr"], 12), round(r["momentum"], 12), r["norm"]) for _, r in table.iterrows()}) == 3
    assert all(not math.isnan(v) for v in table["best_val_accuracy"])
