"""Fetching dataset files: mirrors tried in order, MD5-checked, written atomically under a lock.

Several Ray workers on one node may start at once on an empty data dir; `dir_lock` makes
one of them download while the others wait, then find the files already there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path

from filelock import FileLock, Timeout

from cnnray.data.base import DataError

log = logging.getLogger(__name__)

USER_AGENT = "cnnray"  # some mirrors refuse urllib's default agent
SOCKET_TIMEOUT_S = 60.0  # per connect/read, not per file: a slow but live mirror is fine
CHUNK_BYTES = 1 << 20  # read and hash 1 MiB at a time, so a 170 MB archive never sits in memory
LOCK_TIMEOUT_S = 3600.0  # how long a worker waits for another's download before giving up


class DownloadFailed(Exception):
    """Every mirror failed for one file; `reasons` holds one line per mirror."""

    def __init__(self, name: str, reasons: list[str]) -> None:
        super().__init__(f"{name}: " + "; ".join(reasons))
        self.reasons = reasons


@contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Create `directory` and hold `<directory>/.lock` (an OS lock, freed if the holder dies)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data dir {directory}: {exc.strerror or exc}") from exc
    lock = FileLock(str(directory / ".lock"), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout as exc:
        raise DataError(
            f"waited {LOCK_TIMEOUT_S:.0f} s for {directory / '.lock'}; another download seems "
            "stuck: stop it or delete the lock file"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot lock {directory / '.lock'}: {exc.strerror or exc}") from exc
    try:
        yield
    finally:
        lock.release()


def _fetch_one(url: str, dest: Path, md5: str | None) -> None:
    # The temporary file sits next to dest so that os.replace is an atomic rename: readers
    # see either no file or the whole verified file, never a partial one.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        size = 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
            request, timeout=SOCKET_TIMEOUT_S
        ) as response:
            expected = response.headers.get("Content-Length")
            while chunk := response.read(CHUNK_BYTES):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and expected.isdigit() and int(expected) != size:
            raise DownloadFailed(dest.name, [f"got {size} of {expected} bytes"])
        if md5 is not None and h.hexdigest() != md5:
            raise DownloadFailed(dest.name, [f"MD5 {h.hexdigest()} does not match {md5}"])
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful replace


def fetch(urls: Sequence[str], dest: Path, md5: str | None) -> None:
    """Download `dest` from the first of `urls` that works and matches `md5`.

    The caller holds `dir_lock(dest.parent)`. Raises `DownloadFailed` when all mirrors fail.
    """
    reasons: list[str] = []
    for url in urls:
        log.info("downloading %s", url)
        try:
            _fetch_one(url, dest, md5)
            return
        except DownloadFailed as exc:
            reasons.append(f"{url}: {exc.reasons[0]}")
        except urllib.error.HTTPError as exc:
            reasons.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except urllib.error.URLError as exc:
            reasons.append(f"{url}: {exc.reason}")
        except (OSError, HTTPException, ValueError) as exc:  # timeouts, resets, bad URLs
            reasons.append(f"{url}: {type(exc).__name__}: {exc}")
    raise DownloadFailed(dest.name, reasons or ["no mirror configured"])
