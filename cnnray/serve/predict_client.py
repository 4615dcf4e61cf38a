"""`cnnray predict`'s work: classify every readable file of a list, name every other one.

    cnnray predict --url http://127.0.0.1:8000 --model mnist imgs/*

A shell glob brings along what is not an image (a sub-folder, a notes.txt, a truncated
download). Each such file is named on stderr with the reason, after the table of the files
that were classified; the exit status is then 2 (some input could not be used), but no
readable file goes unclassified because of another one. Files are checked here with the
one image decoder's header check (cnnray.data.decode.open_image: format and size, no
pixel decoding) before anything is sent, and a file the server still refuses (it decodes
the pixels: a truncated or corrupt image) is taken out of its request by the index the
answer names ("instance 3: ..."), and the rest of the request is sent again.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREDICT_CHUNK = 32  # images per :predict request (the server's default limit is 64)
# The server's answer for one bad instance of a request (cnnray/serve/api.py, _raise_first_error).
_INSTANCE_ERROR = re.compile(r"^instance (\d+): (.*)$", re.S)

Post = Callable[[str, Any, float], tuple[int, dict[str, Any]]]


@dataclass
class _File:
    shown: str  # as typed
    payload: str | None = None  # base64 of its bytes, when readable
    problem: str | None = None  # why it was not classified


def read_files(names: list[str]) -> list[_File]:
    """Each name as typed -> its base64 bytes, or the reason it cannot be sent (a folder,
    a missing or unreadable file, not an image of an accepted format)."""
    from cnnray.data.decode import DecodeError, DecodeLimits, open_image
    from cnnray.paths import PathError, resolve_path

    out = []
    for name in names:
        f = _File(str(name))
        try:
            path = Path(resolve_path(name, "image"))
            if path.is_dir():
                f.problem = "is a folder (pass the images in it, e.g. FOLDER/*)"
            else:
                data = path.read_bytes()
                open_image(data, DecodeLimits(max_pixels=2**62)).close()  # format only; the server bounds size
                f.payload = base64.b64encode(data).decode("ascii")
        except PathError as e:
            f.problem = str(e)
        except OSError as e:
            f.problem = f"cannot read it: {e.strerror or e}"
        except DecodeError as e:
            f.problem = e.message
        out.append(f)
    return out


def predict_files(names: list[str], endpoint: str, timeout: float, post: Post, as_json: bool = False) -> int:
    """Classify `names` through `endpoint` (…/v1/models/NAME:predict); print a line per
    classified file (or the server's JSON answers), then each file not classified on stderr.
    Returns 0 when every file was classified; 2 when some were not (bad input), or the
    server refused a request (4xx); 1 when the server could not answer (unreachable, 5xx)."""
    files = read_files(names)
    ready = [f for f in files if f.problem is None]
    results: dict[int, tuple[str, float]] = {}  # id(file) -> (label, probability)
    failed: tuple[int, str] | None = None  # a refusal of the whole request: (status, message)
    for start in range(0, len(ready), PREDICT_CHUNK):
        chunk = ready[start : start + PREDICT_CHUNK]
        while chunk:
            status, body = post(endpoint, {"instances": [{"b64": f.payload} for f in chunk]}, timeout)
            if status == 200:
                break
            bad = _INSTANCE_ERROR.match(str(body.get("error", ""))) if 400 <= status < 500 else None
            if bad is not None and int(bad.group(1)) < len(chunk):
                chunk[int(bad.group(1))].problem = bad.group(2)  # out of this request; send the rest
                chunk = [f for f in chunk if f.problem is None]
                continue
            failed = (status, str(body.get("error", body)))
            break
        if failed is not None:
            break
        if not chunk:
            continue
        if as_json:
            print(json.dumps(body))
        for f, pred in zip(chunk, body["predictions"]):
            results[id(f)] = (pred["label"], pred["probabilities"][pred["class_index"]])
    if not as_json and results:
        width = max(len(f.shown) for f in files if id(f) in results)
        for f in files:
            if id(f) in results:
                label, prob = results[id(f)]
                print(f"{f.shown:<{width}}  {label}  {prob:.4f}")
    sys.stdout.flush()
    skipped = [f for f in files if f.problem is not None]
    for f in skipped:
        print(f"cnnray: not classified: {f.shown}: {f.problem}", file=sys.stderr)
    if failed is not None:
        status, message = failed
        said = f"answered {status}" if status else "cannot be reached"
        unsent = len(ready) - len(results) - sum(1 for f in ready if f.problem is not None)
        print(f"cnnray: error: {endpoint} {said}: {message} ({unsent} file(s) not classified)", file=sys.stderr)
        return 2 if 400 <= status < 500 else 1
    if skipped:
        print(f"cnnray: {len(skipped)} of {len(files)} file(s) not classified (named above)", file=sys.stderr)
        return 2
    return 0


def post(url: str, data: bytes, content_type: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """POST `data` to a running server: (status, its JSON answer). A connection that fails
    gives status 0 and {"error": why}; an answer that is not JSON {"error": the reason}."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": e.reason}
    except (urllib.error.URLError, OSError) as e:
        return 0, {"error": str(getattr(e, "reason", e))}


def post_json(url: str, obj: Any, timeout: float) -> tuple[int, dict[str, Any]]:
    """`post` of `obj` as JSON."""
    return post(url, json.dumps(obj).encode(), "application/json", timeout)
