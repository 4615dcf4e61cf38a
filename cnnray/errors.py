"""The errors cnnray raises for what a user can fix, one module below every layer.

Each message is one line that names the problem (and the file or value): the CLI prints it
as `cnnray: error: MESSAGE` and exits 2 (`USER_ERRORS`), or 1 for a `TrainingError`.
Every layer raises these from here; the modules that own the behaviour re-export them
(`cnnray.config.ConfigError`, `cnnray.data.DataError`, ...), so either name works.
"""

from __future__ import annotations


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
