"""`cnnray predict`: classify image files with a running `cnnray serve`.

    cnnray predict --url http://127.0.0.1:8000 --model mnist digit.png other.jpg
"""

from __future__ import annotations

import argparse
import urllib.parse
from pathlib import Path
from typing import Any




def add_parser(sub: Any) -> None:
    from cnnray.argtypes import Range

    p = sub.add_parser(
        "predict",
        help="classify image files with a running `cnnray serve`",
        description="Send image files to a running server and print each one's label and probability; files that cannot be classified (a folder, not an image) are named after the results, and the exit status is then 2.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, BMP, WebP, TIFF, GIF, PPM)")
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
    if args.explain:
        from cnnray.paths import PathError, resolve_path
        from cnnray.serve.predict_explain import explain_files

        files = [Path(p) for p in args.images]  # shown as typed
        for f in files:
            try:
                Path(resolve_path(f, "image")).read_bytes()
            except PathError as e:
                raise ConfigError(str(e)) from None
            except OSError as e:
                raise ConfigError(f"cannot read {f}: {e.strerror or e}") from None
        return explain_files(args, files)
    from cnnray.serve.predict_client import post_json, predict_files

    endpoint = f"{args.url.rstrip('/')}/v1/models/{urllib.parse.quote(args.model, safe='')}:predict"
    # Every readable file is classified; the others are named after the results (exit 2).
    return predict_files(list(args.images), endpoint, args.timeout, post_json, as_json=args.json)
