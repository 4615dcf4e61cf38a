"""Load benchmark: `cnnray serve` (Ray Serve, dynamic batching) beside a plain FastAPI server.

    python -m benchmarks.serve_load --checkpoint runs/x/ray/x/epoch-0003 \
        --data-dir ../shared/datasets/mnist --requests 2000 --concurrency 32

Both servers run the same model with the same routes and preprocessing (cnnray/serve/api.py),
one after the other on loopback: the plain one is a single uvicorn process without Ray and
without batching (one forward pass per request); `cnnray serve` is the real command in a
subprocess, with its defaults (fast ingress, `--replicas auto`) unless --ingress/--replicas
say otherwise. On each server, for each route (raw PNG bodies to
POST /predictions/{name}, then one base64 PNG per JSON body to POST /v1/models/{name}:predict,
then one PNG per OIP v2 infer in the binary tensor data extension, `--api all`),
`--warmup` untimed requests, then N requests of real MNIST test images from C concurrent
clients. The table gives requests/s, p50 and p99 latency (client side), errors and the
accuracy of the answers, the CPU time of all the server's processes per request (steadier
than requests/s on a shared machine), and the ratios to the plain server per route; the JSON record
(--out) adds the machine, versions, settings, cnnray's ingress mode and replica count.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info
from benchmarks.serve_servers import (  # noqa: F401  (free_port, stop, wait_healthy: imported from here by tests)
    REPO, batch_stats, free_port, serve_plain, served_replicas_when_all_pushed, start_cnnray, start_plain, stop,
    tree_cpu_s, wait_healthy,
)


@dataclass
class LoadResult:
    server: str
    api: str  # "torchserve" (raw PNG, POST /predictions/{name}), "kserve" (JSON, :predict) or "oip" (OIP v2 binary)
    requests: int
    concurrency: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    accuracy: float
    error_samples: list[str] = field(default_factory=list)
    # CPU seconds (user + system) of every process of the server (the process tree it
    # started: for cnnray serve, Ray's daemons, HAProxy and the replicas) per request, in
    # ms; steadier than requests/s when other jobs share the machine. None off Linux.
    server_cpu_ms_per_request: float | None = None
    runtime: str = "torch"  # what ran the forward passes (cnnray serve --runtime)
    predictions: list[int] = field(default_factory=list, repr=False)  # class index per request, -1 on error


# --- images ---------------------------------------------------------------------------------
def mnist_test_pngs(data_dir: str | None, count: int) -> tuple[list[bytes], list[int]]:
    """The first `count` MNIST test images as PNG files (lossless) and their labels."""
    from PIL import Image

    from cnnray.data import load_dataset

    ds = load_dataset("mnist", data_dir)
    n = min(count, len(ds.test_labels))
    pngs = []
    for img in ds.test_images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img[0].numpy(), mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, [int(y) for y in ds.test_labels[:n]]


# --- load generator ---------------------------------------------------------------------------
# OIP v2 infer (binary tensor data extension) of one PNG, asking for the probabilities as binary data.
OIP_HEAD = (b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":%d}}],'
            b'"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}')


def _prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data  # a BYTES element: its length, then its bytes


def _oip_prediction(raw: bytes, headers: Any) -> dict[str, int]:
    """{"class_index": ...} from an OIP binary answer: the first largest probability."""
    import numpy as np

    size = int(headers["Inference-Header-Content-Length"])
    probs = np.frombuffer(raw[size:], dtype="<f4")
    return {"class_index": int(np.argmax(probs))}


async def _load(url: str, model: str, pngs: list[bytes], n: int, concurrency: int, api: str,
                timeout_s: float) -> tuple[list[float], list[int], list[str], float]:
    import aiohttp

    latencies: list[float] = [0.0] * n
    preds: list[int] = [-1] * n
    errors: list[str] = []
    next_i = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        png = pngs[i % len(pngs)]
        start = time.perf_counter()
        try:
            if api == "kserve":
                body = {"instances": [{"b64": base64.b64encode(png).decode()}]}
                async with session.post(f"{url}/v1/models/{model}:predict", json=body) as r:
                    data = await r.json(content_type=None)
                    ok, pred = r.status == 200, data.get("predictions", [{}])[0] if r.status == 200 else data
            elif api == "oip":  # as tritonclient.http sends it: the binary extension, one BYTES element
                data = _prefixed(png)
                head = OIP_HEAD % len(data)
                async with session.post(f"{url}/v2/models/{model}/infer", data=head + data,
                                        headers={"Inference-Header-Content-Length": str(len(head))}) as r:
                    raw = await r.read()
                    ok = r.status == 200
                    data = _oip_prediction(raw, r.headers) if ok else json.loads(raw)
                    pred = data
            else:
                async with session.post(f"{url}/predictions/{model}", data=png,
                                        headers={"Content-Type": "image/png"}) as r:
                    data = await r.json(content_type=None)
                    ok, pred = r.status == 200, data
            if ok:
                preds[i] = int(pred["class_index"])
            else:
                errors.append(f"HTTP {r.status}: {data.get('error', data)}")
        except Exception as e:  # connection reset, timeout, bad JSON: all count as errors
            errors.append(f"{type(e).__name__}: {e}")
        latencies[i] = time.perf_counter() - start

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            await one(session, i)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, preds, errors, elapsed


def run_load(url: str, model: str, pngs: list[bytes], labels: list[int], *, requests: int, concurrency: int,
             server: str, api: str = "torchserve", timeout_s: float = 60.0) -> LoadResult:
    """`requests` requests (cycling through the images) from `concurrency` clients."""
    measured = asyncio.run(_load(url, model, pngs, requests, concurrency, api, timeout_s))
    return load_result(measured, labels, server=server, api=api, concurrency=concurrency)


def load_result(measured: tuple[list[float], list[int], list[str], float], labels: list[int], *, server: str,
                api: str, concurrency: int) -> LoadResult:
    """A LoadResult from what `_load` measured (latencies in s, predictions, errors, elapsed s)."""
    lat, preds, errors, elapsed = measured
    requests = len(lat)
    ms = sorted(x * 1000 for x in lat)
    correct = sum(p == labels[i % len(labels)] for i, p in enumerate(preds))
    return LoadResult(
        server=server,
        api=api,
        requests=requests,
        concurrency=concurrency,
        seconds=round(elapsed, 3),
        requests_per_s=round(requests / elapsed, 1),
        p50_ms=round(_quantile(ms, 0.50), 2),
        p99_ms=round(_quantile(ms, 0.99), 2),
        errors=len(errors),
        accuracy=round(correct / requests, 4),
        error_samples=errors[:5],
        predictions=preds,
    )


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation): p99 of 1000 values is the 990th."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


ROUTES = {"torchserve": "PNG /predictions", "kserve": "JSON :predict", "oip": "OIP v2 binary"}


def format_table(results: list[LoadResult]) -> str:
    """A Markdown table, as the README shows it."""
    width = max([len("server")] + [len(r.server) for r in results])
    head = (f"| {'server':<{width}} | runtime     | route            | requests | concurrency | requests/s "
            "| p50 ms | p99 ms "
            "| errors | accuracy | server CPU ms/request |")
    rule = "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"
    rows = [
        f"| {r.server:<{width}} | {r.runtime:<11} | {ROUTES[r.api]:<16} | {r.requests:>8} | {r.concurrency:>11} "
        f"| {r.requests_per_s:>10.1f} | {r.p50_ms:>6.1f} | {r.p99_ms:>6.1f} | {r.errors:>6} | {r.accuracy:>8.4f} "
        f"| {_cpu(r):>21} |"
        for r in results
    ]
    return "\n".join([head, rule, *rows])


def _cpu(r: LoadResult) -> str:
    return "-" if r.server_cpu_ms_per_request is None else f"{r.server_cpu_ms_per_request:.3f}"


def compare(results: list[LoadResult]) -> dict[str, dict[str, float]]:
    """Per route (and runtime, when not torch): cnnray serve's requests/s, p99 and server CPU
    per request as multiples of the plain server's with the same runtime."""
    out = {}
    for api, runtime in itertools.product(ROUTES, ("torch", "onnxruntime")):
        plain = [r for r in results if r.api == api and r.runtime == runtime and r.server.startswith("plain")]
        ours = [r for r in results if r.api == api and r.runtime == runtime and r.server.startswith("cnnray")]
        key = api if runtime == "torch" else f"{api}/{runtime}"
        if plain and ours:
            out[key] = {
                "requests_per_s_ratio": round(ours[0].requests_per_s / plain[0].requests_per_s, 2),
                "p99_ratio": round(ours[0].p99_ms / plain[0].p99_ms, 2),
            }
            if ours[0].server_cpu_ms_per_request and plain[0].server_cpu_ms_per_request:
                out[key]["server_cpu_ratio"] = round(
                    ours[0].server_cpu_ms_per_request / plain[0].server_cpu_ms_per_request, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a cnnray checkpoint folder of an MNIST model")
    p.add_argument("--name", default="mnist", help="model name to serve it under; default mnist")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "mnist"),
                   help="MNIST files; default ../shared/datasets/mnist")
    p.add_argument("--requests", type=int, default=2000, help="timed requests per server; default 2000")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients; default 32")
    p.add_argument("--warmup", type=int, default=64, help="untimed requests first; default 64")
    p.add_argument("--api", choices=("torchserve", "kserve", "oip", "both", "all"), default="all",
                   help="torchserve: raw PNG bodies to /predictions/{name}; kserve: one base64 PNG per JSON "
                        ":predict body; oip: one PNG per OIP v2 infer in the binary tensor data extension (as "
                        "tritonclient sends it); both: torchserve and kserve; default all three, one after the "
                        "other on the same servers")
    p.add_argument("--replicas", default="auto", help="cnnray serve --replicas (a number or auto); default auto")
    p.add_argument("--ingress", choices=("fast", "proxy"), default="fast",
                   help="cnnray serve --ingress; default fast (its default)")
    p.add_argument("--max-batch-size", type=int, default=None, help="cnnray serve's batch size; default its own")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="cnnray serve's batch wait; default its own")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per server process (the replica's CPUs); default 1")
    p.add_argument("--gpu", action="store_true", help="both servers on the GPU (cnnray serve --gpu: one per replica)")
    p.add_argument("--skip-plain", action="store_true", help="only measure cnnray serve")
    p.add_argument("--explain-clients", type=int, default=0,
                   help="measure each predict load in --rounds alternating rounds, alone and with this many "
                        "clients POSTing :explain beside it, on the same server (benchmarks/explain_load.py); "
                        "default 0: no explain load")
    p.add_argument("--rounds", type=int, default=3,
                   help="with --explain-clients: rounds of each kind (alone, beside explanations), alternating; "
                        "default 3")
    p.add_argument("--runtime", choices=("torch", "onnxruntime", "both"), default="torch",
                   help="what runs the forward passes (cnnray serve --runtime); both: every server once with "
                        "each, side by side in one table; default torch")
    p.add_argument("--out", default="runs/bench/serve_load.json", help="JSON record (a run output, not committed); default %(default)s")
    p.add_argument("--log", default=None, help="the servers' output; default a file in the temp folder")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to come up")
    p.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_server:
        serve_plain(args.checkpoint, args.name, args.port, args.threads, args.gpu, args.runtime)
        return 0
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be at least 1")
    if args.explain_clients < 0 or args.rounds < 2:
        p.error("--explain-clients must be at least 0 and --rounds at least 2 (a spread needs two rounds)")

    checkpoint = str(Path(args.checkpoint).resolve())
    # Requests i = 0..N-1 send image i (cycling past 10,000): encode only those.
    pngs, labels = mnist_test_pngs(args.data_dir, max(args.requests, args.warmup))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else Path(tempfile.gettempdir()) / f"serve_load-{os.getpid()}.log"
    results: list[LoadResult] = []
    extras: dict[str, Any] = {}
    with open(log_path, "w") as log:
        kinds = ([] if args.skip_plain else ["plain"]) + ["cnnray"]
        runtimes = ["torch", "onnxruntime"] if args.runtime == "both" else [args.runtime]
        servers = [(kind, runtime) for kind in kinds for runtime in runtimes]
        apis = {"both": ["torchserve", "kserve"], "all": list(ROUTES)}.get(args.api, [args.api])
        for kind, runtime in servers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            if kind == "plain":
                proc = start_plain(checkpoint, args.name, port, log, args.threads, args.gpu, runtime)
                label = "plain FastAPI (1 process, no batching)"
            else:
                flags = ["--replicas", str(args.replicas), "--ingress", args.ingress,
                         "--cpus-per-replica", str(args.threads), "--runtime", runtime,
                         *(["--gpu"] if args.gpu else [])]
                if args.max_batch_size is not None:
                    flags += ["--max-batch-size", str(args.max_batch_size)]
                if args.batch_wait_ms is not None:
                    flags += ["--batch-wait-ms", str(args.batch_wait_ms)]
                proc = start_cnnray(checkpoint, args.name, port, log, flags)
                label = "cnnray serve"
            try:
                wait_healthy(url, proc, args.start_timeout)
                ready_s = time.perf_counter() - started
                info: dict[str, Any] = {"startup_s": round(ready_s, 1)}
                if kind == "cnnray":
                    info.update(ingress=args.ingress, replicas=served_replicas_when_all_pushed(url, args.replicas))
                    label = f"cnnray serve ({info['replicas']} replicas, {args.ingress} ingress)"
                print(f"[bench] {label}: up in {ready_s:.1f} s", flush=True)
                for api in apis:
                    run_load(url, args.name, pngs, labels, requests=args.warmup, concurrency=args.concurrency,
                             server=label, api=api)
                    if args.explain_clients > 0:  # alternating rounds alone and beside explanations
                        from benchmarks.explain_load import interleaved

                        rows, summary = interleaved(url, args.name, pngs, labels, requests=args.requests,
                                                    concurrency=args.concurrency, server=label, api=api,
                                                    clients=args.explain_clients, rounds=args.rounds, pid=proc.pid)
                        for r in rows:
                            r.runtime = runtime
                        results.extend(rows)
                        extras[f"{kind}/{runtime} explain beside {api}"] = summary
                        continue
                    cpu_before = tree_cpu_s(proc.pid)
                    result = run_load(url, args.name, pngs, labels, requests=args.requests,
                                      concurrency=args.concurrency, server=label, api=api)
                    result.runtime = runtime
                    cpu_after = tree_cpu_s(proc.pid)
                    if cpu_before is not None and cpu_after is not None:
                        result.server_cpu_ms_per_request = round((cpu_after - cpu_before) * 1000 / args.requests, 3)
                    results.append(result)
                    print(f"[bench] {label}, {runtime}, {ROUTES[api]}: {result.requests_per_s} requests/s, "
                          f"p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, {result.errors} errors, "
                          f"server CPU {result.server_cpu_ms_per_request} ms per request", flush=True)
                extras[f"{kind}/{runtime}"] = {**extras.get(f"{kind}/{runtime}", {}), **info, **batch_stats(url)}
            finally:
                code = stop(proc)
                extras.setdefault(f"{kind}/{runtime}", {})["exit_code"] = code

    print()
    print(format_table(results))
    comparison = compare(results)
    for api, c in comparison.items():
        cpu = f", {c['server_cpu_ratio']}x its CPU per request" if "server_cpu_ratio" in c else ""
        print(f"[bench] {api}: cnnray serve does {c['requests_per_s_ratio']}x the plain server's "
              f"requests/s at {c['p99_ratio']}x its p99{cpu}")
    record = {
        "benchmark": "serve_load",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("plain_server", "port")},
        "checkpoint": checkpoint,
        "results": [{k: v for k, v in asdict(r).items() if k != "predictions"} for r in results],
        "comparison": comparison,
        "servers": extras,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n[bench] record: {out}; server output: {log_path}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
