"""`cnnray train --address` on a Ray cluster of several nodes (tests/multinode.py: a head
with no CPUs and worker nodes of 1 CPU each, all on loopback): one worker per node, a
node lost mid-run, an elastic run that goes on with fewer workers, the storage check,
and a log of one progress line per epoch."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import registered_checkpoints, spawn_cnnray
from tests.multinode import LoopbackCluster

# Small enough for ~20 s of epochs on 2 busy cores, big enough that accuracy means something.
TRAIN = ["train", "--model", "cnn", "--dataset", "mnist", "--subset", "4000", "--batch-size", "64",
         "--lr", "0.05", "--seed", "0", "--no-report"]
PROGRESS = re.compile(r"\[cnnray\] epoch (\d+)/(\d+) ")


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


def test_two_workers_on_two_nodes_train_and_checkpoint_to_shared_storage(cluster, mnist_dir, tmp_path):
    storage = tmp_path / "shared"  # every node is this machine: its disk is shared storage
    before = {a["ActorID"] for a in cluster.actors("RayTrainWorker")}
    proc, log = _start(cluster, mnist_dir, tmp_path / "run", "--workers", "2", "--epochs", "2",
                       "--storage-path", str(storage))
    text = _finish(proc, log)
    assert proc.returncode == 0, text[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [h["world_size"] for h in result["history"]] == [2, 2]
    assert result["test_accuracy"] > 0.9
    assert result["checkpoint"].startswith(str(storage / "run"))
    assert registered_checkpoints(storage / "run") >= {"epoch-0002"}
    # One worker on each node: the head has no CPUs, and the two workers sat on different nodes.
    workers = [a for a in cluster.actors("RayTrainWorker") if a["ActorID"] not in before]
    assert len(workers) == 2
    assert {a["Address"]["NodeID"] for a in workers} == {n.node_id for n in cluster.workers}
    _assert_one_line_per_epoch(text, 2)


def test_node_lost_after_first_checkpoint_resumes_from_it(cluster, mnist_dir, tmp_path):
    proc, log = _start(cluster, mnist_dir, tmp_path / "run", "--workers", "2", "--epochs", "4")
    run_dir = tmp_path / "run" / "ray" / "run"
    _wait_checkpoint(run_dir, "epoch-0001", proc, log)
    cluster.remove(cluster.workers[0])  # a machine gone: its raylet, worker and all
    cluster.add_worker()  # and a fresh one in its place
    text = _finish(proc, log)
    assert proc.returncode == 0, text[-3000:]
    history = json.loads((tmp_path / "run" / "result.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[0]["start_epoch"] == 0 and history[-1]["start_epoch"] >= 1  # resumed, not restarted
    assert all(h["world_size"] == 2 for h in history)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["test_accuracy"] > 0.93
    _assert_one_line_per_epoch(text, 4)


def test_elastic_run_goes_on_with_fewer_workers(cluster, mnist_dir, tmp_path):
    """--workers 1-2 loses a node after epoch 1 and finishes on the one left, with the same
    global batch (per-worker batch 64 instead of 32) and nothing repeated but the last epoch."""
    proc, log = _start(cluster, mnist_dir, tmp_path / "run", "--workers", "1-2", "--epochs", "3")
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
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0]["world_size"] == 2 and history[-1]["world_size"] == 1
    assert history[-1]["start_epoch"] >= 1
    assert result["min_workers"] == 1 and result["workers"] == 2
    assert result["test_accuracy"] > 0.9
    assert "1-2 Ray Train worker(s)" in text


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
