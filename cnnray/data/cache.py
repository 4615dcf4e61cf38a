"""On-disk cache of decoded datasets, so slow decodes (60,000 JPEGs) happen once per node.

A cache entry is one uncompressed `.npz` of uint8/int64/str arrays, read back with
`allow_pickle=False`. Its name is a hash of the sources' paths, sizes and mtimes plus
`FORMAT_VERSION` and the image decoder's id (cnnray/data/decode.py `DECODER_ID`, for
readers that decode images), so editing or replacing a source, changing the decoded
layout, or changing how an image is decoded simply misses the old entry. Entries are written atomically under a per-entry file lock
so that the workers of one node decode once between them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from filelock import FileLock

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the arrays a reader stores change meaning or layout
LOCK_TIMEOUT_S = 3600.0  # a worker waits this long for another worker's decode

Arrays = dict[str, np.ndarray]


def cache_key(kind: str, sources: Iterable[Path], decoder: str = "") -> str:
    """Hash of kind, format version, decoder id and each source's absolute path, size and
    mtime (ns)."""
    h = hashlib.sha256(f"cnnray-data v{FORMAT_VERSION} {kind} {decoder}".encode())
    for path in sources:
        st = path.stat()
        h.update(f"\0{path.absolute()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return f"{kind}-{h.hexdigest()[:24]}"


def _read(path: Path) -> Arrays:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write(path: Path, arrays: Arrays) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            # Uncompressed: loading is then a plain read, ~10x faster than inflating.
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers never see a half-written entry
    finally:
        tmp.unlink(missing_ok=True)


def _try_read(path: Path) -> Arrays | None:
    if not path.is_file():
        return None
    try:
        return _read(path)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable cache entry %s (%s); decoding again", path, exc)
        return None


def cached_arrays(
    cache_dir: Path,
    kind: str,
    sources: Iterable[Path],
    build: Callable[[], Arrays],
    decoder: str = "",
) -> Arrays:
    """The arrays `build()` returns for these sources, from the cache when possible.

    `decoder` names the image decoder `build` uses (decode.DECODER_ID), so that arrays
    an older decoder made are never reused.

    A cache dir that cannot be created or written only costs speed: the arrays are built
    and returned uncached, with a warning.
    """
    key = cache_key(kind, sources, decoder)
    path = cache_dir / f"{key}.npz"
    if (hit := _try_read(path)) is not None:
        log.debug("loaded %s from cache %s", kind, path)
        return hit
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_dir / f"{key}.lock"), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except OSError as exc:  # read-only or full file system; filelock.Timeout is an OSError too
        log.warning("cannot use cache dir %s (%s); decoding without a cache", cache_dir, exc)
        return build()
    try:
        # Another worker may have written the entry while this one waited for the lock.
        if (hit := _try_read(path)) is not None:
            return hit
        start = time.perf_counter()
        arrays = build()
        log.info("decoded %s in %.1f s", kind, time.perf_counter() - start)
        try:
            _write(path, arrays)
        except OSError as exc:
            log.warning("cannot write cache entry %s (%s)", path, exc)
        return arrays
    finally:
        lock.release()
