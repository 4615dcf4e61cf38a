"""`cnnray models`: the registered models, as a table or JSON."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models", description="List the registered models.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from cnnray.models import model_catalog

    rows = model_catalog()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<16} {'input':<14} {'classes':>7} {'parameters':>13}  description")
    for r in rows:
        shape = "x".join(str(s) for s in r["input_shape"])
        print(f"{r['name']:<16} {shape:<14} {r['num_classes']:>7} {r['parameters']:>13,}  {r['description']}")
    return 0
