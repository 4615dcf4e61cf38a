"""Files written whole or not at all, and the names of the files cnnray's folders hold.

A run folder (`cnnray train --out`) holds `RESULT_FILE`, the claim `CLAIM_FILE` and Ray's
run folder; a sweep folder (`cnnray tune --out`) holds the trial table, the histories,
`best.json` and the trials' runs. Training, Tune and the report all read these names
from here, so the report needs no training code to find them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

# --- a run folder (cnnray train --out) ------------------------------------------------------
RESULT_FILE = "result.json"
# Locked (flock) in the run folder from before Ray starts until the run ends: a second
# `cnnray train` with the same --out is refused at once, not after Ray made its folder.
CLAIM_FILE = ".cnnray-run"

# --- a sweep folder (cnnray tune --out) -----------------------------------------------------
TUNE_DIR = "tune"  # Tune's experiment: state, one folder per trial (result.json)
RUNS_DIR = "runs"  # Ray Train storage; each trial's run is named by its trial id
TRIALS_CSV = "trials.csv"
TRIALS_PARQUET = "trials.parquet"
HISTORIES_FILE = "histories.json"
HISTORY_DIR = "history"  # <trial_id>.jsonl: every epoch a trial's Train runs reported (cnnray.tune.history)
BEST_FILE = "best.json"
PBT_DIR = "pbt"  # PBT only: each exploited trial's next Train run and donor checkpoint
EXPLOITS_FILE = "exploits.json"  # PBT only: every exploit (cnnray.tune.pbt), read by the report


def current_umask() -> int:
    """The process's umask (Linux reads it without changing it; elsewhere set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask (mkstemp would give 0600)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode `mkdir` gives a new folder: 0777 less the umask (mkdtemp would give 0700)."""
    return 0o777 & ~current_umask()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename into place:
    readers see the old file or the new one, never a torn one. The file gets the mode a
    plain `open()` would give it (the umask decides who may read it), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """`data` into `path` with `atomic_write` (the folder must exist)."""
    atomic_write(path, lambda f: f.write(data))


def read_exploits(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The exploits a PBT sweep in `sweep_dir` recorded (EXPLOITS_FILE: from, to, epoch,
    old/donor/new values); [] without PBT, or before its first exploit."""
    try:
        return json.loads((Path(sweep_dir) / EXPLOITS_FILE).read_text())
    except (OSError, ValueError):
        return []


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), p)
