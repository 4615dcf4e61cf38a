"""Sizes that cannot train are refused before Ray starts and before any data is decoded,
with one line and exit 2, from one place (cnnray.train.sizes) that train, tune and the job
wrappers share. No test here starts Ray or reads the shared datasets: the registry
datasets are checked on their nominal sizes, and every data loader is made to fail."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from cnnray.config import SCHEDULES, ConfigError, TrainConfig
from cnnray.models import get_model_spec, list_models, resolve_model_args
from cnnray.train import sizes
from cnnray.train.sizes import DataSizes, Plan, check_model_input, check_schedule, check_sizes

from tests.helpers.cli import run_cli


@pytest.fixture
def no_ray_no_data(monkeypatch):
    """Ray never starts and no dataset is loaded: a refusal must come before both."""

    def refuse(*args, **kwargs):
        raise AssertionError("reached Ray start-up or the data loader")

    monkeypatch.setattr("cnnray.train.driver.init_ray", refuse)
    monkeypatch.setattr("cnnray.train.worker_data.load_for", refuse)
    monkeypatch.setattr("cnnray.tune.sweep.init_ray", refuse, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _train(argv, tmp_path, capsys) -> tuple[int, list[str]]:
    """`cnnray train` in this process (tests/helpers/cli.py): exit status, stderr's lines."""
    code, _, lines = run_cli(capsys, "train", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                             "--no-report", *argv)
    return code, lines


# --- the examples, through the CLI ------------------------------------------------


def test_mlp_batch_norm_batch_of_one_is_refused_in_local_mode(tmp_path, capsys, no_ray_no_data):
    code, lines = _train(["--model", "mlp", "--norm", "batch", "--batch-size", "1"], tmp_path, capsys)
    assert code == 2
    (line,) = lines
    assert line.startswith("cnnray: error: --batch-size 1 over 1 worker(s)") and "--batch-size 2 or more" in line
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


def test_two_workers_batch_of_two_is_refused_before_ray(tmp_path, capsys, no_ray_no_data):
    code, lines = _train(["--model", "mlp", "--norm", "batch", "--workers", "2", "--batch-size", "2"], tmp_path, capsys)
    assert code == 2
    (line,) = lines
    assert "is 1 image per worker" in line and "--batch-size 4 or more" in line


def test_onecycle_with_four_steps_is_refused_not_divided_by_zero(tmp_path, capsys, no_ray_no_data):
    # 300 examples, 30 held out: 270 // 64 = 4 steps, where OneCycleLR divides by zero.
    code, lines = _train(["--subset", "300", "--epochs", "1", "--batch-size", "64"], tmp_path, capsys)
    assert code == 2
    (line,) = lines
    assert line.startswith("cnnray: error: --schedule onecycle cannot run 4 optimizer step(s) (1 epoch(s) x 4 per epoch)")
    assert "divides by zero" in line


# --- batch norm, per model ------------------------------------------------------------------


def _cpu_step_fails(name: str, norm: str, shape: tuple[int, int, int], batch: int) -> bool:
    """Whether a real training forward pass of `batch` images raises torch's batch-norm error."""
    torch.manual_seed(0)
    net = get_model_spec(name).fn(**resolve_model_args(name, in_channels=shape[0], image_size=list(shape[1:]),
                                                       norm=norm)).train()
    try:
        net(torch.randn(batch, *shape))
    except ValueError as e:
        assert "more than 1 value per channel" in str(e)
        return True
    return False


SMALL_MODELS = [m for m in list_models() if "batch" in get_model_spec(m).norms and "imagenet" not in m and
                not m.startswith(("vgg13", "vgg16", "vgg19"))]  # the big VGGs: same layers as vgg11, 10x the cost


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_batch_norm_check_agrees_with_a_real_training_step(name):
    """The meta-device check refuses a batch of one exactly when a real step would fail, at
    the smallest input the model takes (1x1 maps at the last layers, where it matters; real
    steps at the models' default sizes cost seconds each on a loaded CI machine)."""
    spec = get_model_spec(name)
    for side in (_smallest_side(name),):
        shape = (spec.in_channels, side, side)
        cfg = TrainConfig(model=name, norm="batch", batch_size=1, dataset="cifar10")
        fails = _cpu_step_fails(name, "batch", shape, 1)
        if fails:
            with pytest.raises(ConfigError, match="batch norm needs more than one value per channel"):
                check_model_input(cfg, shape, 10)
        else:
            check_model_input(cfg, shape, 10)
        assert not _cpu_step_fails(name, "batch", shape, 2)  # the fix the message gives works
        check_model_input(cfg.replace(batch_size=2), shape, 10)


def _smallest_side(name: str) -> int:
    for side in range(1, 65):
        try:
            resolve_model_args(name, image_size=[side, side], norm=get_model_spec(name).norms[-1])
            return side
        except ValueError:
            continue
    raise AssertionError(f"{name} takes no image up to 64x64")


@pytest.mark.parametrize("name", list_models())
def test_images_too_small_for_the_model_are_refused(name):
    spec = get_model_spec(name)
    cfg = TrainConfig(model=name, norm=spec.default_norm, dataset="imagefolder")
    side = _smallest_side(name)  # the lecture's floor((x + 2p - f) / s) + 1 stays >= 1 from here
    check_model_input(cfg.replace(batch_size=2), (3, side, side), 10)
    if side == 1:
        return  # it takes any size (the mlp; resnet18 pools adaptively)
    with pytest.raises(ConfigError, match=f"model '{name}' cannot take the imagefolder images \\(3x{side - 1}x{side - 1}\\)"):
        check_model_input(cfg, (3, side - 1, side - 1), 10)


def test_an_elastic_runs_smallest_share_is_checked():
    # 2 images over 1-2 workers: fine at 1, one image each at 2.
    cfg = TrainConfig(model="mlp", norm="batch", batch_size=2, min_workers=1, workers=2)
    with pytest.raises(ConfigError, match="--batch-size 2 over 2 worker"):
        check_sizes(cfg, DataSizes("mnist", 60_000, 10_000, (1, 28, 28)))


# --- schedules -------------------------------------------------------------------------------


def _run_schedule(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    from cnnray.train.optim import build_optimizer, build_scheduler

    net = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, net, torch.device("cpu"))
    sched = build_scheduler(cfg, opt, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0])
def test_every_schedule_that_passes_the_check_runs_and_learns(schedule, warmup_epochs):
    """For 1..12 steps: refused, or every step runs with a learning rate well above 0."""
    for steps_per_epoch in (1, 2, 3, 4, 5, 6):
        for epochs in (1, 2):
            cfg = TrainConfig(schedule=schedule, epochs=epochs, warmup_epochs=warmup_epochs)
            plan = Plan(steps_per_epoch, steps_per_epoch * epochs)
            try:
                check_schedule(cfg, plan)
            except ConfigError:
                continue
            lrs = _run_schedule(cfg, steps_per_epoch)
            assert len(lrs) == plan.total_steps and all(math.isfinite(lr) for lr in lrs), (plan, lrs)
            assert max(lrs) > 1e-3 * cfg.lr, (plan, lrs)  # some step learns


def test_onecycle_of_one_or_four_steps_cannot_run():
    """Why they are refused: 4 steps cannot be stepped at all, 1 step has a rate of ~0."""
    cfg = TrainConfig(schedule="onecycle", epochs=1)
    with pytest.raises(ZeroDivisionError):
        _run_schedule(cfg, 4)
    assert _run_schedule(cfg, 1)[0] < 1e-5 * cfg.lr
    for steps in (1, 4):
        with pytest.raises(ConfigError, match=f"--schedule onecycle cannot run {steps} optimizer step"):
            check_schedule(cfg, Plan(steps, steps))
    for steps in (2, 3, 5):
        check_schedule(cfg, Plan(steps, steps))


def test_a_warm_up_as_long_as_the_run_is_refused():
    cfg = TrainConfig(schedule="cosine", epochs=2, warmup_epochs=2)
    with pytest.raises(ConfigError, match="--warmup-epochs 2 is 10 step\\(s\\), the whole run"):
        check_schedule(cfg, Plan(5, 10))
    check_schedule(cfg.replace(epochs=3), Plan(5, 15))


# --- splits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"subset": 10, "val_fraction": 0.01}, "the validation split is empty"),
        ({"subset": 300, "batch_size": 300}, "270 training examples over 1 worker\\(s\\) give no full batch of 300"),
        ({"subset": 300, "batch_size": 300, "workers": 2}, "270 training examples over 2 worker\\(s\\) give no full batch of 150"),
    ],
)
def test_splits_without_a_full_batch_or_a_validation_example_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_sizes(TrainConfig(**changes), DataSizes("mnist", 60_000, 10_000, (1, 28, 28)))


def test_an_image_folder_is_checked_from_its_listing_without_decoding(tmp_path, capsys, no_ray_no_data):
    """An image folder of 8x8 images is too small for vgg11: refused from the listing and the
    first image (the loader, which would decode every file, is never called)."""
    from PIL import Image

    for split, n in (("train", 40), ("test", 10)):
        for cls in ("a", "b"):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(d / f"{i}.png")
    code, lines = _train(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--model", "vgg11",
                          "--batch-size", "8"],
                         tmp_path, capsys)
    assert code == 2
    assert lines[-1].startswith("cnnray: error: model 'vgg11' cannot take the imagefolder images (3x8x8)")


# --- tune and the job wrapper use the same check -----------------------------------------


def test_a_sweep_with_an_impossible_point_is_refused_before_ray(tmp_path, capsys, no_ray_no_data):
    from cnnray.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("batch_size: {choice: [64, 128]}\nlr: {choice: [0.05, 0.1]}\n")
    code = main(["tune", "--model", "cnn", "--subset", "300", "--epochs", "2", "--space", str(space),
                 "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "sweep")])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2
    # 128: 2 steps an epoch, 4 in all; 64 (8 steps) alone would run.
    assert line.startswith("cnnray: error: batch_size=128, lr=0.05: --schedule onecycle cannot run 4 optimizer")
    assert not (tmp_path / "sweep").exists()


def test_the_train_job_refuses_through_the_same_check(tmp_path, capsys, no_ray_no_data, monkeypatch):
    from tests.helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    monkeypatch.setenv("CNNRAY_RUNS", str(tmp_path / "runs"))
    sys.modules.pop("train", None)
    import train as job  # jobs/train.py

    code = job.main(["--model", "mlp", "--norm", "batch", "--batch-size", "1", "--data-dir", str(tmp_path / "d")])
    assert code == 2
    assert "is 1 image per worker" in capsys.readouterr().err


# --- too few steps to learn -------------------------------------------------------------------


def test_too_few_steps_warn_with_the_numbers_and_a_fix():
    cfg = TrainConfig(epochs=3, batch_size=128)
    line = sizes.few_steps_warning(cfg, Plan(4, 12))  # the 2 x 300 PNG folder of the issue
    assert line.startswith("[cnnray] warning: only 12 optimizer steps (3 epoch(s) x 4 per epoch at global batch 128)")
    assert "--epochs 25 or more" in line
    assert sizes.few_steps_warning(cfg, Plan(421, 1263)) is None  # MNIST's defaults


def test_classes_without_a_training_example_are_named():
    labels = torch.tensor([0, 1] * 50)  # class "c" has no example at all
    line = sizes.missing_classes_warning(TrainConfig(), labels, ["a", "b", "c"])
    assert line.startswith("[cnnray] warning: 1 of 3 classes have no training example") and "(c)" in line
    # --subset 10 of ten balanced classes: 9 training examples cannot cover 10 classes.
    ten = torch.arange(10).repeat(100)
    line = sizes.missing_classes_warning(TrainConfig(subset=10), ten, [str(i) for i in range(10)])
    assert line is not None and "after --subset 10 and --val-fraction 0.1" in line
    assert sizes.missing_classes_warning(TrainConfig(subset=500), ten, [str(i) for i in range(10)]) is None
