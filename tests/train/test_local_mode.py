"""Ray start-up and local mode without a Ray: which path a run takes, how many cores it gets,
the checkpoints local mode keeps itself, the layering, and the niceness of a local Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cnnray.config import ConfigError, TrainConfig
from cnnray.train.driver import resolve_run
from cnnray.train.run_dir import SNAPSHOT_FILE
from cnnray.train.session import LocalCheckpoints
from tests.helpers import REPO


@pytest.fixture
def cores(monkeypatch):
    """Pretend the machine has 8 cores and no cluster is named."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("cnnray.train.driver.local_cpu_count", lambda: 8)
    return 8


def test_one_worker_on_this_machine_runs_in_local_mode_on_every_core(cores, tmp_path):
    cfg = resolve_run(TrainConfig(out=str(tmp_path / "r")))
    assert cfg.local_mode is True and cfg.cpus_per_worker == 8


def test_several_workers_share_the_cores_on_ray_train(cores, tmp_path):
    cfg = resolve_run(TrainConfig(workers=3, batch_size=129, out=str(tmp_path / "r")))
    assert cfg.local_mode is False and cfg.cpus_per_worker == 2  # 8 // 3


def test_the_users_choices_win(cores, tmp_path):
    cfg = resolve_run(TrainConfig(cpus_per_worker=3, local_mode=False, out=str(tmp_path / "r")))
    assert cfg.local_mode is False and cfg.cpus_per_worker == 3


def test_joining_a_cluster_uses_ray_train_and_one_cpu_per_worker(cores, tmp_path, monkeypatch):
    cfg = resolve_run(TrainConfig(address="ray://head:10001", out=str(tmp_path / "r")))
    assert cfg.local_mode is False and cfg.cpus_per_worker == 1
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert resolve_run(TrainConfig(out=str(tmp_path / "r"))).local_mode is False


def test_uri_storage_is_not_local(cores, tmp_path):
    cfg = TrainConfig(storage_path="s3://bucket/runs", out=str(tmp_path / "r"))
    assert resolve_run(cfg).local_mode is False
    with pytest.raises(ConfigError, match="URI"):
        resolve_run(cfg.replace(local_mode=True))


def test_local_mode_with_several_workers_is_refused():
    with pytest.raises(ConfigError, match="local_mode"):
        TrainConfig(workers=2, local_mode=True)


def test_local_mode_with_gpu_needs_a_gpu_here(cores, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_run(TrainConfig(gpu=True, out=str(tmp_path / "r")))


def _checkpoint(tmp_path, epoch: int):
    src = tmp_path / f"src{epoch}"
    src.mkdir()
    (src / "weights.bin").write_bytes(bytes([epoch]) * 10)
    return src


def test_local_checkpoints_keep_the_best_and_the_latest_in_rays_format(tmp_path):
    run = tmp_path / "ray" / "run"
    kept = LocalCheckpoints(run, keep=2)
    for epoch, acc in enumerate([0.5, 0.9, 0.7, 0.8, 0.6], start=1):
        kept.register(_checkpoint(tmp_path, epoch), f"epoch-{epoch:04d}", {"epoch": epoch, "val_accuracy": acc})
    # Best two (epochs 2 and 4) plus the latest (5); nothing half-copied left behind.
    assert sorted(p.name for p in run.iterdir()) == sorted(["epoch-0002", "epoch-0004", "epoch-0005", SNAPSHOT_FILE])
    assert (run / "epoch-0005" / "weights.bin").read_bytes() == bytes([5]) * 10
    assert [m["epoch"] for _, m in kept.results()] == [5, 4, 2]  # worst first, as Ray lists them
    # A new reader (a resume) sees the same list and latest.
    again = LocalCheckpoints(run, keep=2)
    assert again.latest() == run / "epoch-0005"
    assert again.results() == kept.results()
    # Ray Train's own checkpoint manager reads the file (so Ray Train workers can resume it).
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    state = _CheckpointManagerState.model_validate(json.loads((run / SNAPSHOT_FILE).read_text()))
    assert state.latest_checkpoint_result.checkpoint_dir_name == "epoch-0005"
    assert state.current_report_index == 5


def test_unreadable_checkpoint_list_is_a_checkpoint_error(tmp_path):
    from cnnray.checkpoint import CheckpointError

    (tmp_path / SNAPSHOT_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable checkpoint list"):
        LocalCheckpoints(tmp_path, keep=2)


def _python(code: str, timeout_s: float) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter from the repository root, without $RAY_ADDRESS (so a
    Ray it starts is its own); asserts it exited 0."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow  # starts Ray or a server
def test_a_local_ray_runs_its_workers_at_normal_priority():
    """Ray's default worker niceness (15) lets anything at 0 take the CPU from a training
    worker; the Ray that cnnray starts runs them at 0."""
    code = (
        "import os, ray\n"
        "from cnnray.ray_start import init_ray\n"
        "assert init_ray()\n"
        "try:\n"
        "    print('NICE', ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote()))\n"
        "finally:\n"
        "    ray.shutdown()\n"
    )
    proc = _python(code, timeout_s=180)
    nice = [line for line in proc.stdout.splitlines() if line.startswith("NICE")]
    assert nice == [f"NICE {__import__('os').nice(0)}"], proc.stdout


def test_a_local_mode_run_imports_no_ray_and_reads_the_data_once(mnist_dir, data_cache, tmp_path):
    """Local mode trains in this process: importing Ray (Ray Train, Ray Data, pandas,
    pyarrow) would cost about as long as importing torch, for nothing it uses; and the
    data the pre-flight check loaded is the data the loop trains on (one read, one decode).
    A fresh interpreter, since the test session itself may have imported Ray."""
    code = (
        "import json, sys\n"
        "import cnnray.train.worker_data as wd\n"
        "from cnnray.config import TrainConfig\n"
        "from cnnray.train.driver import run_training\n"
        "loads = []\n"
        "real = wd.load_for\n"
        "wd.load_for = lambda cfg: loads.append(1) or real(cfg)\n"
        f"cfg = TrainConfig(model='cnn', dataset='mnist', data_dir={str(mnist_dir)!r}, subset=1000, batch_size=64,\n"
        f"                  epochs=2, workers=1, out={str(tmp_path / 'run')!r})\n"
        "summary = run_training(cfg, echo=lambda line: None)\n"
        "print('RESULT', json.dumps({'local_mode': summary['local_mode'], 'loads': len(loads),\n"
        "      'ray': sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'pandas', 'pyarrow')))}))\n"
    )
    proc = _python(code, timeout_s=300)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line.removeprefix("RESULT ")) == {"local_mode": True, "loads": 1, "ray": []}
    # What users get is unchanged: the kept checkpoints, in Ray Train's layout, and result.json.
    run_dir = tmp_path / "run" / "ray" / "run"
    assert (run_dir / SNAPSHOT_FILE).exists() and (run_dir / "epoch-0002").is_dir()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["last_checkpoint"].endswith("epoch-0002")


def test_the_program_collects_no_garbage_during_start_up_and_freezes_it():
    """`cnnray` pauses the cyclic collector while torch (and, for train, torch._dynamo)
    import, then freezes those objects and collects again: no full collection walks the
    start-up's objects during the imports or the run."""
    code = (
        "import gc, sys\n"
        "passes = []\n"
        "gc.callbacks.append(lambda phase, info: passes.append(info['generation']) if phase == 'start' else None)\n"
        # Parses and imports everything, then refuses the combination (exit 2) before any data.
        "sys.argv = ['cnnray', 'train', '--workers', '2', '--local-mode']\n"
        "from cnnray.cli import main\n"
        "assert main() == 2\n"
        "assert gc.isenabled() and gc.get_freeze_count() > 100_000, gc.get_freeze_count()\n"
        "assert 'torch._dynamo' in sys.modules\n"
        "assert 2 not in passes, passes\n"
    )
    _python(code, timeout_s=120)


def test_a_training_process_reuses_freed_memory_instead_of_faulting_in_new_pages():
    """After keep_freed_memory (which every training loop calls first), freeing and
    re-allocating a step's worth of large tensors costs no page faults. With glibc's
    defaults, blocks above its largest automatic mmap threshold (32 MiB) are always handed
    back to the OS when freed and faulted in again when reused (smaller ones too, depending
    on the process's history: that is what made identical runs differ)."""
    code = (
        "import resource, torch\n"
        "from cnnray.train.allocator import keep_freed_memory\n"
        "def faults():\n"
        "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(10):\n"
        "        xs = [torch.ones(12 << 20) for _ in range(2)]\n"  # 2 tensors of 48 MiB, freed each round
        "        del xs\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start\n"
        "before = faults()\n"
        "assert keep_freed_memory()\n"
        "faults()\n"  # the heap grows to the working set once
        "after = faults()\n"
        "assert before > 100_000 and after < 1_000, (before, after)\n"
    )
    _python(code, timeout_s=120)
