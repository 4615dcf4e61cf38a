"""A job resubmitted with --resume and no --out continues the run it stopped, not a new one
(jobs/_defaults.py: earlier_run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

JOBS = REPO / "jobs"


def _defaults():
    spec = importlib.util.spec_from_file_location("jobs_defaults_resume", JOBS / "_defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_folder(runs: Path, name: str, *, claimed: bool = True, final: str | None = None) -> Path:
    d = runs / name
    d.mkdir(parents=True)
    if claimed:
        (d / ".cnnray-run").write_text("{}")
    if final:
        (d / final).write_text("{}")
    return d


def _out(argv: list[str]) -> Path:
    return Path(argv[argv.index("--out") + 1])


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNRAY_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("CNNRAY_STORAGE", raising=False)
    return tmp_path / "runs"


def test_resume_without_out_continues_the_newest_unfinished_run_of_the_config(runs):
    d = _defaults()
    _run_folder(runs, "mnist_cnn-20261201-100000-aaaaaa", final="result.json")  # finished, older
    stopped = _run_folder(runs, "mnist_cnn-20261201-110000-bbbbbb")  # the stopped job
    _run_folder(runs, "mnist_cnn-20261201-120000-cccccc", final="result.json")  # finished after it
    _run_folder(runs, "mnist_cnn-20261201-130000-dddddd", claimed=False)  # holds no run
    _run_folder(runs, "mnist_fnn-20261201-140000-eeeeee")  # another config
    argv = d.with_run_defaults("train", ["--config", "jobs/configs/mnist_cnn.yaml", "--resume"])
    assert _out(argv) == stopped
    # Without --resume (or with --no-resume last) a job starts a run of its own.
    for flags in ([], ["--resume", "--no-resume"]):
        out = _out(d.with_run_defaults("train", ["--config", "jobs/configs/mnist_cnn.yaml", *flags]))
        assert out.parent == runs and not out.exists()


def test_resume_of_finished_runs_takes_the_newest(runs):
    d = _defaults()
    _run_folder(runs, "mnist_cnn-20261201-100000-aaaaaa", final="result.json")
    newest = _run_folder(runs, "mnist_cnn-20261202-090000-ffffff", final="result.json")
    argv = d.with_run_defaults("train", ["--config", "jobs/configs/mnist_cnn.yaml", "--resume", "--epochs", "5"])
    assert _out(argv) == newest


def test_resume_with_no_earlier_run_starts_one(runs):
    d = _defaults()
    out = _out(d.with_run_defaults("train", ["--config", "jobs/configs/mnist_cnn.yaml", "--resume"]))
    assert out.parent == runs and out.name.startswith("mnist_cnn-")


def test_a_sweep_resumes_its_newest_unfinished_folder(runs):
    d = _defaults()
    if not d.subcommand_options("tune"):
        pytest.skip("`cnnray tune` is not registered in this version")
    _run_folder(runs, "space-20261201-100000-aaaaaa", final="best.json")
    stopped = _run_folder(runs, "space-20261201-110000-bbbbbb")
    argv = d.with_run_defaults("tune", ["--space", "/x/space.yaml", "--resume"])
    assert _out(argv) == stopped


@pytest.mark.slow
def test_a_resubmitted_job_continues_its_run(runs, mnist_dir, data_cache):
    """Two real submissions of jobs/train.py (local mode: one worker, no Ray): the second,
    with --resume and more epochs, continues the first's run folder from its checkpoint."""
    base = [sys.executable, str(JOBS / "train.py"), "--config", str(JOBS / "configs" / "mnist_cnn.yaml"),
            "--data-dir", str(mnist_dir), "--workers", "1", "--subset", "1000", "--no-report"]
    env = {**os.environ, "CNNRAY_RUNS": str(runs), "PYTHONPATH": str(REPO)}
    first = subprocess.run([*base, "--epochs", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (folder,) = runs.iterdir()
    time.sleep(1.1)  # a new job a second later would get a new time stamp
    second = subprocess.run([*base, "--epochs", "2", "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"[jobs] --resume: continuing {folder}" in second.stderr
    assert "resumed from the checkpoint of epoch 1" in second.stdout
    assert "starting a new one" not in second.stdout + second.stderr
    assert [p.name for p in runs.iterdir()] == [folder.name]
