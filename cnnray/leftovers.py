"""A failed command leaves nothing behind: folders it created only to fail are removed again.

    with removed_on_failure(out, own=(".cnnray-run",)):
        ...  # may create `out` (and missing parents), lock it, then fail

A mistyped `--data-dir ../mnst` or `--out` used to leave a new folder holding only a lock
file. On an exception, the folders this block created (`folder` and the parents it lacked)
are removed when they hold nothing but the block's `own` files (its lock or claim); a
folder where anything else was written (a download, a checkpoint) is kept, as is any
folder that existed before. Nothing here imports beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def missing_dirs(folder: Path) -> list[Path]:
    """`folder` and its missing parents, deepest first: what mkdir(parents=True) would create."""
    out = []
    d = Path(folder).absolute()
    while not d.exists() and d != d.parent:
        out.append(d)
        d = d.parent
    return out


def remove_created(folder: Path, created: list[Path], own: tuple[str, ...] = ()) -> bool:
    """Remove the `created` folders (deepest first) when `folder` holds only `own` files;
    True when `folder` was created and is gone. Never raises (best effort)."""
    if not created:
        return False
    folder = Path(folder).absolute()
    try:
        if any(p.name not in own for p in folder.iterdir()):
            return False
        for name in own:
            (folder / name).unlink(missing_ok=True)
        for d in created:
            d.rmdir()  # OSError when a parent holds something else now: it stays
    except OSError:
        return not folder.exists()
    return True


@contextmanager
def removed_on_failure(folder: Path, own: tuple[str, ...] = ()) -> Iterator[list[Path]]:
    """Run the block; when it raises, `remove_created(folder, <what it created>, own)`.
    Yields the list of folders that did not exist before (deepest first)."""
    created = missing_dirs(folder)
    try:
        yield created
    except BaseException:
        remove_created(folder, created, own)
        raise
