"""One replica's throughput and latency against the requests in flight: the measurement behind
`--replicas MIN-MAX`'s target_ongoing_requests (cnnray/serve/autoscale.py).

    python -m benchmarks.serve_concurrency --checkpoint runs/x/ray/x/epoch-0003 --requests 400

Starts `cnnray serve --replicas 1` (fast ingress), then for each concurrency C (clients, each
with one request in flight: C requests in flight at the replica) sends `--requests` real
MNIST test images to one route and prints requests/s, p50 and p99. Past the knee, more
requests in flight add latency and no throughput: that is where autoscaling should add a
replica rather than queue more on this one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.serve_load import REPO, free_port, mnist_test_pngs, run_load, start_cnnray, stop, wait_healthy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_concurrency", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a cnnray checkpoint folder of an MNIST model")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "mnist"), help="MNIST files")
    p.add_argument("--requests", type=int, default=400, help="timed requests per concurrency; default 400")
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="comma-separated; default 1,2,4,8,16,32")
    p.add_argument("--api", choices=("torchserve", "kserve", "oip"), default="oip", help="route; default oip")
    p.add_argument("--out", default="runs/bench/serve_concurrency.json", help="JSON record; default %(default)s")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    pngs, labels = mnist_test_pngs(args.data_dir, args.requests)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rows = []
    with open(Path(tempfile.gettempdir()) / "serve_concurrency.log", "w") as log:
        proc = start_cnnray(str(Path(args.checkpoint).resolve()), "mnist", port, log, ["--replicas", "1"])
        try:
            wait_healthy(url, proc, 300)
            run_load(url, "mnist", pngs, labels, requests=64, concurrency=8, server="warmup", api=args.api)
            for c in levels:
                r = run_load(url, "mnist", pngs, labels, requests=args.requests, concurrency=c,
                             server="cnnray serve (1 replica)", api=args.api)
                rows.append({"concurrency": c, "requests_per_s": r.requests_per_s, "p50_ms": r.p50_ms,
                             "p99_ms": r.p99_ms, "errors": r.errors})
                print(f"[bench] {c:>3} in flight: {r.requests_per_s:8.1f} requests/s, p50 {r.p50_ms:7.1f} ms, "
                      f"p99 {r.p99_ms:7.1f} ms, {r.errors} errors", flush=True)
        finally:
            stop(proc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "serve_concurrency", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "api": args.api, "requests": args.requests, "rows": rows}, indent=2) + "\n")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
