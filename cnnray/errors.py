"""The errors cnnray raises for what a user can fix, one module below every layer.

Each message is one line that names the problem (and the file or value): the CLI prints it
as `cnnray: error: MESSAGE` and exits 2 (`USER_ERRORS`), or 1 for a `TrainingError`.
Every layer raises these from here; the modules that own the behaviour re-export them
(`cnnray.config.ConfigError`, `cnnray.data.DataError`, ...), so either name works.

Long messages go through `one_line`:

    print(f"cnnray: error: {one_line(exc, log_dir=run_folder)}", file=sys.stderr)

Some exceptions make very long one-line messages: `shutil.Error` is the list of every file
a copy could not write (a checkpoint on a full disk: ~1,100 characters), Ray wraps a
worker's exception in several layers whose text repeats the traceback, a pydantic
ValidationError lists every field. `one_line` gives

- for a full disk anywhere in the chain (errno ENOSPC, or "No space left on device" in a
  `shutil.Error` entry): "no space left on the device holding PATH: free space there, or
  write elsewhere (--out / --storage-path)";
- for a `shutil.Error`: how many files failed, the first one and why;
- else the message itself, its last line when it has several (Ray's wrappers end with the
  innermost error), cut in the middle to MAX_CHARS (its start names the problem, its end
  usually the fix);

followed by "(details: LOG)" whenever something was left out, LOG being a file holding the
whole traceback and message (`log_dir`, else the system's temporary folder; when neither
can be written, e.g. on the full disk itself, the line says so instead).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value or key is not acceptable; the message says which and why."""


class DataError(Exception):
    """A dataset is missing, corrupt or malformed.

    The message is one line that names the file and says what to do, so the CLI can print
    it as it is instead of a traceback."""


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, corrupt or of an unknown format."""


class StoreError(ValueError):
    """A model store, model name or version that cannot be used."""


class UnknownModelError(ValueError):
    """Raised for a model name that is not registered."""


class TrainingError(RuntimeError):
    """The run failed after Ray Train's retries; the message holds the root cause."""


# Bad input: the CLI exits 2 with the one-line message (TrainingError exits 1).
USER_ERRORS = (ConfigError, DataError, CheckpointError, UnknownModelError, StoreError)


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's
    name when the message is empty: a one-line error built on another library's."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    return text[0][:limit] if limit is not None else text[0]


def root_cause(e: BaseException) -> str:
    """The innermost exception's message: Ray nests the worker's error in several layers."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or getattr(e, "cause", None) or e.__context__
        if nxt is None:
            break
        e = nxt
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


MAX_CHARS = 400  # a few terminal lines: room for two paths and the fix
_NO_SPACE = re.compile(r"\[Errno 28\]|No space left on device|Disk quota exceeded", re.I)
_ERRNO_PATH = re.compile(r"\[Errno \d+\] [^:]*: '([^']+)'")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it wraps: __cause__/__context__, Ray's `.cause` (a task's
    error), Ray Train's `.worker_failures` and `.controller_failure`; each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, getattr(e, "cause", None), e.__context__, getattr(e, "controller_failure", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())


def no_space_path(exc: BaseException) -> str | None:
    """The path being written when the disk filled, if the chain holds a full-disk error
    ("" when it names none)."""
    for e in causes(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(e.filename or "")
        if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list):
            for entry in e.args[0]:
                if isinstance(entry, tuple) and len(entry) == 3 and _NO_SPACE.search(str(entry[2])):
                    return str(entry[1])
        if _NO_SPACE.search(str(e)):
            m = _ERRNO_PATH.search(str(e))
            return m.group(1) if m else ""
    return None


def _copy_summary(e: shutil.Error) -> str | None:
    entries = e.args[0] if e.args and isinstance(e.args[0], list) else None
    if not entries:
        return None
    first = entries[0]
    src, dst, why = first if isinstance(first, tuple) and len(first) == 3 else ("?", "?", str(first))
    more = f" (and {len(entries) - 1} more)" if len(entries) > 1 else ""
    return f"cannot copy {src} to {dst}: {why}{more}"


def _summary(exc: BaseException) -> str:
    """The readable core of `exc`'s message (see the module doc), uncut."""
    for e in causes(exc):
        if isinstance(e, shutil.Error) and (text := _copy_summary(e)):
            prefix = str(exc).split(":", 1)[0] if e is not exc and ":" in str(exc) else ""
            return f"{prefix}: {text}" if prefix and len(prefix) < 60 else text
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def write_log(exc: BaseException, log_dir: str | Path | None = None) -> Path | None:
    """The full error (message and tracebacks of the chain) in a new file under `log_dir`,
    else the temporary folder; None when neither can be written."""
    text = "".join(traceback.format_exception(exc))
    name = f"cnnray-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in ([Path(log_dir)] if log_dir else []) + [Path(tempfile.gettempdir())]:
        try:
            path = folder / name
            path.write_text(f"{type(exc).__name__}: {exc}\n\n{text}")
            return path
        except OSError:
            continue
    return None


def one_line(exc: BaseException, log_dir: str | Path | None = None, max_chars: int = MAX_CHARS,
             trace: bool = False) -> str:
    """One readable line for `exc` (module doc); the details go to a log file it names when
    the line leaves anything out of the message, or, with `trace` (an unexpected failure,
    not bad input), when `exc` wraps other exceptions whose tracebacks help."""
    full = str(exc)
    where = no_space_path(exc)
    if where is not None:
        at = f" holding {where}" if where else ""
        text = f"no space left on the device{at}: free space there, or write elsewhere (--out / --storage-path)"
    else:
        text = _summary(exc)
    if len(text) > max_chars:  # the middle goes: the problem leads, the fix usually ends the line
        head = max_chars // 2
        text = text[:head].rstrip() + " ... " + text[-(max_chars - head - 5):].lstrip()
    wrapped = exc.__cause__ is not None or getattr(exc, "cause", None) is not None
    if text == full.strip() and not (trace and wrapped):
        return text
    log = write_log(exc, log_dir)
    if log is None:
        return f"{text} (details could not be written to a log file)"
    return f"{text} (details: {log})"
