"""Errors that point to the fix, and failed commands that leave nothing behind."""

from __future__ import annotations

import json


from cnnray.cli import main
from tests.robustness.helpers import save_model


def _run_folder(root, moved_from=None):
    """A training run folder as `cnnray train --out root` leaves it: result.json naming the
    best of two checkpoints under ray/<name>/."""
    best = save_model(root / "ray" / "x" / "epoch-0002", seed=2)
    save_model(root / "ray" / "x" / "epoch-0003", seed=3)
    named = str(best) if moved_from is None else str(moved_from / "ray" / "x" / "epoch-0002")
    (root / "result.json").write_text(json.dumps({"checkpoint": named, "best_epoch": 2}))
    return best


def _served_path(run) -> str:
    from cnnray.serve.engine import resolve_models
    from cnnray.serve.schemas import ServeArgs

    return resolve_models(ServeArgs(checkpoints={"mnist": str(run)}))["mnist"].path


def test_serve_a_run_folder_serves_its_best_checkpoint(tmp_path, capsys):
    best = _run_folder(tmp_path / "runs" / "mnist-cnn")
    assert _served_path(tmp_path / "runs" / "mnist-cnn") == str(best)
    code = main(["serve", "--checkpoint", str(tmp_path / "runs" / "mnist-cnn"), "--name", "mnist", "--print-config"])
    assert code == 0, capsys.readouterr().err


def test_a_moved_run_folder_still_finds_its_best(tmp_path):
    best = _run_folder(tmp_path / "here", moved_from=tmp_path / "elsewhere")
    assert _served_path(tmp_path / "here") == str(best)


def test_a_folder_of_checkpoints_names_one_to_pass(tmp_path, capsys):
    _run_folder(tmp_path / "run")
    (tmp_path / "run" / "result.json").unlink()  # an interrupted run: checkpoints, no result
    code = main(["serve", "--checkpoint", str(tmp_path / "run"), "--name", "mnist", "--print-config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "holds 2 checkpoint(s): pass one, e.g. --checkpoint " in err[0] and "epoch-000" in err[0]


def test_mistyped_data_dir_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    from cnnray.data import download

    def offline(urls, dest, md5):
        raise download.DownloadFailed(dest.name, ["no network here"])

    monkeypatch.setattr(download, "fetch", offline)
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "mnst"), "--local-mode",
                 "--epochs", "1", "--out", str(tmp_path / "runs" / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"{tmp_path / 'mnst'} did not exist (check --data-dir" in err[0]
    assert not (tmp_path / "mnst").exists()  # no folder, no .lock
    assert not (tmp_path / "runs").exists()  # nor the run folder the failed run claimed


def test_a_failed_run_keeps_folders_that_existed(tmp_path, monkeypatch):
    from cnnray.data import download

    monkeypatch.setattr(download, "fetch", lambda *a: (_ for _ in ()).throw(download.DownloadFailed("x", ["off"])))
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    (tmp_path / "runs").mkdir()
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--local-mode",
                 "--out", str(tmp_path / "runs")]) == 2
    assert (tmp_path / "data").is_dir() and (tmp_path / "runs").is_dir()


def test_replicas_auto_help_says_what_the_code_does(monkeypatch):
    import argparse

    import ray

    from cnnray.cli import build_parser
    from cnnray.serve.app import auto_replicas
    from cnnray.serve.schemas import ServeArgs

    parser = build_parser()
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    text = " ".join(next(a.help for a in serve._actions if "--replicas" in a.option_strings).split())
    # The code: the cluster's CPUs / --cpus-per-replica, no core held back (2 replicas on 2 cores).
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert auto_replicas(ServeArgs()) == 2
    assert auto_replicas(ServeArgs(cpus_per_replica=0.5)) == 4
    assert "one core for HAProxy" not in text and "no core is held back" in text
    assert "divided by --cpus-per-replica" in text
