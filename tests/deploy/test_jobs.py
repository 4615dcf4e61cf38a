"""The `ray job submit` entrypoints in jobs/, and one real head started by cluster/local.sh.

Fast tests: the wrappers' defaults and help, every config in jobs/configs, and what the
`--working-dir .` upload holds. The slow test starts a private head on 127.0.0.1 (token
authentication on, a test-only token, 2 CPUs), submits jobs/train.py on an MNIST subset
and reads its result.json, submits a broken config and finds the one-line error in
`ray job logs`, checks that the job API refuses requests without the token, and stops
only that head.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

JOBS = REPO / "jobs"
CONFIGS = JOBS / "configs"
RAY = Path(sys.executable).with_name("ray")
PLAIN = ["--log-style", "record", "--log-color", "false"]  # `ray job` output without colour codes
# Owned by the Serve part; checked by its own tests.
NOT_TRAIN_CONFIGS = {"serve.yaml"}


def _defaults_module():
    spec = importlib.util.spec_from_file_location("jobs_defaults", JOBS / "_defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in NOT_TRAIN_CONFIGS and not p.stem.endswith("_sweep"))


# --- the wrappers ---------------------------------------------------------------------------


def test_default_out_is_absolute_and_named_after_the_config(tmp_path, monkeypatch):
    d = _defaults_module()
    monkeypatch.setenv("CNNRAY_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("CNNRAY_STORAGE", raising=False)
    argv = d.with_run_defaults("train", ["--config", "jobs/configs/mnist_cnn.yaml", "--epochs", "1"])
    out = Path(argv[argv.index("--out") + 1])
    assert out.is_absolute() and out.parent == tmp_path / "runs"
    assert out.name.startswith("mnist_cnn-")
    assert "--storage-path" not in argv
    # What the user passed is kept, in either spelling.
    assert d.with_run_defaults("train", ["--out", "/x/run"]) == ["--out", "/x/run"]
    assert d.with_run_defaults("train", ["--out=/x/run"]) == ["--out=/x/run"]
    assert d.with_run_defaults("train", ["--help"]) == ["--help"]


def test_default_outs_of_jobs_in_the_same_second_differ(tmp_path, monkeypatch):
    """Issue 13: two jobs submitted in the same second were given the same run folder."""
    d = _defaults_module()
    monkeypatch.setenv("CNNRAY_RUNS", str(tmp_path / "runs"))
    one_second = time.gmtime(1_800_000_000)
    monkeypatch.setattr(d.time, "gmtime", lambda *a: one_second)  # every job in the same second
    outs = {d.with_run_defaults("train", ["--epochs", "1"])[-1] for _ in range(20)}
    assert len(outs) == 20


def test_cnnray_storage_becomes_the_default_storage_path(monkeypatch):
    d = _defaults_module()
    monkeypatch.setenv("CNNRAY_STORAGE", "s3://bucket/cnnray")
    argv = d.with_run_defaults("train", ["--out", "/x/run"])
    assert argv == ["--out", "/x/run", "--storage-path", "s3://bucket/cnnray"]
    given = d.with_run_defaults("train", ["--out", "/x/run", "--storage-path", "/shared/ray"])
    assert given == ["--out", "/x/run", "--storage-path", "/shared/ray"]


def _run_wrapper(command: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`python jobs/COMMAND.py ARGS` in this process: the wrapper's `main` (what its
    `__main__` block exits with), with jobs/ on sys.path as a script run has it."""
    monkeypatch.syspath_prepend(str(JOBS))
    spec = importlib.util.spec_from_file_location(f"jobs_{command}", JOBS / f"{command}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    try:
        code = module.main(args)
    except SystemExit as e:  # argparse: --help, and its own refusals
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _broken_args(command: str, tmp_path: Path) -> list[str]:
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: cnn\nlearning_rate: 0.1\n")
    return {"train": ["--config", str(broken), "--out", str(tmp_path / "out")],
            "tune": ["--config", str(broken), "--out", str(tmp_path / "out")],
            "serve": ["--model-store", str(tmp_path / "missing")]}[command]


def _expected_error(command: str, tmp_path: Path) -> str:
    return "unknown config key 'learning_rate'" if command != "serve" else str(tmp_path / "missing")


@pytest.mark.parametrize("command", ["train", "tune", "serve"])
def test_wrapper_forwards_to_the_cnnray_subcommand(command, capsys, monkeypatch):
    if command != "train" and not _defaults_module().subcommand_options(command):
        pytest.skip(f"`cnnray {command}` is not registered in this version")
    code, out, err = _run_wrapper(command, ["--help"], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith(f"usage: cnnray {command}")


@pytest.mark.parametrize("command", ["train", "tune", "serve"])
def test_wrapper_passes_arguments_and_exit_status_through(command, tmp_path, capsys, monkeypatch):
    """Bad input reaches the subcommand, which refuses it with one line and exit 2 before
    Ray starts: what `ray job logs` shows for a FAILED job."""
    if command != "train" and not _defaults_module().subcommand_options(command):
        pytest.skip(f"`cnnray {command}` is not registered in this version")
    code, out, err = _run_wrapper(command, _broken_args(command, tmp_path), capsys, monkeypatch)
    assert code == 2, out + err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("cnnray: error:")]
    assert _expected_error(command, tmp_path) in line


def test_a_wrapper_run_as_the_job_runs_it_exits_2_without_a_traceback(tmp_path):
    """The in-process checks above once as `ray job submit` runs a wrapper, `python
    jobs/train.py ARGS`: its own process, `_defaults` found beside the script, the exit
    status of the process, and no traceback."""
    result = subprocess.run([sys.executable, str(JOBS / "train.py"), *_broken_args("train", tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("cnnray: error:")]
    assert _expected_error("train", tmp_path) in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["train.py", "tune.py", "serve.py"])
def test_wrapper_docstring_shows_the_submit_command(script):
    doc = (JOBS / script).read_text()
    assert "ray job submit --" in doc and "--working-dir . --runtime-env jobs/runtime_env.yaml" in doc
    assert f"python jobs/{script}" in doc


# --- the configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", _train_configs(), ids=lambda p: p.name)
def test_config_is_a_valid_train_config_with_its_measured_accuracy(path):
    from cnnray.config import TrainConfig

    cfg = TrainConfig.from_yaml(path)
    assert cfg.data_dir is None and cfg.out == TrainConfig().out, "no machine-specific paths in configs"
    # Each config records the accuracy it reached, where and how it ran.
    assert "# Measured" in path.read_text() and "test accuracy" in path.read_text()


def test_the_lectures_exercises_have_configs():
    from cnnray.config import TrainConfig

    found = {(c.model, c.dataset) for c in map(TrainConfig.from_yaml, _train_configs())}
    for needed in [("mlp", "mnist"), ("cnn", "mnist"), ("mlp", "cifar10"), ("tutorial_cnn", "cifar10"),
                   ("resnet18", "cifar10")]:
        assert needed in found, needed
    assert any(model.startswith("vgg") and data == "cifar10" for model, data in found)


def test_sweep_space_config():
    try:
        from cnnray.tune.space import load_space
    except ModuleNotFoundError:
        pytest.skip("cnnray.tune is not in this version")
    from cnnray.config import TrainConfig

    sweeps = sorted(CONFIGS.glob("*_sweep.yaml"))
    assert sweeps
    for path in sweeps:
        base = TrainConfig.from_yaml(CONFIGS / (path.stem.removesuffix("_sweep") + ".yaml"))
        dists, _fixed = load_space(path, base)
        assert dists
        assert "# Measured" in path.read_text()


def test_working_dir_upload_leaves_out_environments_runs_and_history(tmp_path):
    """The zip `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml` uploads,
    built by Ray's own packaging code with .gitignore ignored (our excludes alone)."""
    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())["excludes"]
    package = tmp_path / "pkg.zip"
    create_package(str(REPO), package, include_parent_dir=False, excludes=excludes, include_gitignore=False)
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/train.py" in names and "jobs/configs/mnist_cnn.yaml" in names and "cnnray/cli/__init__.py" in names
    for heavy in (".venv/", ".git/", "runs/"):
        assert not any(n.startswith(heavy) for n in names), heavy
    assert not any(n.endswith((".pt", ".npz")) for n in names)
    assert package.stat().st_size < 20 * 2**20


# --- a real head, real jobs ---------------------------------------------------------------------


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _live_pids_in(temp_dir: str) -> list[int]:
    """Processes whose command line or working directory refers to the head's temp dir."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (temp_dir in cmdline or cwd.startswith(temp_dir + "/")):
            pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    """`cluster/local.sh up` with a private state folder and a test-only token; always
    `cluster/local.sh down` afterwards, which must leave no process of this head behind."""
    home = tmp_path_factory.mktemp("local-head")
    token = home / "auth_token"
    token.write_text(secrets.token_hex(32))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(CNNRAY_LOCAL_HOME=str(home / "state"), CNNRAY_DATA=str(home / "data"), RAY_AUTH_TOKEN_PATH=str(token))
    up = _run(["bash", "cluster/local.sh", "up"], {**base, "CNNRAY_NUM_CPUS": "2"}, timeout=300)
    state = {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for line in (home / "state" / "head.env").read_text().splitlines():
            key, _, value = line.partition("=")
            state[key] = value
        submit_env = {**base, "RAY_ADDRESS": state["RAY_ADDRESS"], "RAY_AUTH_MODE": "token"}
        yield submit_env, state
    finally:
        down = _run(["bash", "cluster/local.sh", "down"], base, timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        if state:
            assert _live_pids_in(state["TEMP_DIR"]) == []
            assert not Path(state["TEMP_DIR"]).exists()


@pytest.mark.slow
def test_train_job_on_a_local_head(local_head, mnist_dir, tmp_path):
    env, state = local_head
    assert state["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    status = _run(["bash", "cluster/local.sh", "status"], env, timeout=120)
    assert status.returncode == 0 and "token accepted" in status.stdout, status.stdout + status.stderr

    # The head's job API refuses requests without the token, and with a wrong one.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    refused = _run([str(RAY), "job", "list"], no_token, timeout=120)
    assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr
    wrong = {**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong")}
    (tmp_path / "wrong").write_text(secrets.token_hex(32))
    refused = _run([str(RAY), "job", "list"], wrong, timeout=120)
    assert refused.returncode != 0 and "Invalid authentication token" in refused.stdout + refused.stderr

    # A real training job: the checked-in MNIST CNN config on a subset, 2 CPU workers.
    out = tmp_path / "run"
    submit = [str(RAY), "job", "submit", "--submission-id", "test-train-ok", "--working-dir", ".",
              "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/train.py",
              "--config", "jobs/configs/mnist_cnn.yaml", "--data-dir", str(mnist_dir),
              "--subset", "2000", "--epochs", "1", "--workers", "2", "--out", str(out)]
    done = _run(submit, env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = _run([str(RAY), "job", "status", "test-train-ok", *PLAIN], env, timeout=120)
    assert "Job 'test-train-ok' succeeded" in status.stdout + status.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "cnn" and result["dataset"] == "mnist"  # from the config file
    assert result["workers"] == 2 and result["epochs"] == 1  # from the flags
    assert result["config"]["subset"] == 2000
    assert result["test_accuracy"] > 0.6  # 1,800 training images, one epoch: ~0.85 here
    assert Path(result["checkpoint"]).is_relative_to(out / "ray")

    # A broken config: the job FAILS, and its logs hold the one-line reason.
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: cnn\nlearning_rate: 0.1\n")
    submit = [str(RAY), "job", "submit", "--submission-id", "test-train-broken", "--working-dir", ".",
              "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/train.py",
              "--config", str(broken), "--out", str(tmp_path / "broken-run")]
    failed = _run(submit, env, timeout=300)
    assert failed.returncode != 0
    status = _run([str(RAY), "job", "status", "test-train-broken", *PLAIN], env, timeout=120)
    assert "Job 'test-train-broken' failed" in status.stdout + status.stderr
    logs = _run([str(RAY), "job", "logs", "test-train-broken"], env, timeout=120)
    assert "cnnray: error: unknown config key 'learning_rate'" in logs.stdout
    assert "Traceback" not in logs.stdout
    assert not (tmp_path / "broken-run").exists()


@pytest.mark.slow
def test_job_results_in_the_working_dir_copy_are_refused(local_head):
    """`--out runs/exp1` in a job would land in Ray's temporary copy of the uploaded code
    (deleted later) while the job ended SUCCEEDED; cnnray recognises the copy from the
    job's real environment and the job FAILS with the one-line reason (issue 18)."""
    env, _state = local_head
    submit = [str(RAY), "job", "submit", "--submission-id", "test-train-relative-out", "--working-dir", ".",
              "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/train.py",
              "--config", "jobs/configs/mnist_cnn.yaml", "--out", "runs/exp1"]
    failed = _run(submit, env, timeout=300)
    assert failed.returncode != 0
    logs = _run([str(RAY), "job", "logs", "test-train-relative-out"], env, timeout=120)
    (line,) = [ln for ln in logs.stdout.splitlines() if ln.startswith("cnnray: error:")]
    assert "out 'runs/exp1'" in line and "inside Ray's temporary copy" in line and "runtime_resources" in line
    assert "Traceback" not in logs.stdout


@pytest.mark.parametrize("command", ["train", "tune", "serve"])
def test_a_wrapper_run_as_a_job_is_the_program_and_a_call_from_python_is_not(command, monkeypatch):
    """`ray job stop` sends the job's driver SIGTERM: a wrapper run as a script (no argv)
    is the cnnray program, so its signals are cnnray's (exit 143, a --resume line, its Ray
    stopped: cnnray.interrupts); a call from Python keeps the caller's handlers."""
    import cnnray.cli

    monkeypatch.syspath_prepend(str(JOBS))
    spec = importlib.util.spec_from_file_location(f"jobs_{command}_program", JOBS / f"{command}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []
    monkeypatch.setattr(cnnray.cli, "main", lambda argv, program=None: calls.append((argv[0], program)) or 0)
    monkeypatch.setattr(sys, "argv", [f"jobs/{command}.py", "--help"])
    module.main()
    module.main(["--help"])
    assert calls == [(command, True), (command, False)]
