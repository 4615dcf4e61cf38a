"""benchmarks/tune_bench.py at its --quick size: the three methods at one budget."""

from __future__ import annotations

import json

import pytest


def test_asha_mean_epochs():
    from benchmarks.tune_bench import asha_mean_epochs

    assert asha_mean_epochs(2) == 1.5  # everyone 1 epoch, half a second one
    assert asha_mean_epochs(4) == 1 + 0.5 * 1 + 0.25 * 2  # rungs 1 and 2, then the end


def test_sweeps_fit_the_budget():
    from benchmarks.tune_bench import SIZES, sweep_config
    from cnnray.tune.schedulers import min_budget

    for size in SIZES.values():
        for method in ("random+asha", "optuna+asha", "pbt"):
            sweep = sweep_config(method, 0, data_dir="/tmp", subset=size["subset"], epochs=size["epochs"],
                                 budget=size["budget"], out=__import__("pathlib").Path("/tmp/x"), model="cnn")
            assert min_budget(sweep) <= size["budget"] and sweep.budget == size["budget"]
            if method == "pbt":
                assert sweep.num_trials * size["epochs"] == size["budget"]


@pytest.mark.slow
def test_quick_benchmark_runs_every_method_within_its_budget(local_ray, cifar_tarball, tmp_path, capsys):
    from benchmarks.tune_bench import main

    assert main(["--data-dir", str(cifar_tarball), "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*/tune_bench.json")).read_text())
    assert [r["method"] for r in record["results"]] == ["random+asha", "optuna+asha", "pbt"]
    for r in record["results"]:
        # An epoch another trial was training when the budget ran out still reports: at most
        # one more per trial running at once (2 on the session's 2-CPU Ray).
        assert 0 < r["spent_trial_epochs"] <= record["size"]["budget"] + 1
        assert 0 <= r["best_val_accuracy"] <= 1
    assert record["machine"]["cpu_count"] and "| pbt | 1 |" in record["table"]
    assert "| method |" in capsys.readouterr().out
