"""Searchers, schedulers, budgets, fractional GPUs and inert fields, without Ray running."""

from __future__ import annotations

import pytest
import torch

from cnnray.cli import main
from cnnray.config import ConfigError, TrainConfig
from cnnray.tune.space import Dist, check_space, parse_space


@pytest.fixture
def no_sweep(monkeypatch):
    import cnnray.tune.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "run_sweep", lambda sweep: pytest.fail("the sweep would start its trials"))


def _one_line_exit_2(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals (an unknown choice)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- the space on Optuna, and seeded proposals -------------------------------------------
SPACE = {"lr": Dist("loguniform", (1e-3, 0.5)), "momentum": Dist("uniform", (0.5, 0.99)),
         "norm": Dist("choice", ("none", "batch"))}


def test_space_maps_onto_optuna_distributions():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from cnnray.tune.search import tune_space

    dists = OptunaSearch.convert_search_space(tune_space("optuna", SPACE))
    assert dists["lr"] == optuna.distributions.FloatDistribution(1e-3, 0.5, log=True)
    assert dists["momentum"] == optuna.distributions.FloatDistribution(0.5, 0.99)
    assert dists["norm"] == optuna.distributions.CategoricalDistribution(("none", "batch"))


def _proposals(seed: int, n: int = 14) -> list[dict]:
    """n configs from the sweep's Optuna searcher, each result fed back before the next."""
    from cnnray.tune.search import make_searcher, tune_space

    searcher = make_searcher("optuna", seed, max_concurrent=2)
    assert searcher.set_search_properties("val_accuracy", "max", tune_space("optuna", SPACE))
    configs = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        configs.append(config)
        # A deterministic "accuracy": TPE's proposals past its random start-up depend on it.
        searcher.on_trial_complete(f"t{i}", {"val_accuracy": -abs(config["lr"] - 0.05) + 0.1 * (config["norm"] == "batch")})
    return configs


def test_optuna_with_the_same_seed_proposes_the_same_configs():
    first, again, other = _proposals(0), _proposals(0), _proposals(1)
    assert first == again  # past Optuna's 10 random start-up trials too (14 proposals)
    assert first != other
    for c in first:
        assert 1e-3 <= c["lr"] <= 0.5 and 0.5 <= c["momentum"] <= 0.99 and c["norm"] in ("none", "batch")


# --- bad sweeps, before Ray starts ------------------------------------------------------------
def _sweep(**kw):
    from cnnray.tune.sweep import SweepConfig

    train = kw.pop("train", TrainConfig(epochs=4))
    return SweepConfig(train=train, **{"space": SPACE, "samples": 4, **kw})


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(search="bayes"), "unknown search 'bayes'; choose one of: random, grid, optuna"),
        (dict(scheduler="median"), "unknown scheduler 'median'; choose one of: asha, hyperband, pbt, none"),
        (dict(search="optuna", space={"lr": Dist("grid", (0.1, 0.01))}), "--search optuna proposes every value itself: lr is a grid"),
        (dict(search="optuna", space={"hidden_sizes": Dist("choice", ((8,), (16,)))}, train=TrainConfig(model="mlp", epochs=4)),
         "hidden_sizes's choices must be numbers, strings or booleans"),
        (dict(search="grid"), "--search grid enumerates values: lr, momentum is a range"),
        (dict(scheduler="pbt"), "scheduler pbt cannot perturb norm mid-run"),
        (dict(scheduler="pbt", space={"model": Dist("choice", ("cnn", "lenet5"))}), "scheduler pbt cannot perturb model mid-run"),
        (dict(scheduler="pbt", space={"batch_size": Dist("choice", (64, 128))}), "cannot perturb batch_size"),
        (dict(scheduler="pbt", search="optuna", space={"lr": Dist("loguniform", (1e-3, 0.5))}), "use --search random, not optuna"),
        (dict(scheduler="pbt", perturbation_interval=4, space={"lr": Dist("loguniform", (1e-3, 0.5))}), "it never would"),
        (dict(scheduler="asha", grace_period=4), "no rung before the last epoch"),
        (dict(scheduler="hyperband", train=TrainConfig(epochs=2), reduction_factor=3.0), "needs epochs >= reduction_factor"),
        (dict(samples=1, space={"lr": Dist("loguniform", (1e-3, 0.5))}), "1 trial leaves it nothing to compare"),
        (dict(budget=5), "--budget 5 trial-epochs is too small for scheduler asha with 4 trials: it needs at least 7"),
        (dict(scheduler="pbt", budget=7, space={"lr": Dist("loguniform", (1e-3, 0.5))}), "needs at least 8"),
        (dict(gpus_per_trial=0.25), "--gpus-per-trial 0.25 needs --gpu"),
    ],
)
def test_sweeps_that_cannot_work_are_refused(kw, fragment):
    with pytest.raises(ConfigError) as e:
        _sweep(**kw)
    assert fragment in str(e.value)


def test_cli_refusals_are_one_line_exit_2_before_anything_runs(tmp_path, no_sweep, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.1, 0.01]}\n")
    assert "lr is a grid" in _one_line_exit_2(capsys, ["tune", "--search", "optuna", "--space", str(space), "--out", str(tmp_path / "a")])
    space.write_text("lr: {loguniform: [0.001, 0.5]}\nnorm: {choice: [none, batch]}\n")
    assert "cannot perturb norm" in _one_line_exit_2(capsys, ["tune", "--scheduler", "pbt", "--space", str(space), "--out", str(tmp_path / "b")])
    assert "too small" in _one_line_exit_2(capsys, ["tune", "--budget", "3", "--out", str(tmp_path / "c")])
    assert "invalid choice: 'bohb'" in _one_line_exit_2(capsys, ["tune", "--search", "bohb"])
    assert "invalid choice: 'pb3'" in _one_line_exit_2(capsys, ["tune", "--scheduler", "pb3"])
    assert not any(tmp_path.glob("*/"))  # nothing written


def test_pbt_without_a_space_sweeps_only_what_it_can_perturb(monkeypatch, tmp_path):
    import cnnray.tune.sweep as sweep_mod

    seen = []
    monkeypatch.setattr(sweep_mod, "run_sweep", seen.append)
    assert main(["tune", "--scheduler", "pbt", "--samples", "4", "--out", str(tmp_path / "s")]) == 0
    assert list(seen[0].space) == ["lr", "momentum"] and seen[0].train.norm == "none"


# --- rungs and budgets -------------------------------------------------------------------------
@pytest.mark.parametrize("epochs, grace, rf", [(4, 1, 2.0), (9, 1, 3.0), (10, 2, 2.0), (2, 1, 2.0), (3, 3, 2.0), (27, 1, 3.0)])
def test_asha_rungs_are_the_ones_ray_uses(epochs, grace, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket

    from cnnray.tune.schedulers import asha_rungs

    ray_rungs = sorted(r for r, _ in _Bracket(grace, epochs, rf, 0, stop_last_trials=False)._rungs)
    assert asha_rungs(epochs, grace, rf) == [r for r in ray_rungs if r < epochs]


def test_min_budgets():
    from cnnray.tune.schedulers import min_budget

    assert min_budget(_sweep(scheduler="asha")) == 4 * 1 + 3  # 4 trials reach rung 1, one goes on to epoch 4
    assert min_budget(_sweep(scheduler="none")) == 4
    assert min_budget(_sweep(scheduler="pbt", perturbation_interval=2, space={"lr": SPACE["lr"]})) == 4 * 3
    assert min_budget(_sweep(scheduler="hyperband")) == 4 * 1 + 3  # smallest rung 4 / 2**2 = 1 epoch


# --- fractional GPUs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cluster, cpus, gpus, workers, fit",
    [
        ({"CPU": 16, "GPU": 1}, 1, 0.25, 1, 4),
        ({"CPU": 16, "GPU": 1}, 1, 0.1, 1, 10),  # float division says 1 // 0.1 == 9
        ({"CPU": 16, "GPU": 1}, 1, 0.3, 1, 3),  # 0.1 of the GPU left over
        ({"CPU": 16, "GPU": 2}, 1, 0.3, 1, 6),  # a share never spans two GPUs
        ({"CPU": 16, "GPU": 1}, 2, 0.5, 2, 2),  # 2 workers of 0.25 GPU each
        ({"CPU": 2, "GPU": 1}, 1, 0.25, 1, 2),  # the CPUs bound it
        ({"CPU": 16, "GPU": 1}, 1, 1.0, 1, 1),
        ({"CPU": 16}, 1, 0.0, 1, 16),
    ],
)
def test_trials_that_fit(cluster, cpus, gpus, workers, fit):
    from cnnray.tune.resources import trials_that_fit

    assert trials_that_fit(cluster, cpus, gpus, workers) == fit


def test_gpu_shares_ray_cannot_give_are_refused():
    from cnnray.tune.resources import gpus_per_worker

    assert gpus_per_worker(0.25, 1) == 0.25 and gpus_per_worker(1, 2) == 0.5
    with pytest.raises(ConfigError, match="at most one GPU"):
        gpus_per_worker(2, 1)
    with pytest.raises(ConfigError, match="steps of 0.0001"):
        gpus_per_worker(0.00001, 1)
    sweep = _sweep(train=TrainConfig(epochs=4, gpu=True), gpus_per_trial=0.25)
    assert sweep.worker_gpus == 0.25


# --- fields that change nothing ----------------------------------------------------------------
@pytest.mark.parametrize(
    "space, base, fragment",
    [
        ({"nesterov": {"choice": [True, False]}}, dict(optimizer="adamw"), "optimizer adamw has no Nesterov switch"),
        ({"nesterov": {"choice": [True, False]}}, dict(momentum=0.0), "SGD without momentum"),
        ({"warmup_epochs": {"uniform": [0.0, 1.0]}}, dict(schedule="onecycle"), "schedule onecycle has its own warm-up"),
        ({"warmup_epochs": {"grid": [0.0, 1.0]}}, dict(schedule="triangle"), "schedule triangle has its own warm-up"),
        ({"lookahead_decay": {"uniform": [0.8, 0.95]}}, dict(lookahead_every=0), "lookahead is off"),
        ({"norm_lr_scale": {"loguniform": [1.0, 64.0]}}, dict(model="cnn", norm="none"), "has no norm layers to scale"),
        ({"crop_padding": {"grid": [2, 4]}}, dict(dataset="mnist", augment="auto"), "augment auto makes no crops on mnist"),
        ({"crop_padding": {"grid": [2, 4]}}, dict(dataset="cifar10", augment="none"), "augment none makes no crops"),
        ({"lr_scaling": {"choice": ["none", "linear"]}}, dict(batch_size=128), "= 1 at batch_size 128"),
        ({"whiten_bias_epochs": {"grid": [3, 5]}}, dict(model="airbench", norm="batch", dataset="cifar10", epochs=3), "freezes nothing"),
        ({"channels_last": {"choice": [True, False]}}, {}, "changes the speed of a run, not what it learns"),
        ({"data_loader": {"choice": ["memory", "ray-data"]}}, {}, "changes the speed"),
        ({"compile": {"choice": [True, False]}}, {}, "changes the speed"),
    ],
)
def test_a_field_with_no_effect_in_any_trial_is_refused(space, base, fragment):
    cfg = TrainConfig(**base)
    parsed, _ = parse_space(space, cfg)
    with pytest.raises(ConfigError) as e:
        check_space(parsed, cfg)
    assert fragment in str(e.value) and "has no effect in any trial" in str(e.value)


@pytest.mark.parametrize(
    "space, base",
    [
        ({"nesterov": {"choice": [True, False]}}, dict(optimizer="sgd")),
        ({"nesterov": {"choice": [True, False]}, "optimizer": {"choice": ["sgd", "adamw"]}}, {}),  # matters for sgd
        ({"nesterov": {"choice": [True, False]}, "momentum": {"uniform": [0.0, 0.9]}}, {}),
        ({"warmup_epochs": {"uniform": [0.0, 1.0]}, "schedule": {"choice": ["onecycle", "cosine"]}}, {}),
        ({"momentum": {"uniform": [0.5, 0.99]}}, dict(optimizer="adamw")),  # AdamW's beta1
        ({"weight_decay": {"loguniform": [1e-5, 1e-3]}}, dict(optimizer="adamw")),
        ({"norm_lr_scale": {"loguniform": [1.0, 64.0]}}, dict(model="cnn", norm="batch")),
        ({"crop_padding": {"grid": [2, 4]}}, dict(dataset="cifar10")),
        ({"lr_scaling": {"choice": ["none", "linear"]}}, dict(batch_size=256)),
        ({"lookahead_decay": {"uniform": [0.8, 0.95]}}, dict(lookahead_every=5)),
    ],
)
def test_a_field_that_matters_in_some_trial_is_kept(space, base):
    cfg = TrainConfig(**base)
    parsed, _ = parse_space(space, cfg)
    check_space(parsed, cfg)


def test_cli_nesterov_under_adamw_is_exit_2(tmp_path, no_sweep, capsys):
    """The issue's example."""
    space = tmp_path / "space.yaml"
    space.write_text("nesterov: {choice: [true, false]}\nlr: {loguniform: [0.001, 0.1]}\n")
    err = _one_line_exit_2(capsys, ["tune", "--optimizer", "adamw", "--space", str(space), "--out", str(tmp_path / "s")])
    assert "nesterov has no effect in any trial: optimizer adamw has no Nesterov switch" in err


# --- PBT: new values take effect at once --------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_resumed_optimizer_takes_the_new_config_at_once(optimizer):
    """A PBT exploit (or --resume with new flags) loads the donor's optimizer state; the
    recipient's lr, momentum and weight decay must be in effect from its first step."""
    from cnnray.train.optim import build_optimizer, build_scheduler, load_optimizer_state

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    steps, done = 10, 20
    old = TrainConfig(optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4, epochs=4, schedule="cosine")
    opt = build_optimizer(old, net, torch.device("cpu"))
    sched = build_scheduler(old, opt, steps)
    for _ in range(done):
        net(torch.randn(16, 4)).sum().backward()
        opt.step()
        sched.step()
    saved = opt.state_dict()

    new = old.replace(lr=0.02, momentum=0.5, weight_decay=1e-4)
    fresh = build_optimizer(new, net, torch.device("cpu"))
    load_optimizer_state(fresh, saved)
    build_scheduler(new, fresh, steps, done_steps=done)
    expected_lr = build_scheduler(new, build_optimizer(new, net, torch.device("cpu")), steps, done_steps=done)
    group = fresh.param_groups[0]
    assert group["lr"] == pytest.approx(expected_lr.get_last_lr()[0]) and group["lr"] < 0.02
    if optimizer == "sgd":
        assert group["momentum"] == 0.5
        assert fresh.state[group["params"][0]]["momentum_buffer"] is not None  # the donor's buffers came along
    else:
        assert group["betas"][0] == 0.5
        assert int(fresh.state[group["params"][0]]["step"]) == done
    assert [g["weight_decay"] for g in fresh.param_groups] == [1e-4, 0.0]
    # What torch's own load_state_dict would have left: the donor's momentum.
    plain = build_optimizer(new, net, torch.device("cpu"))
    plain.load_state_dict(saved)
    assert (plain.param_groups[0].get("momentum") or plain.param_groups[0]["betas"][0]) == 0.9


def test_pbt_perturbations_stay_inside_the_space():
    from cnnray.tune.pbt import clip_to_space

    space = {"lr": Dist("loguniform", (1e-3, 0.5)), "momentum": Dist("uniform", (0.5, 0.99))}
    assert clip_to_space({"lr": 0.6, "momentum": 0.99 * 1.2}, space) == {"lr": 0.5, "momentum": 0.99}
    assert clip_to_space({"lr": 0.0008, "momentum": 0.4}, space) == {"lr": 1e-3, "momentum": 0.5}


def test_budget_counts_each_reported_epoch_once(tmp_path):
    """What a resumed sweep spent is read from its history files before Tune starts; a
    finished trial's repeated last result (Tune passes it again, marked done) is not another epoch."""
    from cnnray.tune.history import append_row, history_file
    from cnnray.tune.schedulers import budget_stopper, record_spent_before, spent_trial_epochs

    for e in (1, 2, 2):  # epoch 2 rerun after a resume: still one trial-epoch
        append_row(history_file(tmp_path, "t0"), "t0", {"epoch": e, "val_accuracy": 0.5})
    assert spent_trial_epochs(tmp_path) == 2
    stop = budget_stopper(5, tmp_path)
    assert record_spent_before(tmp_path) == 2
    assert not stop("t1", {"epoch": 1}) and stop.spent == 3 and not stop.stop_all()
    stop("t1", {"epoch": 1, "done": True})  # the duplicate of a finished trial's last result
    assert stop.spent == 3
    stop("t1", {"epoch": 2})
    stop("t2", {"epoch": 1})
    assert stop.spent == 5 and stop.stop_all()
