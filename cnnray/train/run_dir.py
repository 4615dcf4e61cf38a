"""A training run's folder: where its files live, the claim that keeps a second run out,
and what a resume may continue.

A run keeps its checkpoints in `<storage>/<run name>/epoch-NNNN/`, listed in Ray Train's
`checkpoint_manager_snapshot.json` beside them (Ray Train's controller writes both on
workers; `cnnray.train.session.LocalCheckpoints` in local mode, in the same layout).
Before anything touches `--out`, `claim_run_folder` locks it (`.cnnray-run`, released by
the kernel when the process ends) and refuses a folder that holds a run unless it
resumes; `check_resume` refuses what a resume cannot honour.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cnnray.checkpoint import read_meta
from cnnray.config import ConfigError, TrainConfig
from cnnray.files import CLAIM_FILE, RESULT_FILE

# The file name Ray Train's checkpoint manager uses (ray.train.v2._internal.constants).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# Config keys a resumed run cannot change: the checkpoint's weights only fit this model.
RESUME_FIXED = ("model", "norm", "hidden_sizes", "dataset")


def run_paths(cfg: TrainConfig) -> tuple[Path, str, str]:
    """(out dir, Ray storage path, run name). The run name is the out dir's name so that
    several runs can share one storage path on a cluster. TrainConfig made both paths
    absolute (cnnray.paths), so every guard, Ray and the workers all see the same ones."""
    out = Path(cfg.out)
    storage = cfg.storage_path or str(out / "ray")
    return out, storage, out.name or "cnnray"


def local_run_dir(cfg: TrainConfig) -> Path | None:
    """The run folder on this machine's file system, or None when the storage is a URI."""
    _, storage, name = run_paths(cfg)
    if "://" in storage and not storage.startswith("file://"):
        return None
    return Path(storage.removeprefix("file://")).expanduser().resolve() / name


def _run_exists(storage: str, name: str) -> bool:
    if "://" not in storage:  # a local path (TrainConfig made it absolute): no pyarrow needed
        return (Path(storage) / name).exists()
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)  # an absolute path or a URI (TrainConfig)
    info = fs.get_file_info(f"{root.rstrip('/')}/{name}")
    return info.type != pyarrow.fs.FileType.NotFound


def lock_folder(out: Path, what: str = "cnnray train") -> int:
    """Lock `out` (created if needed) for this process: the descriptor to keep open while
    working in it. Atomic: an exclusive flock on `<out>/.cnnray-run`, which the kernel
    releases when the process ends, even on SIGKILL, so no stale lock is left behind.
    ConfigError, naming the holder, when another process holds it."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / CLAIM_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "starting"
        os.close(fd)
        raise ConfigError(f"{out} is in use by another {what} ({owner}): wait for it, or choose another --out") from None
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    return fd


def claim_run_folder(out: Path, storage: str, name: str, resume: bool) -> tuple[int, bool]:
    """Claim `out` for this run before anything else touches it (`lock_folder`): (descriptor
    to keep open while training, whether `out` already held a run). ConfigError when
    another run uses `out` now, or when `out` holds an earlier run (Ray's run folder
    exists) and `resume` is off."""
    fd = lock_folder(out)
    # Checked under the lock: whoever held it before has finished, its Ray folder is there.
    existed = _run_exists(storage, name)
    if existed and not resume:
        os.close(fd)
        raise ConfigError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    return fd, existed


def last_checkpoint_meta(storage: str, name: str) -> dict[str, Any] | None:
    """meta.json of the run's newest checkpoint that Ray Train registered (what a resume
    starts from); None when there is none, or the storage is remote (the workers read it)."""
    if "://" in storage:
        return None
    run_dir = Path(storage) / name
    try:
        snapshot = json.loads((run_dir / SNAPSHOT_FILE).read_text())
        names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not names:
        return None
    newest = max(names, key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else -1)
    return read_meta(run_dir / newest)  # epoch-NNNN (more digits past 9999)


def _finished_epochs(out: Path) -> int:
    """The last epoch in `out`'s result.json: what the run's last completed command
    trained (0 when it has none, or it cannot be read)."""
    try:
        history = json.loads((out / RESULT_FILE).read_text()).get("history") or []
        return int(history[-1]["epoch"]) if history else 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def check_resume(cfg: TrainConfig, meta: dict[str, Any] | None, out: Path) -> None:
    """Refuse up front (ConfigError) what a resume cannot honour: fewer epochs than the run
    already trained, or a different model. More epochs are fine (see build_scheduler);
    the same number is fine for a run stopped after its last checkpoint but before its
    result.json (an interrupt during the end-of-run test): the resume trains no epoch and
    finishes the run (test, result.json, report)."""
    if meta is None:
        return
    done, stored = int(meta["epoch"]), meta.get("config", {})
    changed = [k for k in RESUME_FIXED if k in stored and stored[k] != cfg.to_dict()[k]]
    if changed:
        was = ", ".join(f"{k}={stored[k]!r}" for k in changed)
        raise ConfigError(f"the run in {out} was trained with {was}: --resume keeps these; choose another --out")
    if cfg.epochs < done or (cfg.epochs == done and _finished_epochs(out) >= done):
        raise ConfigError(
            f"the run in {out} has already trained {done} epoch(s): pass --epochs greater than {done} "
            "to train it longer (the schedule then spans the new total)"
        )
