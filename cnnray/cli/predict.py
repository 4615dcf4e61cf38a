"""`cnnray predict`: classify image files with a running `cnnray serve`.

    cnnray predict --url http://127.0.0.1:8000 --model mnist digit.png other.jpg
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PREDICT_CHUNK = 32  # images per :predict request (the server's default limit is 64)


def add_parser(sub: Any) -> None:
    from cnnray.argtypes import Range

    p = sub.add_parser(
        "predict",
        help="classify image files with a running `cnnray serve`",
        description="Send PNG, JPEG or BMP files to a running server and print each one's label and probability.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or BMP files")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address; default http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name (see GET /v1/models)")
    p.add_argument("--timeout", type=Range(0, 86_400, lo_open=True).argtype(float), default=60.0, help="seconds to wait for an answer; default 60")
    p.add_argument("--json", action="store_true", help="print the server's JSON answers instead of a table")
    p.add_argument("--explain", action="store_true",
                   help="also ask POST :explain for each image and write its heat maps beside it: IMAGE's "
                        "folder gets STEM.occlusion.png and STEM.gradcam.png (refused if one exists)")
    p.add_argument("--overwrite", action="store_true", help="with --explain: replace heat maps already there")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnray.config import ConfigError

    if not args.url.startswith(("http://", "https://")):
        raise ConfigError(f"--url {args.url!r} must start with http:// or https://")
    from cnnray.paths import PathError, resolve_path

    files = [Path(p) for p in args.images]  # shown as typed
    payloads = []
    for f in files:
        try:
            payloads.append(base64.b64encode(Path(resolve_path(f, "image")).read_bytes()).decode("ascii"))
        except PathError as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(f"cannot read {f}: {e.strerror or e}") from None
    if args.explain:
        from cnnray.serve.predict_explain import explain_files

        return explain_files(args, files)
    endpoint = f"{args.url.rstrip('/')}/v1/models/{urllib.request.quote(args.model, safe='')}:predict"
    width = max(len(str(f)) for f in files)
    for start in range(0, len(files), PREDICT_CHUNK):
        chunk = payloads[start : start + PREDICT_CHUNK]
        status, body = _post_json(endpoint, {"instances": [{"b64": b} for b in chunk]}, args.timeout)
        if status != 200:
            said = f"answered {status}" if status else "cannot be reached"
            print(f"cnnray: error: {endpoint} {said}: {body.get('error', body)}", file=sys.stderr)
            return 2 if 400 <= status < 500 else 1  # the request was refused: a user error
        if args.json:
            print(json.dumps(body))
            continue
        for f, pred in zip(files[start : start + PREDICT_CHUNK], body["predictions"]):
            prob = pred["probabilities"][pred["class_index"]]
            print(f"{str(f):<{width}}  {pred['label']}  {prob:.4f}")
    return 0


def _post_json(url: str, obj: Any, timeout: float) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=json.dumps(obj).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": e.reason}
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return 0, {"error": str(reason)}
