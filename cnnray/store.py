"""The model store: where sweeps export their best checkpoints and Serve reads them.

Layout (a plain directory, so it can sit on a shared file system):

    <store>/<name>/<version>/   a cnnray checkpoint (meta.json, model.pt), version 1, 2, ...

A new export gets the next version number; it is copied into a hidden temporary folder,
verified, then renamed into place, so a reader never sees half a version.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from cnnray.checkpoint import META_FILE, STATE_FILE, CheckpointError, atomic_write_json, verify_checkpoint

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class StoreError(ValueError):
    """A model store, model name or version that cannot be used."""


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise StoreError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def versions(store: str | Path, name: str) -> list[int]:
    d = Path(store) / check_name(name)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def list_models(store: str | Path) -> dict[str, list[int]]:
    """{name: [versions]} of every model with at least one version."""
    root = Path(store)
    if not root.is_dir():
        return {}
    found = {p.name: versions(root, p.name) for p in sorted(root.iterdir()) if p.is_dir() and _NAME.match(p.name)}
    return {k: v for k, v in found.items() if v}


def version_path(store: str | Path, name: str, version: int | None = None) -> Path:
    """The folder of `version` (default: the newest) of model `name`."""
    have = versions(store, name)
    if not have:
        raise StoreError(f"model {name!r} has no version in store {store}")
    v = have[-1] if version is None else version
    if v not in have:
        raise StoreError(f"model {name!r} has no version {v} in store {store} (has {have})")
    return Path(store) / name / str(v)


def export(checkpoint_dir: str | Path, store: str | Path, name: str) -> Path:
    """Copy a verified checkpoint into the store as the next version of `name`."""
    src = Path(checkpoint_dir)
    try:
        meta = verify_checkpoint(src)
    except CheckpointError as e:
        raise StoreError(f"cannot export: {e}") from None
    model_dir = Path(store) / check_name(name)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=".incoming-"))
    try:
        # Serving needs the weights, not the optimizer: leave train_state.pt behind and
        # list only the copied files (meta.json is not itself listed, so digests stay valid).
        meta["files"].pop(STATE_FILE, None)
        for f in meta["files"]:
            shutil.copy2(src / f, tmp / f)
        atomic_write_json(meta, tmp / META_FILE)
        verify_checkpoint(tmp)
        while True:  # another exporter may take a number first: retry with the next
            target = model_dir / str((versions(store, name) or [0])[-1] + 1)
            try:
                tmp.rename(target)
                return target
            except OSError:
                if not target.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
