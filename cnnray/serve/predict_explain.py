"""`cnnray predict --explain`: each image's heat maps, written as PNG files beside it.

    cnnray predict --model mnist --explain digit.png
    digit.png  7  0.9991
      wrote digit.occlusion.png
      wrote digit.gradcam.png

Each image is one POST /v1/models/{name}:explain (its raw bytes, as POST /predictions
takes them); the server's overlay PNGs are written as they came, to IMAGE's folder as
STEM.METHOD.png. A file of those names that already exists (or two inputs that would
write the same file) stops the command before anything is sent, unless --overwrite.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.parse
from pathlib import Path

from cnnray.serve.predict_client import post

# The methods :explain knows (cnnray.explain.METHODS, not imported: it would import torch
# into a command that only sends files).
METHODS = ("occlusion", "gradcam")

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}


def overlay_path(image: Path, method: str) -> Path:
    """Where the `method` heat map of `image` goes: digit.png -> digit.occlusion.png."""
    return image.with_name(f"{image.stem}.{method}.png")


def explain_files(args: argparse.Namespace, files: list[Path]) -> int:
    from cnnray.config import ConfigError

    planned: dict[Path, Path] = {}
    for f in files:
        for method in METHODS:
            out = overlay_path(f, method)
            if out.resolve() in planned:
                raise ConfigError(f"{f} and {planned[out.resolve()]} would both write {out}: rename one")
            if out.exists() and not args.overwrite:
                raise ConfigError(f"{out} exists: remove it or pass --overwrite")
            planned[out.resolve()] = f
    endpoint = f"{args.url.rstrip('/')}/v1/models/{urllib.parse.quote(args.model, safe='')}:explain"
    width = max(len(str(f)) for f in files)
    for f in files:
        data = f.read_bytes()  # readable: cmd_predict read every file first
        status, body = post(endpoint, data, CONTENT_TYPES.get(f.suffix.lower(), "application/octet-stream"), args.timeout)
        if status != 200:
            said = f"answered {status}" if status else "cannot be reached"
            print(f"cnnray: error: {endpoint} {said} for {f}: {body.get('error', body)}", file=sys.stderr)
            return 2 if 400 <= status < 500 else 1
        written = []
        for method, heat in body["explanations"].items():
            out = overlay_path(f, method)
            out.write_bytes(base64.b64decode(heat["overlay_png"]))
            written.append(out)
        if args.json:
            print(json.dumps({"file": str(f), "prediction": body["prediction"], "wrote": [str(w) for w in written]}))
            continue
        pred = body["prediction"]
        print(f"{str(f):<{width}}  {pred['label']}  {pred['probabilities'][pred['class_index']]:.4f}")
        for w in written:
            print(f"  wrote {w}")
    return 0
