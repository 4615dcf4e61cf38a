"""Paths as a shell user means them: the one resolver for every path cnnray is given.

    from cnnray.paths import resolve_path
    resolve_path("~/ckpts", "storage_path", uris=True)   # -> "/home/me/ckpts"
    resolve_path("runs/x", "out", lasting=True)           # -> "<cwd>/runs/x"
    resolve_path("s3://bucket/ckpts", "storage_path", uris=True)  # unchanged

A path is resolved once, where the command was typed, before Ray starts: `~` and `~user`
expanded, a relative path joined to the current directory, `.` and `..` removed (as
written, without following symlinks, so a run folder keeps the name it was given). A URI
(`s3://`, `gs://`, `file://`, any `scheme://`) is left as typed where a caller accepts
URIs, and refused (one line) where only a local path can work. The result is absolute, so
resolving it again (in a Ray worker, on resume) gives the same value.

A `ray job submit` entrypoint runs inside Ray's unpacked copy of the uploaded working_dir
(`<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/`), which Ray deletes
later; `lasting=True` refuses an output path inside it instead of losing the results.

Nothing here imports Ray or touches the file system beyond `os.getcwd()`.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

# `scheme://...` (RFC 3986 scheme characters); "C:\x" or "a:b" are paths, not URIs.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Set by Ray's JobSupervisor for a job's entrypoint only (JSON: runtime_env, metadata);
# ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Ray's per-session cache of unpacked runtime-env packages (working_dir, py_modules),
# deleted with the session or when the cache is trimmed;
# ray._private.ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME.
RAY_RUNTIME_RESOURCES = "runtime_resources"


class PathError(ValueError):
    """A path that cannot be used as given; the message is one line naming the setting."""


def is_uri(text: str) -> bool:
    """True for `scheme://...` (s3://, gs://, file://, hdfs://, ...)."""
    return bool(_URI.match(text))


def check_printable(text: str, what: str) -> str:
    """Refuse control characters (newline, tab, escape, ...) and undecodable bytes (not
    UTF-8: Python's surrogate escapes) in a name or path: neither can be shown as typed in
    a one-line log or error message, a table, a page or a plot label. Anything else
    (`Ba$$in`, `<b>x</b>`, `50%_off`, spaces, any script) is allowed and shown literally."""
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cs")]
    if bad:
        undecodable = unicodedata.category(bad[0]) == "Cs"
        kind = "bytes that are not UTF-8" if undecodable else f"a control character ({bad[0]!r})"
        raise PathError(f"{what} {text!r} contains {kind}: rename it")
    return text


def resolve_path(text: str | os.PathLike[str], what: str, *, uris: bool = False, lasting: bool = False) -> str:
    """`text` as an absolute local path (or, with `uris`, a URI left as typed).

    `what` names the setting in error messages (e.g. "out", "--checkpoint"). With
    `uris=False` a `file://` URI becomes its local path and any other URI is refused.
    With `lasting=True` a local path inside the temporary working-dir copy of a Ray job
    is refused (see `ray_job_copy`). Raises PathError (a ValueError) with one line.
    """
    text = os.fspath(text)
    if not isinstance(text, str):
        raise PathError(f"{what} must be a path, not {text!r}")
    if not text.strip():
        raise PathError(f"{what} is empty: give a path")
    check_printable(text, what)
    if is_uri(text):
        if uris:
            return text
        url = urlparse(text)
        if url.scheme != "file":
            raise PathError(f"{what} {text!r} must be a local path (URIs such as {url.scheme}:// are not read here)")
        if url.netloc not in ("", "localhost"):
            raise PathError(f"{what} {text!r} names another host: give a local path")
        text = unquote(url.path)
    path = os.path.abspath(os.path.expanduser(text))
    if lasting:
        check_lasting(path, what, typed=text)
    return path


def ray_job_copy(cwd: str | None = None) -> Path | None:
    """The working-dir copy this process runs in, when it is the entrypoint of a `ray job
    submit` whose working_dir Ray uploaded (the job's cwd is Ray's unpacked copy, named
    after the package: gcs://_ray_pkg_<hash>.zip -> .../working_dir_files/_ray_pkg_<hash>).
    None otherwise, including a `local://` working_dir (the user's own folder)."""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        working_dir = json.loads(raw)["runtime_env"]["working_dir"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(working_dir, str) or not is_uri(working_dir) or working_dir.startswith("local://"):
        return None
    package = PurePosixPath(urlparse(working_dir).path or urlparse(working_dir).netloc).name
    stem = package.split(".", 1)[0]  # _ray_pkg_<hash>.zip (or .tar.gz) -> _ray_pkg_<hash>
    here = Path(cwd or os.getcwd())
    for folder in (here, *here.parents):
        if folder.name == stem:
            return folder
    return None


def temporary_ray_folder(path: str) -> Path | None:
    """The Ray-owned temporary folder `path` (absolute) lies in, or None: the job's
    working-dir copy, or anything under a Ray session's `runtime_resources` cache."""
    p = Path(path)
    copy = ray_job_copy()
    if copy is not None and (p == copy or copy in p.parents):
        return copy
    parts = p.parts
    if RAY_RUNTIME_RESOURCES in parts:
        i = parts.index(RAY_RUNTIME_RESOURCES)
        return Path(*parts[: i + 1])
    return None


def check_lasting(path: str, what: str, typed: str | None = None) -> None:
    """Refuse an output path that Ray will delete (see `temporary_ray_folder`)."""
    folder = temporary_ray_folder(path)
    if folder is not None:
        shown = f"{typed!r} ({path})" if typed and typed != path else repr(path)
        raise PathError(
            f"{what} {shown} is inside Ray's temporary copy of the job's files ({folder}), which Ray deletes: "
            f"give an absolute path on lasting storage (e.g. ~/cnnray-runs/NAME, a shared mount or a URI)"
        )
