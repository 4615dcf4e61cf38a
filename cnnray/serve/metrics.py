"""Prometheus metrics of the serving app, summed over every replica.

Each replica counts in its own prometheus-client registry (`ServeMetrics`):

    cnnray_serve_requests_total{model, api, status}   inference requests by HTTP status
    cnnray_serve_request_latency_seconds{model}        histogram, request arrival to answer
    cnnray_serve_batch_size{model}                     histogram, images per forward pass
    cnnray_serve_in_flight_requests{model}             requests being answered now
    cnnray_serve_model_version{model}                  the version being served
    cnnray_serve_replicas                              replicas whose figures are included

`model` is a served model's name, or "_unknown" for requests naming no served model (so a
client cannot create one series per made-up name). `api` is "kserve" or "torchserve".

A scrape of GET /metrics reaches one replica, but must describe the whole deployment: every
replica pushes a snapshot of its registry every `PUSH_S` seconds to a deployment-scoped
actor (`MetricsHub`, created and stopped by Serve with the deployment); the replica that
answers a scrape pushes its own fresh snapshot, then renders the sum of all snapshots.
Counters and histograms add up; the version gauge takes the maximum. A replica that stops
pushing for `STALE_S` seconds is dropped (Prometheus reads the drop as a counter reset).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from cnnray.serve.preprocess import RequestError

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images per forward pass
PUSH_S = 2.0  # seconds between a replica's snapshots to the hub
STALE_S = 60.0  # seconds after which a silent replica's snapshot is dropped
UNKNOWN_MODEL = "_unknown"
_MAX_MERGED = {"cnnray_serve_model_version"}  # gauges merged by max, not by sum

# A snapshot is a list of metric families: (name, type, help, [(sample, labels, value)]).
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]

log = logging.getLogger("cnnray.serve")


class ServeMetrics:
    """One process's serving metrics, in a private registry (not the global default one)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cnnray_serve_requests", "inference requests by model, API and HTTP status",
            ["model", "api", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "cnnray_serve_request_latency_seconds", "inference request latency in the replica, seconds",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "cnnray_serve_batch_size", "images per forward pass (dynamic batching)",
            ["model"], buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "cnnray_serve_in_flight_requests", "inference requests being answered",
            ["model"], registry=self.registry,
        )
        self.model_version = Gauge(
            "cnnray_serve_model_version", "model version being served", ["model"], registry=self.registry,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def track(self, model: str, api: str) -> _Tracker:
        """`with metrics.track(model, api) as t: ...; t.status = 200` counts one request."""
        return _Tracker(self, model, api)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: the per-request series are few (served
        models, or "_unknown", x 2 APIs x the statuses sent) and never removed, and
        prometheus-client's `labels()` takes a lock and builds a key on every call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_versions(self, versions: dict[str, int]) -> None:
        for sample in list(self._label_values(self.model_version)):
            if sample not in versions:
                self.model_version.remove(sample)
        for name, version in versions.items():
            self.model_version.labels(name).set(version)

    @staticmethod
    def _label_values(gauge: Any) -> Iterable[str]:
        for metric in gauge.collect():
            for s in metric.samples:
                yield s.labels["model"]

    def snapshot(self) -> list[Family]:
        """The registry's current values as plain data (picklable, mergeable)."""
        families = []
        for metric in self.registry.collect():
            samples = [
                (s.name, dict(s.labels), float(s.value))
                for s in metric.samples
                if not s.name.endswith("_created")  # creation times do not add up
            ]
            families.append((metric.name, metric.type, metric.documentation, samples))
        return families


class _Tracker:
    def __init__(self, metrics: ServeMetrics, model: str, api: str) -> None:
        self.metrics, self.model, self.api = metrics, model, api
        self.status = 500  # unless the handler says otherwise, it failed

    def __enter__(self) -> _Tracker:
        self.start = time.perf_counter()
        self.metrics.child(self.metrics.in_flight, self.model).inc()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is asyncio.CancelledError:
            self.status = 499  # the client went away (nginx's convention)
        elif isinstance(exc, RequestError):  # answered by the app's RequestError handler
            self.status = exc.status
        m = self.metrics
        m.child(m.in_flight, self.model).dec()
        m.child(m.requests, self.model, self.api, str(self.status)).inc()
        m.child(m.latency, self.model).observe(time.perf_counter() - self.start)


def merge(snapshots: Iterable[list[Family]]) -> list[Family]:
    """Sum the snapshots of several replicas sample by sample (max for the version gauge)."""
    order: list[str] = []
    heads: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    count = 0
    for snap in snapshots:
        count += 1
        for name, typ, doc, samples in snap:
            if name not in heads:
                order.append(name)
                heads[name] = (typ, doc)
                values[name] = {}
            acc = values[name]
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                if name in _MAX_MERGED:
                    acc[key] = max(acc.get(key, value), value)
                else:
                    acc[key] = acc.get(key, 0.0) + value
    merged: list[Family] = [
        (name, *heads[name], [(s, dict(labels), v) for (s, labels), v in values[name].items()]) for name in order
    ]
    merged.append(("cnnray_serve_replicas", "gauge", "replicas whose metrics are included", [
        ("cnnray_serve_replicas", {}, float(count))
    ]))
    return merged


def render(families: list[Family]) -> bytes:
    """Prometheus text exposition format (prometheus-client's own writer)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric

    class _Snapshot:
        def collect(self) -> Iterable[Metric]:
            for name, typ, doc, samples in families:
                metric = Metric(name, doc, typ)
                for sample, labels, value in samples:
                    metric.add_sample(sample, labels, value)
                yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry)


class MetricsHub:
    """Deployment-scoped actor: the latest snapshot of every replica, merged on request."""

    def __init__(self) -> None:
        self._snapshots: dict[str, tuple[float, list[Family]]] = {}

    def push(self, replica: str, snapshot: list[Family]) -> None:
        self._snapshots[replica] = (time.monotonic(), snapshot)

    def merged(self) -> list[Family]:
        now = time.monotonic()
        self._snapshots = {r: s for r, s in self._snapshots.items() if now - s[0] < STALE_S}
        return merge(snap for _, snap in self._snapshots.values())


class MetricsReporter:
    """A replica's side of the hub: periodic pushes, and the merged text for a scrape.

    `get_hub` returns the hub's actor handle (it may raise while Serve (re)creates it);
    without a hub the scrape shows this replica alone, which is still valid Prometheus text.
    """

    def __init__(self, metrics: ServeMetrics, replica: str, get_hub: Callable[[], Any] | None) -> None:
        self.metrics, self.replica, self._get_hub = metrics, replica, get_hub
        self._hub: Any = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._get_hub is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._push_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _push(self) -> Any:
        if self._hub is None:
            self._hub = self._get_hub()
        try:
            await self._hub.push.remote(self.replica, self.metrics.snapshot())
        except Exception:
            self._hub = None  # recreated by Serve, or gone: look it up again next time
            raise
        return self._hub

    async def _push_forever(self) -> None:
        while True:
            try:
                await self._push()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("metrics push failed: %s", e)
            await asyncio.sleep(PUSH_S)

    async def text(self) -> bytes:
        if self._get_hub is not None:
            try:
                hub = await self._push()
                return render(await hub.merged.remote())
            except Exception as e:
                log.warning("metrics hub unavailable, answering with this replica's metrics: %s", e)
        return render(merge([self.metrics.snapshot()]))
