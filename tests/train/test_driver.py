"""The driver's checks before Ray starts (issue 13): the run folder is claimed atomically,
impossible data splits and resumes are refused with one line, the Ray token stays private.
No Ray starts here, except where a test says so."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from cnnray.config import ConfigError, TrainConfig
from cnnray.files import CLAIM_FILE
from cnnray.train.run_dir import check_resume, claim_run_folder
from tests.helpers import REPO
from tests.helpers.cli import assert_one_line_exit_2, run_cli


@pytest.fixture
def cnnray(capsys, monkeypatch, data_cache):
    """`cnnray ARGS` in this process (tests/helpers/cli.py) on the session's decoded-data
    cache: each of these used to start a process that decoded MNIST into a cache of its own."""
    monkeypatch.setenv("CNNRAY_DATA", str(data_cache))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return lambda args: run_cli(capsys, *args)


def _one_line_exit_2(result, fragment):
    assert_one_line_exit_2(result, fragment)
    assert "[cnnray] training" not in result[1]  # refused before Ray started


# --- the run folder ------------------------------------------------------------------------


def test_a_folder_in_use_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    fd, existed = claim_run_folder(out, str(out / "ray"), "run", resume=False)
    try:
        assert not existed and (out / CLAIM_FILE).exists()
        for resume in (False, True):  # also a --resume of a run still in progress
            with pytest.raises(ConfigError, match=f"{out} is in use by another cnnray train .*\"pid\": {os.getpid()}"):
                claim_run_folder(out, str(out / "ray"), "run", resume=resume)
    finally:
        os.close(fd)
    # Released: the next run may claim it; a folder Ray has written to holds a run.
    (out / "ray" / "run").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a training run: pass --resume"):
        claim_run_folder(out, str(out / "ray"), "run", resume=False)
    fd, existed = claim_run_folder(out, str(out / "ray"), "run", resume=True)
    os.close(fd)
    assert existed


def test_second_cnnray_train_on_the_same_out_exits_2_before_ray(mnist_dir, tmp_path, cnnray):
    """Issue 13: two `cnnray train` with one --out, started 3 s apart, both exited 0 and the
    second overwrote the first's result.json and checkpoints. Here the first holds the
    folder (its claim, as while it trains); the second must stop at once."""
    out = tmp_path / "run"
    fd, _ = claim_run_folder(out, str(out / "ray"), "run", resume=False)
    try:
        proc = cnnray(["train", "--data-dir", str(mnist_dir), "--subset", "200", "--epochs", "1", "--out", str(out),
                       "--no-report"])
    finally:
        os.close(fd)
    _one_line_exit_2(proc, "is in use by another cnnray train")
    assert not (out / "ray").exists()


# --- data facts before Ray -------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, fragment",
    [
        # 9 training examples over 2 workers: 4 each, no full batch of 8.
        (["--subset", "10", "--workers", "2", "--batch-size", "16"], "give no full batch of 8 per worker"),
        (["--subset", "10", "--val-fraction", "0.01"], "the validation split is empty"),
    ],
)
def test_impossible_splits_exit_2_before_ray(mnist_dir, tmp_path, flags, fragment, cnnray):
    proc = cnnray(["train", "--data-dir", str(mnist_dir), *flags, "--out", str(tmp_path / "o"), "--no-report"])
    _one_line_exit_2(proc, fragment)


def test_more_cpus_than_the_machine_has_exit_2(mnist_dir, tmp_path, cnnray):
    """A local Ray would wait forever for CPUs it does not have."""
    workers = (os.cpu_count() or 1) + 1
    proc = cnnray(["train", "--data-dir", str(mnist_dir), "--subset", "2000", "--workers", str(workers),
                   "--batch-size", str(8 * workers), "--out", str(tmp_path / "o"), "--no-report"])
    _one_line_exit_2(proc, f"need {workers} CPUs")


# --- resume ------------------------------------------------------------------------------------


def _meta(epoch, **config):
    return {"epoch": epoch, "config": {**TrainConfig().to_dict(), **config}}


def test_resume_refuses_only_what_cannot_be_honoured(tmp_path):
    cfg = TrainConfig(epochs=2, resume=True)
    check_resume(cfg, _meta(1), tmp_path)  # one more epoch: fine
    check_resume(cfg.replace(lr=0.05, workers=2), _meta(1), tmp_path)  # other settings may change
    check_resume(cfg, None, tmp_path)  # nothing to resume from: a new run
    check_resume(cfg, _meta(2), tmp_path)  # stopped after its last checkpoint, before result.json: finishes
    (tmp_path / "result.json").write_text('{"history": [{"epoch": 1}, {"epoch": 2}]}')
    with pytest.raises(ConfigError, match="has already trained 2 epoch.*--epochs greater than 2"):
        check_resume(cfg, _meta(2), tmp_path)
    with pytest.raises(ConfigError, match="has already trained 3 epoch.*--epochs greater than 3"):
        check_resume(cfg, _meta(3), tmp_path)
    with pytest.raises(ConfigError, match="was trained with norm='batch'"):
        check_resume(cfg, _meta(1, norm="batch"), tmp_path)
    with pytest.raises(ConfigError, match="model='mlp'"):
        check_resume(cfg, _meta(1, model="mlp"), tmp_path)


# --- the Ray token -----------------------------------------------------------------------------


@pytest.mark.slow  # starts Ray or a server
def test_local_ray_init_keeps_the_token_private(tmp_path, monkeypatch):
    """Issue 13: a local ray.init() (token auth on) wrote ~/.ray/auth_token 0644 in a 0755
    folder. Ray's own token writer stands in for the start of a real Ray here."""
    import ray
    from ray._private.authentication.authentication_token_setup import generate_and_save_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: generate_and_save_token())
    old = os.umask(0o022)  # the usual umask, under which Ray's file comes out 0644
    try:
        from cnnray.ray_start import init_ray

        assert init_ray() is True
    finally:
        os.umask(old)
    token = tmp_path / ".ray" / "auth_token"
    assert token.read_text()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_secure_auth_token_narrows_an_existing_token(tmp_path, monkeypatch):
    from cnnray.raytoken import secure_auth_token

    elsewhere = tmp_path / "tok"
    elsewhere.write_text("t")
    elsewhere.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(elsewhere))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    secure_auth_token()
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o600
    assert not (tmp_path / "home" / ".ray").exists()  # a token elsewhere: ~/.ray untouched


def test_local_sh_creates_the_token_0600_in_a_0700_folder(tmp_path):
    """Issue 13: `cluster/local.sh up` ran `ray get-auth-token --generate` under the user's
    umask. A stand-in `ray` writes the token as Ray does and then fails to start a head."""
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\ncase "$1" in\n'
                    '  get-auth-token) mkdir -p "$HOME/.ray" && echo token > "$HOME/.ray/auth_token" ;;\n'
                    '  --version) echo "ray, version 2.60.0" ;;\n  *) exit 1 ;;\nesac\n')
    fake.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_BIN": str(fake), "CNNRAY_LOCAL_HOME": str(tmp_path / "state"),
           "CNNRAY_UP_TIMEOUT": "5"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_AUTH_TOKEN", None)
    subprocess.run(["bash", "-c", f"umask 022 && exec bash {REPO / 'cluster' / 'local.sh'} up"], env=env,
                   capture_output=True, text=True, timeout=120)
    token = home / ".ray" / "auth_token"
    assert token.read_text().strip() == "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_a_sweep_folder_in_use_is_refused_at_once(tmp_path):
    from cnnray.train.run_dir import lock_folder
    from cnnray.tune.space import default_space
    from cnnray.tune.sweep import SweepConfig, run_sweep

    out = tmp_path / "sweep"
    fd = lock_folder(out, "cnnray tune")
    try:
        with pytest.raises(ConfigError, match="is in use by another cnnray tune"):
            # scheduler none: ASHA has no rung in a 1-epoch sweep, which SweepConfig refuses first
            run_sweep(SweepConfig(train=TrainConfig(epochs=1), space=default_space(), scheduler="none", out=str(out)))
    finally:
        os.close(fd)


# --- Tune: a diverged trial is an errored trial -----------------------------------------------


def test_a_diverged_trial_ends_as_an_errored_trial(monkeypatch, tmp_path):
    """The workers return the divergence line (Ray Train's Result.return_value); the trial
    raises it, so Tune marks this trial ERROR and runs the others (no Ray here)."""
    from cnnray.tune import trial

    class Result:
        return_value = "training diverged in epoch 2: the training loss became non-finite at step 3 of 9, ..."

    class Trainer:
        def fit(self):
            return Result()

    class Context:
        def get_trial_id(self):
            return "t1"

    import queue

    import ray.tune
    import ray.util.queue

    monkeypatch.setattr(ray.tune, "get_context", lambda: Context())
    monkeypatch.setattr(ray.util.queue, "Queue", lambda maxsize, **kw: queue.Queue(maxsize))  # no Ray actor here
    monkeypatch.setattr("cnnray.train.driver.make_trainer", lambda *a, **kw: Trainer())
    with pytest.raises(trial.TrialDiverged, match="training diverged in epoch 2"):
        trial.train_trial({"lr": 100.0}, base=TrainConfig().to_dict(), runs_dir="/tmp/unused",
                          sweep_dir=str(tmp_path))
    assert "t1" not in trial._RUNNING
    Result.return_value = None  # a sound run ends normally
    trial.train_trial({"lr": 0.1}, base=TrainConfig().to_dict(), runs_dir="/tmp/unused", sweep_dir=str(tmp_path))


def test_more_gpus_than_the_machine_has_exit_2_in_process(mnist_dir, tmp_path, monkeypatch, data_cache):
    from cnnray.train.driver import preflight

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    # The Ray cnnray would start (not the session's test Ray, if an earlier test started it).
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    cfg = TrainConfig(data_dir=str(mnist_dir), subset=2000, workers=2, batch_size=64, gpu=True)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    with pytest.raises(ConfigError, match="needs 2 GPUs but this machine's Ray has 1"):
        preflight(cfg)
