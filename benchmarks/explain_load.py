"""Predictions per second with and without explanations beside them (serve_load.py --explain-clients N).

    python -m benchmarks.serve_load --checkpoint CKPT --skip-plain --api torchserve \
        --requests 1000 --concurrency 16 --explain-clients 2 --rounds 5

On one server, the predict load runs in alternating rounds: A (predictions alone), B (the
same predictions while N clients each POST one MNIST test PNG after another to
/v1/models/{name}:explain, occlusion and Grad-CAM), A, B, ... On a machine shared with other
jobs, requests/s drift by more than any effect of the explanations between two runs minutes
apart; alternating rounds see the same drift in both arms, and the spread of the A rounds
is the noise the B rounds are compared with. It prints per arm the mean predictions/s with
its round-to-round spread, p50 and p99, the ratio B/A with the per-pair ratios, whether B's
mean lies within A's range ("within noise"), and the explanations/s served during B.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

from benchmarks.serve_load import LoadResult, _load, _quantile, load_result
from benchmarks.serve_servers import tree_cpu_s

EXPLAIN_QUERY = "?methods=occlusion,gradcam"  # both heat maps, no response maps: the page's heaviest common ask


async def _explain_clients(url: str, model: str, pngs: list[bytes], clients: int, stop: asyncio.Event,
                           done: list[tuple[float, float, int]], errors: list[str], timeout_s: float) -> None:
    """`clients` loops POSTing :explain until `stop`; each answer appends (finished at, seconds, status)."""
    import aiohttp

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        i = k
        while not stop.is_set():
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/models/{model}:explain{EXPLAIN_QUERY}", data=pngs[i % len(pngs)],
                                        headers={"Content-Type": "image/png"}) as r:
                    await r.read()
                    now = time.perf_counter()
                    done.append((now, now - start, r.status))
                    if r.status == 429:  # over the replica's limit: wait as Retry-After says
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            except Exception as e:  # counted, never raised: the predict load must finish
                errors.append(f"{type(e).__name__}: {e}")
            i += clients

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        await asyncio.gather(*(client(session, k) for k in range(clients)))


async def _round(url: str, model: str, pngs: list[bytes], requests: int, concurrency: int, api: str,
                 clients: int, timeout_s: float) -> tuple[Any, dict[str, Any] | None]:
    """One predict load; with `clients` > 0, explanations run from 1 s before it until it ends."""
    if clients == 0:
        return await _load(url, model, pngs, requests, concurrency, api, timeout_s), None
    stop = asyncio.Event()
    done: list[tuple[float, float, int]] = []
    errors: list[str] = []
    task = asyncio.create_task(_explain_clients(url, model, pngs, clients, stop, done, errors, timeout_s))
    await asyncio.sleep(1.0)  # the explanations are under way before the predictions start
    t0 = time.perf_counter()
    try:
        measured = await _load(url, model, pngs, requests, concurrency, api, timeout_s)
    finally:
        t1 = time.perf_counter()
        stop.set()
    await task
    inside = [(s, st) for (t, s, st) in done if t0 <= t <= t1]  # answered while the predictions ran
    ok = sorted(s * 1000 for s, st in inside if st == 200)
    statuses: dict[int, int] = {}
    for _, st in inside:
        statuses[st] = statuses.get(st, 0) + 1
    return measured, {"explained": len(ok), "explains_per_s": round(len(ok) / (t1 - t0), 2),
                      "p50_ms": round(_quantile(ok, 0.5), 1) if ok else None, "statuses": statuses,
                      "errors": errors[:5]}


def interleaved(url: str, model: str, pngs: list[bytes], labels: list[int], *, requests: int, concurrency: int,
                server: str, api: str, clients: int, rounds: int, pid: int | None = None,
                timeout_s: float = 120.0) -> tuple[list[LoadResult], dict[str, Any]]:
    """`rounds` rounds of each arm, A B A B ...: A is `requests` predictions alone, B the same
    with `clients` explain clients beside them. Returns every round's LoadResult (server
    labelled with its arm and round; server CPU per prediction includes the explanations' in
    B when `pid` is given) and the summary (see `summarize`)."""
    import urllib.request

    # One untimed explanation first: the explain replica loads the model on its first one.
    req = urllib.request.Request(f"{url}/v1/models/{model}:explain{EXPLAIN_QUERY}", data=pngs[0],
                                 headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        r.read()
    rows: list[LoadResult] = []
    explain: list[dict[str, Any]] = []
    loads: list[float] = []  # the machine's 1-minute load average as each round starts
    for k in range(rounds):
        for arm, n in (("A", 0), ("B", clients)):
            loads.append(round(os.getloadavg()[0], 1))
            cpu0 = tree_cpu_s(pid) if pid else None
            measured, stats = asyncio.run(_round(url, model, pngs, requests, concurrency, api, n, timeout_s))
            cpu1 = tree_cpu_s(pid) if pid else None
            label = f"{server} {arm}{k + 1}" + (f" + {n} explain clients" if n else "")
            row = load_result(measured, labels, server=label, api=api, concurrency=concurrency)
            if cpu0 is not None and cpu1 is not None:
                row.server_cpu_ms_per_request = round((cpu1 - cpu0) * 1000 / requests, 3)
            rows.append(row)
            if stats is not None:
                explain.append(stats)
            print(f"[bench] {label}: {row.requests_per_s} predictions/s, p50 {row.p50_ms} ms, p99 {row.p99_ms} ms, "
                  f"{row.errors} errors" + (f"; explain {stats['explains_per_s']}/s, statuses {stats['statuses']}"
                                            if stats else ""), flush=True)
    summary = summarize(rows, explain, clients)
    summary["load_average"] = loads
    print(format_summary(summary), flush=True)
    print(f"[bench] load average (1 min) at each round's start: {loads}", flush=True)
    return rows, summary


def summarize(rows: list[LoadResult], explain: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """Per arm: predictions/s per round, mean, sample standard deviation, min and max, mean
    p50 and p99; the ratio of the means B/A and each pair's ratio (B_k / A_k) with their mean
    and its standard error; `within_noise`:
    B's mean lies within A's round-to-round range [min, max]; explanations/s in B."""
    arms = {"A": rows[0::2], "B": rows[1::2]}
    out: dict[str, Any] = {"explain_clients": clients, "rounds": len(arms["A"])}
    for arm, rs in arms.items():
        rate = [r.requests_per_s for r in rs]
        out[arm] = {"predictions_per_s": rate, "mean": round(statistics.mean(rate), 1),
                    "stdev": round(statistics.stdev(rate), 1) if len(rate) > 1 else 0.0,
                    "min": min(rate), "max": max(rate),
                    "p50_ms": round(statistics.mean(r.p50_ms for r in rs), 2),
                    "p99_ms": round(statistics.mean(r.p99_ms for r in rs), 2),
                    "errors": sum(r.errors for r in rs)}
        cpu = [r.server_cpu_ms_per_request for r in rs if r.server_cpu_ms_per_request is not None]
        if cpu:  # CPU ms of every server process per prediction; in B the explanations' CPU included
            out[arm]["server_cpu_ms_per_prediction"] = round(statistics.mean(cpu), 3)
    a, b = out["A"], out["B"]
    pairs = [round(y.requests_per_s / x.requests_per_s, 3) for x, y in zip(arms["A"], arms["B"])]
    out["ratio"] = round(b["mean"] / a["mean"], 3)
    out["pair_ratios"] = pairs
    out["pair_ratio_stdev"] = round(statistics.stdev(pairs), 3) if len(pairs) > 1 else 0.0
    # Adjacent rounds share the machine's slow drift, so each pair's ratio is the sharper
    # estimate: their mean and its standard error (stdev / sqrt(pairs)).
    out["pair_ratio_mean"] = round(statistics.mean(pairs), 3)
    out["pair_ratio_sem"] = round(out["pair_ratio_stdev"] / len(pairs) ** 0.5, 3)
    out["baseline_spread"] = round(a["stdev"] / a["mean"], 3)  # the A rounds' coefficient of variation
    out["within_noise"] = a["min"] <= b["mean"] <= a["max"]
    seconds = sum(r.seconds for r in arms["B"])
    explained = sum(e["explained"] for e in explain)
    statuses: dict[int, int] = {}
    for e in explain:
        for st, n in e["statuses"].items():
            statuses[st] = statuses.get(st, 0) + n
    out["explain"] = {"explained": explained, "explains_per_s": round(explained / seconds, 2) if seconds else 0.0,
                      "statuses": statuses, "errors": [x for e in explain for x in e["errors"]][:5]}
    return out


def format_summary(s: dict[str, Any]) -> str:
    a, b = s["A"], s["B"]
    verdict = "within" if s["within_noise"] else "outside"
    return "\n".join([
        f"[bench] alone (A, {s['rounds']} rounds): {a['mean']} predictions/s (sd {a['stdev']}, "
        f"range {a['min']}-{a['max']}), p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms",
        f"[bench] beside {s['explain_clients']} explain clients (B): {b['mean']} predictions/s (sd {b['stdev']}, "
        f"range {b['min']}-{b['max']}), p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms",
        f"[bench] B/A {s['ratio']}; per pair {s['pair_ratio_mean']} +- {s['pair_ratio_sem']} (standard error; "
        f"pairs {s['pair_ratios']}, sd {s['pair_ratio_stdev']}); baseline spread "
        f"{s['baseline_spread'] * 100:.1f}% of its mean; B's mean is {verdict} A's range",
        f"[bench] explanations served during B: {s['explain']['explains_per_s']}/s ({s['explain']['explained']} in "
        f"all), statuses {s['explain']['statuses']}",
    ])
