"""The model store: where sweeps export their best checkpoints and Serve reads them.

Layout (a plain directory, so it can sit on a shared file system):

    <store>/<name>/<version>/   a cnnray checkpoint (meta.json, model.pt), version 1, 2, ...

A version is a folder named by an ASCII decimal without leading zeros ("1", "2", "10"):
names such as "02", "²" or "٣" (which Python's str.isdigit accepts) are not versions, and
neither is a plain file. A new export gets the next version number; it is copied into a
hidden temporary folder, verified, then renamed into place, so a reader never sees half a
version. Files and folders get the modes the exporting user's umask gives (not mkdtemp's
0700), so the account that serves can read what the training account exported.

Readers must expect anything else in a store too (a version still being copied by hand, a
folder another user made unreadable, stray files): `scan` lists the usable entries and
describes the rest, store-relative, instead of raising.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cnnray.checkpoint import META_FILE, STATE_FILE, verify_checkpoint
from cnnray.errors import CheckpointError, StoreError
from cnnray.files import atomic_write_json, dir_mode, file_mode

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$", re.ASCII)  # 1 .. 999,999,999: ASCII digits only
_EXPORT_TRIES = 100  # version numbers tried when other exporters keep taking the next one


@dataclass
class StoreScan:
    """What a look at a store found: `models` maps each model name to its version numbers
    (ascending; folders named as versions, not yet verified); `problems` describes, one line
    each and relative to the store, every entry that was skipped and why."""

    models: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise StoreError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_version(text: str) -> int | None:
    """The version number a folder name stands for, or None ("02", "²", "٣", "-1" are none)."""
    return int(text) if _VERSION.match(text) else None


def scan(store: str | Path) -> StoreScan:
    """Every model and version folder in `store`; nothing in it makes this raise."""
    root = Path(store)
    out = StoreScan()
    try:
        entries = sorted(root.iterdir())
    except OSError as e:
        out.problems.append(f"cannot read the store: {_why(e)}")
        return out
    for entry in entries:
        if entry.name.startswith("."):
            continue  # exports in progress (.incoming-*), editors' and file systems' own files
        if not _NAME.match(entry.name):
            out.problems.append(f"{entry.name[:80]!r}: not a model name (skipped)")
            continue
        if not entry.is_dir():
            out.problems.append(f"{entry.name}: not a folder (skipped)")
            continue
        found = _versions_in(entry, f"{entry.name}/", out.problems)
        if found:
            out.models[entry.name] = found
    return out


def _versions_in(model_dir: Path, label: str, problems: list[str]) -> list[int]:
    try:
        entries = sorted(model_dir.iterdir())
    except OSError as e:
        problems.append(f"{label}: cannot read the folder: {_why(e)}")
        return []
    found = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        version = parse_version(entry.name)
        if version is None:
            problems.append(f"{label}{entry.name[:80]!r}: not a version (versions are named 1, 2, 3, ...; skipped)")
        elif not entry.is_dir():
            problems.append(f"{label}{entry.name}: a file, not a version folder (skipped)")
        else:
            found.append(version)
    return sorted(found)


def export(checkpoint_dir: str | Path, store: str | Path, name: str) -> Path:
    """Copy a verified checkpoint into the store as the next version of `name`.

    The next version is one more than the largest number any entry of the model's folder
    is named by (a plain file named "3" takes 3 too); when another exporter takes it first,
    the next is tried, at most `_EXPORT_TRIES` times, then StoreError."""
    src = Path(checkpoint_dir)
    try:
        meta = verify_checkpoint(src)
    except CheckpointError as e:
        raise StoreError(f"cannot export: {e}") from None
    model_dir = Path(store) / check_name(name)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=".incoming-"))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp makes it 0700: readable by its creator only
        # Serving needs the weights, not the optimizer: leave train_state.pt behind and
        # list only the copied files (meta.json is not itself listed, so digests stay valid).
        meta["files"].pop(STATE_FILE, None)
        for f in meta["files"]:
            shutil.copyfile(src / f, tmp / f)
            os.chmod(tmp / f, file_mode())
        atomic_write_json(meta, tmp / META_FILE)
        verify_checkpoint(tmp)
        target_version = _taken_number(model_dir) + 1
        for _ in range(_EXPORT_TRIES):
            target = model_dir / str(target_version)
            try:
                tmp.rename(target)  # fails if `target` exists (a non-empty folder, or a file)
                return target
            except OSError:
                if not os.path.lexists(target):
                    raise
            target_version = max(target_version, _taken_number(model_dir)) + 1
        raise StoreError(f"cannot export {name!r}: no free version number after {_EXPORT_TRIES} tries")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _taken_number(model_dir: Path) -> int:
    """The largest version number any entry (folder or not) of `model_dir` is named by."""
    numbers = [parse_version(p.name) for p in model_dir.iterdir()]
    return max([n for n in numbers if n is not None], default=0)


def _why(e: OSError) -> str:
    return e.strerror.lower() if e.strerror else type(e).__name__
