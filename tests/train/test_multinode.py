"""`cnnray train --address` on a Ray cluster of several nodes (tests/helpers/multinode.py: a head
with no CPUs and worker nodes of 1 CPU each, all on loopback): one worker per node, a
node lost mid-run, an elastic run that goes on with fewer workers, the storage check,
and a log of one progress line per epoch."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.helpers.processes import registered_checkpoints, spawn_cnnray
from tests.helpers.multinode import LoopbackCluster

# Small enough for ~20 s of epochs on 2 busy cores, big enough that accuracy means something.
TRAIN = ["train", "--model", "cnn", "--dataset", "mnist", "--subset", "4000", "--batch-size", "64",
         "--lr", "0.05", "--seed", "0", "--no-report"]
PROGRESS = re.compile(r"\[cnnray\] epoch (\d+)/(\d+) ")
# The cluster tests start Ray nodes and train on real MNIST (~4-5 min together): in the
# default run and CI, out of the quick `-m "not slow"` loop.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(data_cache):
    """One loopback cluster for the module (~10 s to start); each test leaves it with two
    1-CPU worker nodes on 127.0.0.1, as it found it."""
    c = LoopbackCluster(worker_nodes=2)
    yield c
    c.shutdown()


def _start(cluster, mnist_dir, out: Path, *args: str):
    log = open(out.parent / f"{out.name}.log", "w+")
    proc = spawn_cnnray([*TRAIN, "--address", cluster.address, "--data-dir", str(mnist_dir),
                         "--out", str(out), *args], output=log)
    return proc, log


def _finish(proc, log, timeout_s: float = 400) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except Exception:
        proc.kill()
        raise
    log.flush()
    log.seek(0)
    return log.read()


def _wait_checkpoint(run_dir: Path, name: str, proc, log, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while name not in registered_checkpoints(run_dir):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {name} checkpoint:\n{_finish(proc, log)[-3000:]}")
        time.sleep(0.2)


def _assert_one_line_per_epoch(text: str, epochs: int) -> None:
    """The log is readable: each epoch's progress line once, and Ray's per-poll warnings
    (PlacementGroupCleaner, once a second without a dashboard) at most once per process."""
    assert [int(m.group(1)) for m in PROGRESS.finditer(text)] == list(range(1, epochs + 1)), text[-3000:]
    cleaner = [line for line in text.splitlines() if "Failed to query Ray Train Controller" in line]
    assert len(cleaner) <= 2, f"{len(cleaner)} PlacementGroupCleaner lines:\n" + "\n".join(cleaner[:5])
    assert text.count("Found multiple active Ray instances") <= 2


@slow
def test_two_nodes_train_checkpoint_to_shared_storage_and_survive_a_lost_node(cluster, mnist_dir, tmp_path):
    """2 workers, one on each node, checkpoint into --storage-path; the node of one of them
    is killed after the epoch-1 checkpoint and a fresh node joins: the run continues from
    that checkpoint (not from epoch 0) and finishes with the accuracy of an unbroken run."""
    storage = tmp_path / "shared"  # every node is this machine: its disk is shared storage
    before = {a["ActorID"] for a in cluster.actors("RayTrainWorker")}
    proc, log = _start(cluster, mnist_dir, tmp_path / "run", "--workers", "2", "--epochs", "4",
                       "--storage-path", str(storage))
    run_dir = storage / "run"
    _wait_checkpoint(run_dir, "epoch-0001", proc, log)
    # One worker on each node: the head has no CPUs, and the two workers sit on different nodes.
    first = [a for a in cluster.actors("RayTrainWorker") if a["ActorID"] not in before]
    assert len(first) == 2
    assert {a["Address"]["NodeID"] for a in first} == {n.node_id for n in cluster.workers}
    cluster.remove(cluster.workers[0])  # a machine gone: its raylet, worker and all
    cluster.add_worker()  # and a fresh one in its place
    text = _finish(proc, log)
    assert proc.returncode == 0, text[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[0]["start_epoch"] == 0 and history[-1]["start_epoch"] >= 1  # resumed, not restarted
    assert all(h["world_size"] == 2 for h in history)
    assert result["test_accuracy"] > 0.93  # 4 epochs of 3,600 images: ~0.96-0.97 unbroken
    assert result["checkpoint"].startswith(str(run_dir))
    assert "epoch-0004" in registered_checkpoints(run_dir)
    _assert_one_line_per_epoch(text, 4)


# After a node is lost, Ray's view of free resources (its AutoscalingCoordinator, every 20 s)
# may still count it, so an elastic run may first try its old size and wait this long for it
# (Ray's default: 60 s) before it tries again with the workers that fit.
ELASTIC_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}


def _world_sizes(run_dir: Path) -> list[int]:
    """world_size of each epoch in the newest registered checkpoint's history."""
    from cnnray.train.run_dir import last_checkpoint_meta

    meta = last_checkpoint_meta(str(run_dir.parent), run_dir.name)
    return [h["world_size"] for h in (meta or {}).get("history", [])]


@slow
def test_elastic_run_goes_on_with_fewer_workers(cluster, mnist_dir, tmp_path, monkeypatch):
    """--workers 1-2 loses a node after epoch 1 and finishes on the one left, with the same
    global batch (per-worker batch 64 instead of 32) and nothing repeated but the last epoch.
    6 epochs: on an idle machine an epoch takes ~2 s and Ray Train registers a checkpoint
    a moment after it is written, so with 3 the run once finished on two workers before the
    node was gone (CI, 2026-12-07)."""
    for k, v in ELASTIC_ENV.items():
        monkeypatch.setenv(k, v)
    proc, log = _start(cluster, mnist_dir, tmp_path / "run", "--workers", "1-2", "--epochs", "6")
    run_dir = tmp_path / "run" / "ray" / "run"
    _wait_checkpoint(run_dir, "epoch-0001", proc, log)
    cluster.remove(cluster.workers[0])
    try:
        text = _finish(proc, log)
    finally:
        cluster.add_worker()  # the next test finds two nodes again
    assert proc.returncode == 0, text[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[0]["world_size"] == 2 and history[-1]["world_size"] == 1, [h["world_size"] for h in history]
    assert history[-1]["start_epoch"] >= 1
    assert result["min_workers"] == 1 and result["workers"] == 2
    assert result["test_accuracy"] > 0.9
    assert "1-2 Ray Train worker(s)" in text


@slow
def test_node_local_storage_is_refused_when_workers_may_run_on_another_machine(cluster, mnist_dir, tmp_path):
    """A node at 127.0.0.2 stands for another machine: its disk is not this one's, so a
    storage path on this machine's disk is refused before training, with what to pass."""
    other = cluster.add_worker(ip="127.0.0.2")
    try:
        proc, log = _start(cluster, mnist_dir, tmp_path / "run", "--workers", "2", "--epochs", "1")
        text = _finish(proc, log, timeout_s=120)
    finally:
        cluster.remove(other)
    assert proc.returncode == 2, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("cnnray: error:")]
    assert len(errors) == 1 and "127.0.0.2" in errors[0] and "s3://" in errors[0], text[-3000:]
    assert "Traceback" not in text
    assert not (tmp_path / "run" / "ray" / "run").exists()  # nothing trained


@slow
def test_elastic_run_grows_when_a_node_returns(cluster, mnist_dir, tmp_path, monkeypatch):
    """--workers 1-2 started on one node trains with one worker; when a second node joins,
    Ray Train's elastic policy (looking every --elastic-resize-s) restarts it with two from
    the last checkpoint. The run is long on purpose and stopped (Ctrl-C) once it has grown."""
    import signal

    for k, v in ELASTIC_ENV.items():
        monkeypatch.setenv(k, v)
    gone = cluster.workers[0]
    cluster.remove(gone)
    cluster.wait_cpus(1)
    # No accuracy is checked here: a smaller subset (the last --subset wins) makes each
    # epoch, and so the wait for the first two-worker epoch, a quarter as long.
    proc, log = _start(cluster, mnist_dir, tmp_path / "run", "--workers", "1-2", "--epochs", "200",
                       "--schedule", "constant", "--elastic-resize-s", "2", "--subset", "1000")
    run_dir = tmp_path / "run" / "ray" / "run"
    try:
        _wait_checkpoint(run_dir, "epoch-0001", proc, log)
        assert _world_sizes(run_dir)[0] == 1
        cluster.add_worker()
        deadline = time.monotonic() + 180
        while 2 not in _world_sizes(run_dir)[1:]:
            assert proc.poll() is None and time.monotonic() < deadline, _finish(proc, log)[-3000:]
            time.sleep(0.5)
    finally:
        if len(cluster.workers) < 2:
            cluster.add_worker()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        text = _finish(proc, log, timeout_s=120)
    sizes = _world_sizes(run_dir)
    assert sizes[0] == 1 and sizes[-1] == 2, sizes
    assert "1-2 Ray Train worker(s)" in text


# --- the decisions behind the cluster tests, without a cluster --------------------------

def _node(ip: str, cpus: float = 1.0, alive: bool = True, gpus: float = 0.0) -> dict:
    return {"NodeManagerAddress": ip, "Alive": alive, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_worker_hosts_are_live_nodes_with_room_for_one_worker():
    from cnnray.train.shared_storage import worker_hosts

    nodes = [_node("10.0.0.1", cpus=0), _node("10.0.0.2"), _node("10.0.0.3", alive=False),
             _node("10.0.0.4", cpus=4, gpus=1)]
    assert worker_hosts(nodes, 1, gpu=False) == {"10.0.0.2", "10.0.0.4"}
    assert worker_hosts(nodes, 2, gpu=False) == {"10.0.0.4"}
    assert worker_hosts(nodes, 1, gpu=True) == {"10.0.0.4"}


@pytest.mark.parametrize("storage, fs_kind, hosts, refused", [
    ("/data/runs", "ext4", {"10.0.0.1", "10.0.0.2"}, True),  # another machine, this disk
    ("/data/runs", "ext4", {"10.0.0.1"}, False),  # every worker host is this machine
    ("/data/runs", "ext4", set(), False),  # nothing else can host a worker (yet)
    ("file:///data/runs", "ext4", {"10.0.0.2"}, True),  # file:// is this machine's disk too
    ("/mnt/nfs/runs", "nfs4", {"10.0.0.2"}, False),
    ("/mnt/share/runs", "cifs", {"10.0.0.2"}, False),
    ("/lustre/runs", "lustre", {"10.0.0.2"}, False),
    ("/mnt/bucket/runs", "fuse.s3fs", {"10.0.0.2"}, False),  # an object store mounted with FUSE
    ("/home/u/runs", "fuse.bindfs", {"10.0.0.2"}, True),  # a FUSE view of local files
    ("s3://bucket/runs", "", {"10.0.0.2"}, False),
    ("gs://bucket/runs", "", {"10.0.0.2"}, False),
    ("abfs://c@acct.dfs.core.windows.net/runs", "", {"10.0.0.2"}, False),
    ("hdfs://nn:8020/runs", "", {"10.0.0.2"}, False),
])
def test_storage_decision(storage, fs_kind, hosts, refused):
    from cnnray.train.shared_storage import storage_problem

    problem = storage_problem(storage, hosts, "10.0.0.1", fs_kind)
    assert (problem is not None) == refused
    if refused:  # one line that says what to pass instead
        assert "\n" not in problem and "10.0.0.2" in problem and "s3://" in problem and "--storage-path" in problem


def test_mount_type_finds_the_deepest_mount_of_a_path_not_yet_made(tmp_path):
    from cnnray.train.shared_storage import mount_type

    deep = tmp_path / "my runs"
    deep.mkdir()
    escaped = str(deep).replace(" ", "\\040")  # /proc/mounts escapes spaces
    mounts = f"/dev/sda1 / ext4 rw 0 0\nserver:/x {escaped} nfs4 rw 0 0\nserver:/y {tmp_path}/other nfs rw 0 0\n"
    assert mount_type(str(deep / "not" / "yet"), mounts) == "nfs4"
    assert mount_type(str(tmp_path / "elsewhere"), mounts) == "ext4"
    assert mount_type(str(tmp_path / "oth"), mounts) == "ext4"  # a name prefix is not a parent


@pytest.mark.parametrize("text, expected", [
    ("1-2", (1, 2)), ("2", (None, 2)), ("2-2", (None, 2)), (" 2-8 ", (2, 8)), (3, (None, 3)),
])
def test_workers_range_parses(text, expected):
    from cnnray.config import parse_workers

    assert parse_workers(text) == expected


@pytest.mark.parametrize("text, message", [
    ("2-1", "MIN 2 is above MAX 1"), ("0-3", r"must be in \[1, 4096\] at each end"),
    ("a-b", "a count N or a range MIN-MAX"), ("1-", "a count N or a range"), ("-1", "a count N or a range"),
    ("1-2-3", "a count N or a range"), ("1.5-2", "a count N or a range"),
])
def test_bad_workers_range_exits_2_with_one_line(text, message, capsys):
    from cnnray.cli import main
    from cnnray.config import ConfigError, TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--workers", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    with pytest.raises(ConfigError, match=message):  # the same rule for a YAML `workers:`
        TrainConfig.from_dict({"workers": text})


def test_elastic_config_yaml_flags_and_batch(tmp_path):
    import argparse

    from cnnray.config import ConfigError, TrainConfig
    from cnnray.cli.flags import add_train_flags, config_from_args

    cfg = TrainConfig.from_dict({"workers": "1-2"})
    assert (cfg.min_workers, cfg.workers, cfg.elastic, cfg.workers_text) == (1, 2, True, "1-2")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # travels to the workers intact
    # Every size in the range must split the global batch evenly (lcm(1, 2, 3) = 6).
    with pytest.raises(ConfigError, match="multiple of every worker count in 1-3.*try 126 or 132"):
        TrainConfig.from_dict({"workers": "1-3"})
    assert TrainConfig.from_dict({"workers": "1-3", "batch_size": 126}).batch_size == 126
    with pytest.raises(ConfigError, match="local_mode"):
        TrainConfig.from_dict({"workers": "1-2", "local_mode": True})
    # A --workers flag replaces the YAML file's range as a whole.
    (tmp_path / "c.yaml").write_text("workers: 1-2\n")
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    assert config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml")])).workers_text == "1-2"
    flagged = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--workers", "2"]))
    assert (flagged.min_workers, flagged.workers) == (None, 2)


def test_elastic_run_maps_to_ray_elastic_scaling_and_never_local_mode(monkeypatch):
    from cnnray.config import TrainConfig
    from cnnray.train import driver

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("cnnray.train.shared_storage.check_shared_storage", lambda *a: None)
    cfg = driver.resolve_run(TrainConfig(workers=2, min_workers=1, elastic_resize_s=5, out="/tmp/x"))
    assert cfg.local_mode is False
    scaling = driver._scaling_config(cfg, "/tmp/x/ray")
    assert scaling.num_workers == (1, 2) and scaling.elastic_resize_monitor_interval_s == 5
    assert driver._scaling_config(cfg.replace(min_workers=None), "/tmp/x/ray").num_workers == 2
    # A worker of an attempt with one rank takes the whole global batch; with two, half.
    assert cfg.replace(workers=1).batch_size_per_worker == 128 and cfg.batch_size_per_worker == 64


def test_repeated_cleaner_warning_is_shown_once_per_process(caplog):
    import logging

    from cnnray.ray_start import REPEATED_WARNINGS, quiet_repeated_warnings

    quiet_repeated_warnings()
    quiet_repeated_warnings()  # twice: still one filter
    for name, prefix in REPEATED_WARNINGS.items():
        logger = logging.getLogger(name)
        with caplog.at_level(logging.WARNING, logger=name):
            for _ in range(5):
                logger.warning(prefix + ". State API may be temporarily unavailable.")
            logger.warning("something else")
        shown = [r.getMessage() for r in caplog.records if r.name == name]
        assert len([m for m in shown if m.startswith(prefix)]) == 1 and "something else" in shown
        caplog.clear()
