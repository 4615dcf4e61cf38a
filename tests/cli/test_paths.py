"""Paths mean what the user typed (issue 18): one resolver, used at config construction.

Every test here runs in-process without Ray: where old code would have gone on to start
Ray (or train), the step that would start it is replaced by one that fails the test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cnnray.cli import main
from cnnray.config import ConfigError, TrainConfig
from cnnray.paths import PathError, RAY_JOB_CONFIG_ENV, ray_job_copy, resolve_path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private $HOME (what `~` expands to) and a private cwd."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(RAY_JOB_CONFIG_ENV, raising=False)
    return h


@pytest.fixture
def no_ray(monkeypatch):
    """Ray must not start (nor data be loaded): every test below decides before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray would start (or data be loaded) here")

    import cnnray.train.driver as driver

    monkeypatch.setattr(driver, "preflight", refuse)
    monkeypatch.setattr(driver, "init_ray", refuse)
    monkeypatch.setattr(driver, "_fit", refuse)


# --- the resolver --------------------------------------------------------------------------
def test_resolver_expands_home_joins_cwd_and_leaves_uris(home):
    cwd = Path.cwd()
    assert resolve_path("~/ckpts", "x") == str(home / "ckpts")
    assert resolve_path("ckpts", "x") == str(cwd / "ckpts")
    assert resolve_path("./a/../b/", "x") == str(cwd / "b")
    assert resolve_path(Path("rel"), "x") == str(cwd / "rel")
    for uri in ("s3://bucket/ckpts", "gs://b/x", "file:///tmp/x", "hdfs://nn:8020/x"):
        assert resolve_path(uri, "x", uris=True) == uri
    # Where only a local path can work: file:// is its path, other URIs are refused.
    assert resolve_path("file:///tmp/x%20y", "x") == "/tmp/x y"
    with pytest.raises(PathError, match=r"^out 's3://b/x' must be a local path"):
        resolve_path("s3://b/x", "out")
    # Resolving again (a worker, a resume) changes nothing.
    once = resolve_path("~/a/./b", "x")
    assert resolve_path(once, "x") == once


@pytest.mark.parametrize("bad,fragment", [("", "is empty"), ("   ", "is empty"), ("runs/a\nb", "control character"),
                                          ("runs/a\x1b[31m", "control character"), ("a\udcff", "not UTF-8")])
def test_resolver_refuses_what_cannot_be_shown(home, bad, fragment):
    with pytest.raises(PathError, match=fragment):
        resolve_path(bad, "out")


@pytest.mark.parametrize("name", ["Ba$$in", "<b>x", "a&amp;b", "50%_off", "a b", "ü#?"])
def test_odd_but_printable_names_are_kept_as_typed(home, name):
    assert Path(resolve_path(f"runs/{name}", "out")).name == name


# --- TrainConfig: every path field, every way it is given ----------------------------------
def test_train_config_resolves_every_path_field_once(home, tmp_path):
    cfg = TrainConfig(out="runs/x", storage_path="~/ckpts", data_dir="~/data/mnist")
    assert cfg.out == str(Path.cwd() / "runs" / "x")
    assert cfg.storage_path == str(home / "ckpts")
    assert cfg.data_dir == str(home / "data" / "mnist")
    # What travels to the workers is the resolved value, unchanged by rebuilding it elsewhere.
    os.chdir(tmp_path)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig(storage_path="s3://bucket/runs").storage_path == "s3://bucket/runs"
    with pytest.raises(ConfigError, match="data_dir 's3://b/mnist' must be a local path"):
        TrainConfig(data_dir="s3://b/mnist")


def test_yaml_paths_and_the_config_file_itself(home):
    (home / "c.yaml").write_text("out: '~/runs/a'\nstorage_path: ckpts\ndata_dir: ../data\n")
    from cnnray.cli import build_parser
    from cnnray.cli.flags import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--config", "~/c.yaml"]))
    assert cfg.out == str(home / "runs" / "a")
    assert cfg.storage_path == str(Path.cwd() / "ckpts")  # relative to where the command ran
    assert cfg.data_dir == str(Path.cwd().parent / "data")


def test_storage_path_relative_reaches_ray_absolute(home, monkeypatch):
    """`cnnray train --storage-path ckpts`: Ray got "ckpts" as typed and failed with
    ArrowInvalid (URI has empty scheme) after it had started; now it gets the absolute path."""
    import cnnray.train.driver as driver

    seen = {}

    def fit(cfg, out, storage, name, started, echo, dataset=None, tracking=None):
        seen.update(cfg=cfg, storage=storage, name=name)
        return {"config": cfg.to_dict()}

    monkeypatch.setattr(driver, "preflight", lambda cfg, **kw: None)
    monkeypatch.setattr(driver, "init_ray", lambda address=None, ray_train=False: False)
    monkeypatch.setattr(driver, "_fit", fit)
    assert main(["train", "--storage-path", "ckpts", "--out", "runs/exp1", "--no-report"]) == 0
    assert seen["storage"] == str(Path.cwd() / "ckpts")
    assert seen["cfg"].storage_path == seen["storage"] and seen["name"] == "exp1"
    import pyarrow.fs

    pyarrow.fs.FileSystem.from_uri(seen["storage"])  # what Ray Train does with it: no ArrowInvalid


def test_storage_path_with_tilde_finds_the_earlier_run(home, no_ray, capsys):
    """`--storage-path '~/ckpts'` (quoted, or from YAML): the "already holds a run" guard
    looked at ./~/ckpts/<name> while pyarrow expanded ~, so a new run started on top of
    the earlier run's folder. Now the guard sees the same folder Ray would write."""
    (home / "ckpts" / "exp1").mkdir(parents=True)  # an earlier run named exp1
    assert main(["train", "--storage-path", "~/ckpts", "--out", "runs/exp1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnray: error:") and "already holds a training run" in err and "\n" not in err
    assert not (Path.cwd() / "~").exists()


def test_bad_paths_exit_2_with_one_line_before_ray(home, no_ray, capsys):
    for args, fragment in [(["--out", ""], "out is empty"), (["--data-dir", "gs://b/mnist"], "must be a local path"),
                           (["--out", "runs/a\nb"], "control character"), (["--config", "~/missing.yaml"],
                                                                          str(home / "missing.yaml"))]:
        assert main(["train", *args]) == 2, args
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err


# --- tune, serve, report, predict ---------------------------------------------------------
def test_sweep_paths_are_resolved_once(home):
    from cnnray.tune.sweep import SweepConfig

    sweep = SweepConfig(train=TrainConfig(), out="sweeps/x", model_store="~/store")
    assert sweep.out == str(Path.cwd() / "sweeps" / "x") and sweep.model_store == str(home / "store")
    with pytest.raises(ConfigError, match="model_store 's3://b' must be a local path"):
        SweepConfig(train=TrainConfig(), model_store="s3://b")


def test_tune_space_file_with_tilde(home, monkeypatch):
    import cnnray.tune.sweep as sweep_mod

    (home / "space.yaml").write_text("lr: {choice: [0.01, 0.1]}\n")
    got = {}
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda sweep: got.setdefault("sweep", sweep))
    assert main(["tune", "--space", "~/space.yaml", "--out", "sweeps/s"]) == 0
    assert list(got["sweep"].space) == ["lr"] and got["sweep"].out == str(Path.cwd() / "sweeps" / "s")


def test_serve_args_resolve_paths_for_every_builder(home):
    from cnnray.serve.schemas import ServeArgs

    args = ServeArgs(model_store="~/store", checkpoints={"m": "runs/x/ckpt"})
    assert args.model_store == str(home / "store")
    assert args.checkpoints == {"m": str(Path.cwd() / "runs" / "x" / "ckpt")}
    # What `serve run cnnray.serve.app:build_app model_store=...` validates: the same rule.
    assert ServeArgs.model_validate({"model_store": "store"}).model_store == str(Path.cwd() / "store")


def test_serve_cli_bad_store_path_is_one_line(home, capsys):
    assert main(["serve", "--model-store", "s3://bucket/store"]) == 2
    err = capsys.readouterr().err
    assert "must be a local path" in err and err.count("\n") == 1


def test_report_and_predict_expand_home(home, capsys):
    assert main(["report", "~/missing"]) == 2
    assert str(home / "missing") in capsys.readouterr().err
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="PNG")  # a real PNG: predict checks the format before sending
    (home / "img.png").write_bytes(buf.getvalue())
    # The file is read (the server is unreachable: exit 1, not "cannot read ~/img.png").
    assert main(["predict", "--url", "http://127.0.0.1:9", "--model", "m", "--timeout", "2", "~/img.png"]) == 1
    assert "cannot read" not in capsys.readouterr().err


# --- results that would vanish with a Ray job's files ----------------------------------------
@pytest.fixture
def in_ray_job(tmp_path, monkeypatch, home) -> Path:
    """The environment Ray's JobSupervisor gives a `ray job submit --working-dir .`
    entrypoint: RAY_JOB_CONFIG_JSON_ENV_VAR naming the uploaded package, and the cwd Ray's
    unpacked copy of it under the session's runtime_resources cache."""
    copy = tmp_path / "session_2026" / "runtime_resources" / "working_dir_files" / "_ray_pkg_4be1c2f0"
    (copy / "jobs" / "configs").mkdir(parents=True)
    monkeypatch.chdir(copy)
    runtime_env = {"working_dir": "gcs://_ray_pkg_4be1c2f0.zip", "excludes": [".venv"]}
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))
    return copy


def test_ray_job_copy_is_detected(in_ray_job, monkeypatch):
    assert ray_job_copy() == in_ray_job
    assert ray_job_copy(str(in_ray_job / "jobs")) == in_ray_job
    # A local:// working_dir is the user's own folder, not a copy.
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "local:///srv/code"}}))
    assert ray_job_copy() is None
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, "not json")
    assert ray_job_copy() is None


@pytest.mark.parametrize("args", [["train", "--out", "runs/exp1"],
                                  ["train", "--out", "/abs/runs/exp1", "--storage-path", "ckpts"],
                                  ["tune", "--out", "sweeps/x"],
                                  ["tune", "--out", "/abs/sweeps/x", "--model-store", "store"]])
def test_job_results_inside_the_working_dir_copy_are_refused(in_ray_job, no_ray, monkeypatch, capsys, args):
    """`ray job submit ... -- python jobs/train.py --out runs/exp1` wrote result.json and
    checkpoints into Ray's temporary copy (exit 0, then deleted); now: exit 2, one line."""
    import cnnray.tune.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "run_sweep", lambda sweep: pytest.fail("the sweep would start"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside Ray's temporary copy" in err and str(in_ray_job) in err
    assert "absolute path on lasting storage" in err
    assert not (in_ray_job / "runs").exists() and not (in_ray_job / "sweeps").exists()


def test_job_results_elsewhere_and_inputs_in_the_copy_are_fine(in_ray_job, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "lasting" / "exp1"), storage_path="s3://bucket/ckpts",
                      data_dir="data/mnist")  # reading the uploaded files is fine
    assert cfg.data_dir == str(in_ray_job / "data" / "mnist")
    assert TrainConfig(out="~/cnnray-runs/exp1").out.startswith(os.environ["HOME"])


def test_report_into_the_copy_is_refused(in_ray_job, capsys):
    (in_ray_job / "runs" / "x").mkdir(parents=True)
    assert main(["report", "runs/x"]) == 2
    assert "inside Ray's temporary copy" in capsys.readouterr().err


def test_any_session_runtime_resources_folder_counts(home, tmp_path, monkeypatch):
    """Without the job variable (a Tune trial, a Train worker, a nested script) a path
    inside a Ray session's runtime_resources cache is still refused as an output."""
    with pytest.raises(ConfigError, match="inside Ray's temporary copy"):
        TrainConfig(out=str(tmp_path / "session_1" / "runtime_resources" / "py_modules_files" / "x"))
