"""What a user hands `--checkpoint` (or a serve config's `checkpoints:`): a checkpoint
folder, or the training run folder they have in hand (`runs/mnist-cnn`), whose best
checkpoint its result.json names. A folder that only holds checkpoints further down
(Ray's run folder, a sweep's) is refused with the newest one named, so the error is the fix.
Serving reads result.json as plain JSON: it never imports the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

from cnnray.checkpoint import META_FILE, CheckpointError

RESULT_FILE = "result.json"  # what `cnnray train` writes in --out (train/driver.py); "checkpoint": the best
SEARCH_DEPTH = 4  # run/ray/<name>/epoch-0003/meta.json is 3 levels below the run folder


def checkpoint_in(path: str) -> str:
    """`path` itself when it is a checkpoint (or not a folder: the caller's check names
    that); a run folder's best checkpoint (result.json's "checkpoint", or the folder of
    that name inside the run folder when the run was moved). CheckpointError naming the
    checkpoint to pass when the folder holds checkpoints but is none and has no usable
    result.json."""
    p = Path(path)
    if not p.is_dir() or (p / META_FILE).is_file():
        return path
    named = _result_checkpoint(p)
    if named is not None:
        if (Path(named) / META_FILE).is_file():
            return named
        # A run folder copied or moved elsewhere: its result.json keeps the old absolute path.
        moved = [c for c in _checkpoints_below(p) if c.name == Path(named).name]
        if moved:
            return str(moved[0])
    found = _checkpoints_below(p)
    if not found:
        return path  # the checkpoint check then says "has no meta.json"
    newest = max(found, key=lambda c: ((c / META_FILE).stat().st_mtime, str(c)))
    why = (f"its {RESULT_FILE} names {named}, which is gone" if named is not None
           else f"it is not a checkpoint (no {META_FILE}) and has no {RESULT_FILE} naming the best one")
    raise CheckpointError(
        f"{p}: {why}; it holds {len(found)} checkpoint(s): pass one, e.g. --checkpoint {newest}"
    )


def _result_checkpoint(run: Path) -> str | None:
    try:
        value = json.loads((run / RESULT_FILE).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _checkpoints_below(root: Path) -> list[Path]:
    """Checkpoint folders (holding meta.json) at most SEARCH_DEPTH levels below `root`."""
    found: list[Path] = []
    level = [root]
    for _ in range(SEARCH_DEPTH):
        nxt = []
        for d in level:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.is_symlink())
            except OSError:
                continue
            for c in children:
                (found if (c / META_FILE).is_file() else nxt).append(c)
        level = nxt[:10_000]  # bounded: a home folder passed by mistake is not walked whole
    return found
