"""The `cnnray` command line as a user meets it: exit codes, one-line errors, --resume.

Argument handling runs in this process (`cnnray.cli.main(argv)`, tests/helpers/cli.py);
one test per behaviour that needs the real program runs it as a process."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from tests.helpers.cli import assert_one_line_exit_2, cnnray_process, run_cli
from tests.helpers.processes import registered_checkpoints, spawn_cnnray


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # as the program is run: never join another Ray


def test_models_json_lists_every_model_with_vgg19_table_total(capsys):
    code, out, err = run_cli(capsys, "models", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    from cnnray.models import list_models

    assert set(rows) == set(list_models())
    assert rows["vgg19_imagenet"]["parameters"] == 143_667_240
    assert rows["vgg19_imagenet"]["input_shape"] == [3, 224, 224]
    assert rows["cnn"]["input_shape"] == [1, 28, 28]


def test_models_table(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    assert "vgg19_imagenet" in out and "143,667,240" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--model", "alexnet"], "unknown model 'alexnet'"),
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--epochs", "-1"], "argument --epochs: '-1' is not in [1, 100000]"),
        (["train", "--epochs", "three"], "argument --epochs: expected an integer, got 'three'"),
        (["train", "--lr", "0"], "argument --lr: '0' is not in (0, 100]"),
        (["train", "--norm", "instance"], "unknown norm 'instance'"),
        (["train", "--frobnicate"], "unrecognized arguments"),
        (["train", "--local-mode", "--workers", "2"], "local_mode=True trains in one process"),
        (["train", "--config", "/nonexistent/c.yaml"], "cannot read config file"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, fragment, capsys):
    assert_one_line_exit_2(run_cli(capsys, *args), fragment)


def test_a_refusal_through_the_program_is_exit_2_one_line_and_no_traceback():
    """The in-process checks above through the real entry point once: `python -m cnnray.cli`
    exits 2 with the one line on stderr and nothing else."""
    proc = cnnray_process("train", "--model", "alexnet")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unknown model 'alexnet'" in lines[0] and proc.stdout == "", lines


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: cnn\nlearning_rate: 0.1\n")
    assert_one_line_exit_2(run_cli(capsys, "train", "--config", str(path)), "unknown config key 'learning_rate'")


def test_unreadable_data_dir(tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("hello")
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    result = run_cli(capsys, "train", "--data-dir", str(not_a_dir), "--no-download", "--out", str(tmp_path / "o"))
    assert_one_line_exit_2(result, str(not_a_dir))


def test_missing_data_offline_names_expected_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    result = run_cli(capsys, "train", "--data-dir", str(tmp_path / "empty"), "--no-download",
                     "--out", str(tmp_path / "o"))
    assert_one_line_exit_2(result, "train-images-idx3-ubyte")


@pytest.mark.parametrize("workers", ["1", "2"], ids=["local_mode", "ray_train"])
def test_stopped_run_continues_with_resume(mnist_dir, tmp_path, workers, capsys, monkeypatch):
    """Interrupt a real `cnnray train` after its second checkpoint, then rerun the same
    command with --resume: it continues from that epoch instead of starting over. One
    worker runs in local mode (the default), two on Ray Train workers. 4 epochs: the
    interrupt comes with two still to run."""
    out = tmp_path / "run"
    args = ["train", "--model", "cnn", "--data-dir", str(mnist_dir), "--subset", "6000", "--workers", workers,
            "--batch-size", "64", "--epochs", "4", "--out", str(out)]
    proc = spawn_cnnray(args, tmp_path / "cache")
    try:
        deadline = time.time() + 240
        while "epoch-0002" not in registered_checkpoints(out / "ray" / "run"):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no second checkpoint in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "result.json").exists()  # it really stopped before the end

    # The same command again is refused before anything runs: in this process.
    monkeypatch.setenv("CNNRAY_DATA", str(tmp_path / "cache"))
    assert_one_line_exit_2(run_cli(capsys, *args), "pass --resume")

    resumed = cnnray_process(*args, "--resume", env_extra={"CNNRAY_DATA": str(tmp_path / "cache")})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    result = json.loads((out / "result.json").read_text())
    epochs = [h["epoch"] for h in result["history"]]
    assert epochs == [1, 2, 3, 4]
    assert result["history"][-1]["start_epoch"] >= 2
    assert "resumed from the checkpoint of epoch" in resumed.stdout + resumed.stderr
    assert "[cnnray] epoch 4/4" in resumed.stdout + resumed.stderr  # the progress lines, both paths


def test_the_program_skips_the_exit_collections_and_a_python_caller_keeps_them(monkeypatch, capsys):
    """`cnnray` run as a program freezes the objects left at exit (CPython's last
    collections would walk everything torch imported: ~1 CPU-s); called from Python
    (argv given: tests, notebooks) it leaves the caller's garbage collector alone."""
    import gc
    from types import SimpleNamespace

    from cnnray.cli import main

    registered = []  # cnnray.cli's own exit handlers (the process's real atexit is untouched)
    monkeypatch.setattr("cnnray.cli.atexit", SimpleNamespace(register=registered.append))
    assert main(["models", "--json"]) == 0
    assert registered == []
    monkeypatch.setattr(sys, "argv", ["cnnray", "models", "--json"])
    assert main() == 0
    assert registered == [gc.freeze]
    capsys.readouterr()
