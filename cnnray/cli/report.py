"""`cnnray report DIR`: PNGs and one self-contained HTML page for a run or a sweep.

    cnnray report runs/mnist-cnn                 # -> runs/mnist-cnn/report/report.html
    cnnray report runs/sweep-mnist --out /tmp/r  # a sweep folder, report elsewhere
"""

from __future__ import annotations

import argparse
import time


def cmd_report(args: argparse.Namespace) -> int:
    from cnnray.report import write_report

    started = time.perf_counter()
    page = write_report(args.dir, args.out, tensorboard=args.tensorboard)
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    print(f"[cnnray] report: {page}  ({len(pngs)} PNGs beside it, {time.perf_counter() - started:.1f}s)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="plots and an HTML page for a training run or a sweep",
        description="Write PNGs and one self-contained HTML page (images embedded) for a run folder "
        "(cnnray train --out) or a sweep folder (cnnray tune). The best checkpoint is re-evaluated "
        "on the test set on this machine's CPU.",
    )
    p.add_argument("dir", metavar="DIR", help="a run folder (holds result.json) or a sweep folder (holds trials.csv)")
    p.add_argument("--out", default=None, help="where to write the page and PNGs; default DIR/report")
    p.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write TensorBoard event files to DIR/tensorboard (needs tensorboardX or tensorboard); default on",
    )
    p.set_defaults(func=cmd_report)
