"""Where a training run's files live, and the checkpoint bookkeeping of local mode.

A run keeps its checkpoints in `<storage>/<run name>/epoch-NNNN/`, listed in Ray Train's
`checkpoint_manager_snapshot.json` beside them. On Ray Train workers the controller's
checkpoint manager writes both. Local mode runs the loop in the driver without Ray
(`cnnray.train.session.LocalSession`; Ray Train's own local mode would only remember the
last checkpoint, and give nothing back from earlier runs), so `LocalCheckpoints` does the
manager's job in the same layout:
the best `keep` checkpoints by validation accuracy plus the latest, each folder moved into
place whole and the snapshot rewritten atomically. Either path can therefore resume a run
the other one started (`--resume`), and readers see one layout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cnnray.checkpoint import CheckpointError, atomic_write_json
from cnnray.config import TrainConfig

# The file name Ray Train's checkpoint manager uses (ray.train.v2._internal.constants).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
SCORE = "val_accuracy"  # checkpoints are ranked by it, higher is better


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


class LocalCheckpoints:
    """Ray Train's checkpoint bookkeeping for a local-mode run in `run_dir` (see module doc).

    Not safe for two processes writing one run at once; the driver refuses a second run in
    an existing folder unless it resumes."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        # Each entry: {"checkpoint_dir_name", "metrics", "report_index"}, in Ray's order
        # (ascending by score, then by report index: the best is last).
        self._results: list[dict[str, Any]] = []
        self._latest: str | None = None
        self._report_index = 0
        self._load()

    # --- reading -------------------------------------------------------------------------
    def _load(self) -> None:
        path = self.run_dir / SNAPSHOT_FILE
        if not path.exists():
            return
        try:
            snap = json.loads(path.read_text())
            results = snap["checkpoint_results"]
            indices = snap["checkpoint_report_indices"]
            latest = snap.get("latest_checkpoint_result")
            self._results = [
                {"checkpoint_dir_name": r["checkpoint_dir_name"], "metrics": dict(r["metrics"]), "report_index": int(i)}
                for r, i in zip(results, indices, strict=True)
            ]
            self._latest = latest["checkpoint_dir_name"] if latest else None
            self._report_index = int(snap.get("current_report_index", len(self._results)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"unreadable checkpoint list {path}: {e}") from e

    def latest(self) -> Path | None:
        """The folder of the last registered checkpoint (what a resume continues from)."""
        return self.run_dir / self._latest if self._latest else None

    def results(self) -> list[tuple[Path, dict[str, Any]]]:
        """(folder, reported metrics) of every kept checkpoint, worst first."""
        return [(self.run_dir / r["checkpoint_dir_name"], r["metrics"]) for r in self._results]

    # --- writing -------------------------------------------------------------------------
    def register(self, src: str | Path, dir_name: str, metrics: dict[str, Any]) -> Path:
        """Copy the checkpoint folder `src` to `<run_dir>/<dir_name>` (whole or not at all),
        record it as the latest, and drop checkpoints that are neither among the best
        `keep` nor the latest. Returns the kept folder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dest = self.run_dir / dir_name
        staging = Path(tempfile.mkdtemp(prefix=f".{dir_name}.", dir=self.run_dir))
        try:
            shutil.copytree(src, staging, dirs_exist_ok=True)
            if dest.exists():  # left by an attempt that stopped before it listed it
                shutil.rmtree(dest)
            os.replace(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._results = [r for r in self._results if r["checkpoint_dir_name"] != dir_name]
        self._results.append({"checkpoint_dir_name": dir_name, "metrics": metrics, "report_index": self._report_index})
        self._results.sort(key=lambda r: (r["metrics"].get(SCORE, float("-inf")), r["report_index"]))
        self._latest = dir_name
        self._report_index += 1
        dropped = [r for r in self._results[: -self.keep] if r["checkpoint_dir_name"] != dir_name]
        self._results = [r for r in self._results if r not in dropped]
        # The list first, then the deletions: a crash in between leaves stray folders,
        # never a list naming a deleted one (the order Ray's own manager keeps).
        atomic_write_json(self._snapshot(), self.run_dir / SNAPSHOT_FILE)
        for r in dropped:
            shutil.rmtree(self.run_dir / r["checkpoint_dir_name"], ignore_errors=True)
        return dest

    def _snapshot(self) -> dict[str, Any]:
        """Ray Train 2.60's `_CheckpointManagerState`, so Ray Train workers can resume it."""
        from importlib.metadata import version

        def state(r: dict[str, Any]) -> dict[str, Any]:
            return {"version": 0, "checkpoint_dir_name": r["checkpoint_dir_name"], "metrics": r["metrics"]}

        latest = next(r for r in self._results if r["checkpoint_dir_name"] == self._latest)
        return {
            # Read from the installed package: importing Ray only for this would cost local
            # mode (which runs without Ray) about as much as importing torch.
            "ray_version": version("ray"),
            "checkpoint_results": [state(r) for r in self._results],
            "checkpoint_report_indices": [r["report_index"] for r in self._results],
            "latest_checkpoint_result": state(latest),
            "pending_training_results": [],
            "pending_validation_specs": [],
            "current_report_index": self._report_index,
            "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [],
            "failed_validation_checkpoint_dir_names": [],
        }
