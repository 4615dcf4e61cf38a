"""An explain load beside the predict load (benchmarks/serve_load.py --explain-clients N).

N clients each POST one MNIST test PNG after another to /v1/models/{name}:explain (occlusion
and Grad-CAM, no response maps) for as long as the predict load runs, on the same event loop
as the predict clients. The question it answers: do predictions per second stay where they
were without the explanations (the explain route runs on its own threads at a lower CPU
priority, outside the batches)? Compare the predict row alone with the row beside explain.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.serve_load import LoadResult, _load, _quantile


async def _explain_clients(url: str, model: str, pngs: list[bytes], clients: int, stop: asyncio.Event,
                           timeout_s: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        i = k
        while not stop.is_set():
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/models/{model}:explain", data=pngs[i % len(pngs)],
                                        headers={"Content-Type": "image/png"}) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        latencies.append(time.perf_counter() - start)
            except Exception as e:  # counted, never raised: the predict load must finish
                errors.append(f"{type(e).__name__}: {e}")
            i += clients

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session, k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    return {"clients": clients, "explained": len(latencies), "explains_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(_quantile(ms, 0.5), 1) if ms else None, "statuses": statuses, "errors": errors[:5]}


def run_load_beside_explain(url: str, model: str, pngs: list[bytes], labels: list[int], *, requests: int,
                            concurrency: int, server: str, api: str, clients: int,
                            timeout_s: float = 120.0) -> tuple[LoadResult, dict[str, Any]]:
    """`serve_load.run_load`'s predict load with `clients` explain clients running beside it
    until it ends; returns its LoadResult (server labelled "+ N explain clients") and the
    explain clients' counts (explanations/s, p50, statuses: 429 when over the replica's limit)."""

    async def both():
        stop = asyncio.Event()
        explain = asyncio.create_task(_explain_clients(url, model, pngs, clients, stop, timeout_s))
        await asyncio.sleep(1.0)  # the explanations are under way before the predictions start
        try:
            return await _load(url, model, pngs, requests, concurrency, api, 60.0), explain
        finally:
            stop.set()

    async def main():
        loaded, task = await both()
        return loaded, await task

    (lat, preds, errors, elapsed), stats = asyncio.run(main())
    ms = sorted(x * 1000 for x in lat)
    correct = sum(p == labels[i % len(labels)] for i, p in enumerate(preds))
    result = LoadResult(
        server=f"{server} + {clients} explain clients", api=api, requests=requests, concurrency=concurrency,
        seconds=round(elapsed, 3), requests_per_s=round(requests / elapsed, 1), p50_ms=round(_quantile(ms, 0.5), 2),
        p99_ms=round(_quantile(ms, 0.99), 2), errors=len(errors), accuracy=round(correct / requests, 4),
        error_samples=errors[:5], predictions=preds,
    )
    return result, stats
