"""Keep Ray's authentication token private to its owner.

Ray (2.60) writes `~/.ray/auth_token` with the process umask (typically 0644, in a 0755
folder) when `ray.init()` starts a local Ray with token authentication or when `ray
get-auth-token --generate` runs: any local user could then read it and submit jobs as its
owner. `secure_auth_token()` narrows what exists to 0700 (folder) and 0600 (token); the
code that starts Ray calls it before (so the folder is private when the token is written)
and after.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"  # Ray's own variable for a token file elsewhere


def default_token_path() -> Path:
    """Where Ray reads and writes the token: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token").expanduser()


def secure_auth_token(token_path: Path | None = None) -> None:
    """Make the token file 0600 and, for the default location, ~/.ray 0700 (creating the
    folder so that a token written later lands in a private one). Only files this user
    owns are changed; a missing token is fine (Ray may not use one)."""
    token = token_path or default_token_path()
    if token_path is None and TOKEN_PATH_ENV not in os.environ:
        folder = token.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _narrow(folder, 0o700)
    _narrow(token, 0o600)


def _narrow(path: Path, mode: int) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    # Never follow a link or touch another user's file; only ever remove permissions.
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        return
    if stat.S_IMODE(info.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(info.st_mode) & mode)
