"""The training loop end to end on both paths: Ray Train's local mode (one process, no
workers) and a local Ray with 2 CPU workers (DDP over gloo)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from cnnray.checkpoint import load_model
from cnnray.config import TrainConfig
from cnnray.train.best_checkpoint import pick_best
from cnnray.train.driver import run_training
from cnnray.train.epoch import evaluate
from cnnray.train.worker_data import held_out_batches
from tests.helpers.processes import registered_checkpoints

# A subset big enough that accuracy clearly rises, small enough for seconds per epoch.
SMOKE = dict(model="cnn", dataset="mnist", workers=2, subset=3000, batch_size=64, lr=0.05, seed=0)
# Every training test runs on both paths: local mode, and Ray Train's worker actors.
PATHS = {"local_mode": dict(workers=1, local_mode=True), "ray_train": dict(workers=2, local_mode=False)}


@pytest.fixture(scope="module", params=list(PATHS), ids=list(PATHS))
def finished_run(request, local_ray, mnist_dir, tmp_path_factory):
    """One finished 3-epoch run per path, shared by the tests that read or rerun it:
    (path, its config, run_training's summary)."""
    path = PATHS[request.param]
    out = tmp_path_factory.mktemp(request.param) / "run"
    cfg = TrainConfig(**{**SMOKE, **path}, data_dir=str(mnist_dir), epochs=3, out=str(out))
    return path, cfg, run_training(cfg)


def test_training_learns_and_checkpoint_round_trips(finished_run):
    path, cfg, summary = finished_run
    out = Path(cfg.out)
    result = json.loads((out / "result.json").read_text())
    for key in ("model", "dataset", "epochs", "workers", "test_accuracy", "best_val_accuracy",
                "train_seconds", "samples_per_second", "checkpoint"):
        assert key in result, key
    assert result["workers"] == path["workers"] and result["epochs"] == 3
    assert result["local_mode"] is path["local_mode"]
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(h["world_size"] == path["workers"] for h in history)
    # The same layout on both paths: Ray's run folder, the kept checkpoints (best 2 and the
    # latest) listed in its snapshot, result.json pointing into it.
    run_dir = out / "ray" / "run"
    kept = registered_checkpoints(run_dir)
    assert "epoch-0003" in kept and len(kept) <= 3
    assert {p.name for p in run_dir.glob("epoch-*")} == kept
    assert result["last_checkpoint"].endswith("epoch-0003") and result["run_path"].endswith("ray/run")
    assert history[-1]["val_accuracy"] > history[0]["val_accuracy"] or history[0]["val_accuracy"] > 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result["test_accuracy"] > 0.85  # a 3000-image subset, 3 epochs

    # The best checkpoint rebuilds the model without the training code and reproduces
    # the reported test accuracy offline.
    model, meta = load_model(summary["checkpoint"])
    assert meta["data"]["classes"] == [str(i) for i in range(10)]
    assert meta["model"]["args"]["image_size"] == [28, 28]
    stats = evaluate(model, held_out_batches(cfg, torch.device("cpu")), torch.device("cpu"))
    assert stats.accuracy == pytest.approx(result["test_accuracy"])
    # The workers measured it (each on its shard of the test set), on the best epoch.
    assert history[-1]["test_epoch"] == result["best_epoch"] == meta["epoch"]
    assert history[-1]["test_samples"] == stats.count


def test_pick_best_prefers_the_epoch_the_workers_named():
    ckpts = [("c1", {"epoch": 1, "val_accuracy": 0.9}), ("c2", {"epoch": 2, "val_accuracy": 0.95}),
             ("c3", {"epoch": 3, "val_accuracy": 0.95})]
    test = {"test_accuracy": 0.96, "test_loss": 0.2, "test_samples": 100}
    # A tie on validation: the workers name the first epoch that reached it, and tested it.
    assert pick_best(ckpts, {"best_epoch": 2, "test_epoch": 2, **test}) == ("c2", ckpts[1][1], test)
    # The named epoch is not among the kept ones: the best kept one, to be tested by the driver.
    assert pick_best(ckpts[2:], {"best_epoch": 2, "test_epoch": 2, **test}) == ("c3", ckpts[2][1], None)
    # No test in the last report (Tune trials, or a resume past the best epoch).
    assert pick_best(ckpts, {"best_epoch": 3}) == ("c3", ckpts[2][1], None)
    assert pick_best(ckpts, {}) == ("c2", ckpts[1][1], None)


def test_existing_run_needs_resume(finished_run):
    """The same command again on a finished run's folder is refused (it ran after the
    round-trip test above, which reads that run)."""
    from cnnray.config import ConfigError

    _, cfg, _ = finished_run
    with pytest.raises(ConfigError, match="pass --resume"):
        run_training(cfg)


@pytest.mark.parametrize("first, then", [("local_mode", "ray_train"), ("ray_train", "local_mode")])
def test_resume_continues_a_run_the_other_path_started(local_ray, mnist_dir, tmp_path, first, then):
    """Both paths keep one checkpoint layout: either resumes what the other one began."""
    # A constant schedule: one-cycle fixes its length at the first run's epochs.
    base = dict(SMOKE, subset=1000, schedule="constant", data_dir=str(mnist_dir), out=str(tmp_path / "run"))
    run_training(TrainConfig(**{**base, **PATHS[first]}, epochs=1))
    summary = run_training(TrainConfig(**{**base, **PATHS[then]}, epochs=2, resume=True))
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["start_epoch"] == 1 and history[-1]["world_size"] == PATHS[then]["workers"]


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # Name this test's own cluster: other Ray instances may run on the machine.
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [a.pid for a in actors if a.pid]


def test_killed_worker_resumes_from_last_checkpoint(local_ray, mnist_dir, tmp_path):
    """SIGKILL one DDP worker after the first checkpoint: Ray Train restarts the group,
    which continues from the last checkpoint instead of epoch 0. (Ray Train workers only:
    local mode has no workers to kill and no retries; a killed local-mode run continues
    with --resume, tested in test_cli.)"""
    # 4 epochs: the kill comes after the first checkpoint, with 3 epochs still to run.
    cfg = TrainConfig(**{**SMOKE, "subset": 8000}, data_dir=str(mnist_dir), epochs=4,
                      out=str(tmp_path / "run"), max_failures=2)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("summary", run_training(cfg)), daemon=True)
    thread.start()
    run_dir = tmp_path / "run" / "ray" / "run"
    deadline = time.time() + 180
    while "epoch-0001" not in registered_checkpoints(run_dir):
        assert time.time() < deadline and thread.is_alive(), "no first checkpoint"
        time.sleep(0.1)
    pids = _train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    summary = box["summary"]
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # The epochs after the kill ran in a new attempt that started from a checkpoint.
    assert history[-1]["start_epoch"] >= 1
    assert history[0]["start_epoch"] == 0


@pytest.mark.slow
def test_real_mnist_cnn_reaches_98_5(local_ray, mnist_dir, tmp_path):
    cfg = TrainConfig(model="cnn", dataset="mnist", data_dir=str(mnist_dir), epochs=3, workers=2,
                      out=str(tmp_path / "run"))
    summary = run_training(cfg)
    assert summary["test_accuracy"] >= 0.985


@pytest.mark.slow
def test_real_cifar10_tarball_trains(local_ray, cifar_tarball, tmp_path):
    """The shared CIFAR-10 JPEG tarball goes through --dataset cifar10 (crop+flip on)."""
    cfg = TrainConfig(model="tutorial_cnn", dataset="cifar10", data_dir=str(cifar_tarball), epochs=2,
                      workers=2, subset=10000, lr=0.05, out=str(tmp_path / "run"))
    summary = run_training(cfg)
    model, meta = load_model(summary["checkpoint"])
    assert meta["data"]["classes"][:3] == ["airplane", "automobile", "bird"]
    assert meta["data"]["input_shape"] == [3, 32, 32]
    assert summary["test_accuracy"] > 0.25  # well above chance (0.10) after 2 short epochs


# --- issue 13: never hang, never keep NaN weights, train a finished run longer ---------------


def _run_with_deadline(cfg: TrainConfig, seconds: float = 300) -> dict:
    """run_training in a thread: a hang fails the test instead of blocking the suite."""
    box: dict = {}

    def target():
        try:
            box["summary"] = run_training(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"training still running after {seconds} s: hung in a collective?"
    if "error" in box:
        raise box["error"]
    return box["summary"]


def test_tiny_batchnorm_run_finishes_and_trains_longer_on_resume(local_ray, mnist_dir, tmp_path):
    """Issue 13's examples 1 and 2: `--norm batch --subset 10 --workers 2 --batch-size 8`
    leaves one validation example, so rank 1 has no validation batch: it hung until the
    process-group timeout. Then `--epochs 2 --resume` of that finished 1-epoch run failed
    ("Tried to step 22 times"), retried, exit 1."""
    from cnnray.config import ConfigError

    # Batches of 4 (2 per worker), not the 8: with 8, the first run is 1 one-cycle
    # step, whose only rate is ~0, now refused before Ray starts (tests/train/test_sizes.py).
    base = dict(model="cnn", norm="batch", dataset="mnist", data_dir=str(mnist_dir), subset=10, workers=2,
                batch_size=4, out=str(tmp_path / "run"))
    first = _run_with_deadline(TrainConfig(**base, epochs=1))
    assert [h["epoch"] for h in first["history"]] == [1]
    assert first["history"][0]["val_accuracy"] in (0.0, 1.0)  # one validation example, counted once

    longer = _run_with_deadline(TrainConfig(**base, epochs=3, resume=True))
    history = longer["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[1]["start_epoch"] == 1 and longer["epochs"] == 3
    # After the resume the rates are those of a fresh 3-epoch schedule (2 steps an epoch:
    # 9 training examples, 4 per worker, batches of 2), not of the 1-epoch one.
    from torch import nn

    from cnnray.train.optim import build_optimizer, build_scheduler

    fresh_cfg = TrainConfig(**base, epochs=3)
    opt = build_optimizer(fresh_cfg, nn.Linear(2, 2), torch.device("cpu"))
    sched = build_scheduler(fresh_cfg, opt, steps_per_epoch=2)
    expected = []
    for _ in range(3):
        for _ in range(2):
            opt.step()
            sched.step()
        expected.append(opt.param_groups[0]["lr"])
    assert [h["lr"] for h in history[1:]] == pytest.approx(expected[1:])  # epoch 1 ran the 1-epoch one

    # Nothing left to train: refused before Ray Train runs.
    with pytest.raises(ConfigError, match="has already trained 3 epoch"):
        run_training(TrainConfig(**base, epochs=3, resume=True))


def test_diverged_run_stops_with_one_line_and_keeps_no_nan_checkpoint(local_ray, mnist_dir, tmp_path):
    """Issue 13, example 4: at lr 100 the loss becomes NaN in the first epoch. On main the
    run trained on and exported the NaN weights as its best checkpoint."""
    from cnnray.errors import TrainingError

    cfg = TrainConfig(**{**SMOKE, "subset": 2000, "lr": 100.0}, data_dir=str(mnist_dir), epochs=2,
                      out=str(tmp_path / "run"))
    with pytest.raises(TrainingError) as info:
        _run_with_deadline(cfg)
    message = str(info.value)
    assert message.startswith("training diverged in epoch 1: the training loss became non-finite at step ")
    assert "learning rate" in message and "\n" not in message
    assert not registered_checkpoints(tmp_path / "run" / "ray" / "run")  # no epoch was kept
    assert not (tmp_path / "run" / "result.json").exists()
