"""The Ray Serve deployment: cnnray checkpoints behind a FastAPI ingress, with dynamic batching.

Run it with `cnnray serve`, or with Ray Serve's own tools through the typed app builder:

    serve run cnnray.serve.app:build_app model_store=runs/store
    serve run jobs/configs/serve.yaml            # or: serve deploy jobs/configs/serve.yaml

One deployment class, `ModelServer`: each replica loads every served model in `__init__`,
answers HTTP through the FastAPI app of api.py (built on the replica), groups images of
concurrent requests into one forward pass with `@serve.batch`, and takes new model
versions and batching settings in `reconfigure(user_config)` without a restart: the new
version is loaded beside the old one, then swapped in; requests already batched finish on
the version they started with, so none is dropped. `:explain` requests arrive here too but
are computed by a second deployment, `ExplainServer` (explain_deployment.py), in a process
of its own at low priority, so they never take the predict replicas' CPU or GIL.

Nothing runs at import: the FastAPI app, the metrics hub and the models are built when a
replica starts (importing this module does import Ray Serve, for the decorators).
"""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve
from ray.serve import Application

from cnnray.serve.defaults import BATCH_WAIT_S, DEPLOYMENT, MAX_BATCH_SIZE, MAX_ONGOING_REQUESTS
from cnnray.serve.engine import LoadedModel, load_served_model, public_error, resolve, user_config_for
from cnnray.serve.metrics import MetricsHub, MetricsReporter, ServeMetrics
from cnnray.serve.oip_grpc import OipGrpcMethods
from cnnray.serve.preprocess import Payload, RequestError
from cnnray.serve.registry import follows_alias
from cnnray.serve.schemas import Limits, ModelRef, ServeArgs, ServeUserConfig

# No `from __future__ import annotations` here: Serve reads `build_app`'s annotation as a
# class to validate its arguments, and a string annotation would bypass that.

METRICS_ACTOR = "metrics"

# A child of Ray Serve's logger, so its lines go where the replica's do, with its own level:
# the deployment runs Ray's logger at WARNING (see build_app), cnnray's lines stay INFO.
log = logging.getLogger("ray.serve.cnnray")


@serve.deployment(
    name=DEPLOYMENT,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    # A rolling update (new code, builder args or resources; model swaps need none) starts
    # the new replicas before stopping the old ones, which finish the requests they hold.
    max_surge_percent=100,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class ModelServer(OipGrpcMethods):  # + OIP v2 gRPC methods (oip_grpc.py), when Serve has a gRPC port
    def __init__(
        self,
        user_config: dict[str, Any],
        limits: dict[str, Any],
        device: str = "cpu",
        threads: int = 1,
        store: dict[str, Any] | None = None,
        explainer: Any = None,
        runtime: str = "torch",
    ) -> None:
        from cnnray.serve.explain_deployment import RemoteExplain
        from cnnray.serve.replica_net import replica_grpc_on_loopback

        replica_grpc_on_loopback()
        # :explain runs in the ExplainServer deployment (`explainer`, its DeploymentHandle; None
        # with --no-explain): its own process at low priority, never in this replica's batches.
        self.explainer = RemoteExplain(explainer) if explainer is not None else None
        log.setLevel(logging.INFO)
        cfg = ServeUserConfig.model_validate(user_config)
        # {"args": ServeArgs as JSON, "watch_s": seconds}: this replica looks in the model
        # store itself, so a RayService or `serve deploy` (no `cnnray serve` polling beside
        # it) picks up new versions too.
        self._store = store
        self.limits = Limits.model_validate(limits)
        self.metrics = ServeMetrics()
        self._device = torch.device(device)
        torch.set_num_threads(max(1, threads))
        # The forward passes' runtime (serve/runtime.py); ONNX Runtime gets torch's thread count.
        self._runtime, self._threads = runtime, max(1, threads)
        # One inference thread: batches are decoded and run one at a time, off the event
        # loop, so requests keep being read and batched while the model computes.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnray-infer")
        self._models: dict[str, LoadedModel] = {}
        self._failures: dict[str, tuple[int, str]] = {}
        self._problems: list[str] = list(cfg.problems)
        self._watch_task: asyncio.Task | None = None
        self._bad: dict[str, Any] = {}  # store versions that failed verification, by their files' stamps
        for name, ref in cfg.models.items():
            self._load(name, ref)
        # A replica started later (a restart, a scale-up) serves what the store has now.
        for name, ref in self._newer_in_store(cfg.models).items():
            self._load(name, ref)
        self._set_batching(cfg)
        self.metrics.set_versions({n: m.version for n, m in self._models.items()})
        ctx = serve.get_replica_context()
        self._replica = ctx.replica_id.unique_id
        self._reporter = MetricsReporter(self.metrics, self._replica, lambda: serve.get_deployment_actor(METRICS_ACTOR))
        log.info("cnnray replica %s serves %s", self._replica, {n: m.version for n, m in self._models.items()})

    def __serve_build_asgi_app__(self):
        from cnnray.serve.api import build_http_app

        return build_http_app(self)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new user_config: load each model whose checkpoint or version changed, swap
        it in, and drop models no longer listed. A version that fails to load leaves the
        previous one serving and is reported by GET /v1/models."""
        cfg = ServeUserConfig.model_validate(user_config)
        self._set_batching(cfg)
        self._problems = list(cfg.problems)
        for name, ref in cfg.models.items():
            current = self._models.get(name)
            if current is not None and current.path == ref.path and current.version == ref.version:
                self._failures.pop(name, None)  # a failed newer version was withdrawn
                continue
            if self._store and current is not None and current.version > ref.version and not self._follows():
                continue  # the store watcher already serves a newer version: never go back
            await asyncio.to_thread(self._load, name, ref)
        for name in set(self._models) - set(cfg.models):
            del self._models[name]
        for name in set(self._failures) - set(cfg.models):
            del self._failures[name]
        self.metrics.set_versions({n: m.version for n, m in self._models.items()})

    def _load(self, name: str, ref: ModelRef) -> None:
        """Load one version and swap it in. A failure leaves the previous version serving
        and is reported by GET /v1/models; it never stops the replica (the bind arguments
        that a restarted replica starts from may name a version since deleted)."""
        try:
            loaded = load_served_model(name, ref, self._device, self._runtime, self._threads)
        except Exception as e:  # reported without the server's paths: /v1/models needs no login
            self._failures[name] = (ref.version, public_error(e, ref.path, f"{name}/{ref.version}"))
            log.error("cnnray: cannot load %s version %s from %s: %s", name, ref.version, ref.path, e)
            return
        self._models[name] = loaded  # one assignment: a request sees the old model or the new
        self._failures.pop(name, None)
        log.info("cnnray: serving %s version %s (%s)", name, ref.version, ref.path)

    def _set_batching(self, cfg: ServeUserConfig) -> None:
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # --- the backend api.py serves ------------------------------------------------------
    def replica_name(self) -> str:
        return self._replica

    def model(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def models(self) -> list[LoadedModel]:
        return list(self._models.values())

    def failures(self) -> dict[str, tuple[int, str]]:
        return dict(self._failures)

    def problems(self) -> list[str]:
        return list(self._problems)

    async def infer(self, entry: LoadedModel, payloads: list[Payload]) -> list[list[float] | RequestError]:
        """Class probabilities (or the RequestError refusing it) for each payload of a request;
        each payload joins the replica's batches, where it is decoded."""
        if len(payloads) == 1:  # the common case: no gather, no task per payload
            return [await self._batched((entry, payloads[0]))]
        return list(await asyncio.gather(*(self._batched((entry, p)) for p in payloads)))

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, items: list[tuple[LoadedModel, Payload]]) -> list[list[float] | RequestError]:
        # Items name their model version: a batch may mix models, or the versions before
        # and after a swap, so it runs one forward pass per (model, version). Decoding,
        # normalisation and the forward pass of a group are one call on the inference
        # thread: one thread hop per batch, not one per request.
        groups: dict[int, list[int]] = {}
        for i, (entry, _) in enumerate(items):
            groups.setdefault(id(entry), []).append(i)
        out: list[list[float] | RequestError] = [[]] * len(items)
        loop = asyncio.get_running_loop()
        for idx in groups.values():
            entry = items[idx[0]][0]
            results = await loop.run_in_executor(self._pool, entry.classify, [items[i][1] for i in idx])
            decoded = sum(1 for r in results if not isinstance(r, RequestError))
            if decoded:
                self.metrics.batch_size.labels(entry.name).observe(decoded)
            for i, r in zip(idx, results):
                out[i] = r
        return out

    async def metrics_text(self) -> bytes:
        return await self._reporter.text()

    async def start(self) -> None:
        self._reporter.start()
        if self._store and self._store["watch_s"] > 0 and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_store())

    async def stop(self) -> None:
        await self._reporter.stop()
        if self.explainer is not None:
            self.explainer.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None

    # --- the model store, watched by the replica -----------------------------------------
    def _newer_in_store(self, serving: dict[str, ModelRef]) -> dict[str, ModelRef]:
        """Models of the store whose newest usable (verified) version is newer than
        `serving`'s (or new), by the same rule as `cnnray serve` (engine.resolve: odd entries
        and versions still being copied are skipped and listed in /v1/models). Never raises:
        a store that cannot be read is logged and retried at the next look."""
        if not self._store:
            return {}
        try:
            res = resolve(ServeArgs.model_validate(self._store["args"]), serving, self._bad)
        except Exception as e:
            log.warning("cnnray: cannot read the model store: %s", e)  # the server log may name paths
            return {}
        self._problems = list(res.problems)
        return {
            n: r for n, r in res.models.items()
            if n not in serving or (r.version > serving[n].version and r.path != serving[n].path)
            # An alias (models:/NAME@ALIAS) may move to any version, older ones too; a version that failed stays out.
            or (self._follows() and r.version != serving[n].version and self._failures.get(n, (0,))[0] != r.version)
        }

    def _follows(self) -> bool:
        return bool(self._store) and follows_alias(self._store["args"].get("model_store"))

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self._store["watch_s"])
            try:
                serving = {n: ModelRef(path=m.path, version=m.version) for n, m in self._models.items()}
                # Versions that failed to load are not retried until a newer one appears.
                serving.update({n: ModelRef(path="?", version=v) for n, (v, _) in self._failures.items()
                                if n not in serving or v > serving[n].version})
                newer = await asyncio.to_thread(self._newer_in_store, serving)
                for name, ref in newer.items():  # verified by resolve
                    await asyncio.to_thread(self._load, name, ref)
                if newer:
                    self.metrics.set_versions({n: m.version for n, m in self._models.items()})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the watcher must outlive any one bad look
                log.warning("cnnray: model store watch failed: %s", e)


def auto_replicas(args: ServeArgs) -> int:
    """`args.replicas`, with "auto" resolved: as many replicas as the cluster's GPUs (with
    `gpu`) or CPUs (`cpus_per_replica` each, 1 if 0) hold, at least one. Totals, not free
    resources, so a redeploy beside the running replicas resolves to the same number."""
    if args.replicas != "auto":
        return int(args.replicas)
    import ray

    total = ray.cluster_resources()
    if args.gpu:
        return max(1, int(total.get("GPU", 0)))
    return max(1, int(total.get("CPU", 1) // (args.cpus_per_replica or 1.0)))


def build_app(args: ServeArgs) -> Application:
    """Typed app builder: `serve run cnnray.serve.app:build_app model_store=DIR` validates
    the arguments against `ServeArgs` (unknown keys are errors) and resolves the newest
    version of every model in the store. With a model store and `watch_s` > 0, every
    replica looks in the store every `watch_s` seconds and swaps newer versions in."""
    import ray

    if isinstance(args, dict):  # called directly with plain arguments
        args = ServeArgs.model_validate(args)
    from ray.serve.config import DeploymentActorConfig

    user_config = user_config_for(args)
    store = None
    if args.model_store and args.watch_s > 0:
        store = {"args": args.model_dump(mode="json"), "watch_s": args.watch_s}
    from cnnray.serve.autoscale import autoscaling_config
    from cnnray.serve.explain_deployment import ExplainServer

    if args.autoscaling is not None:  # --replicas MIN-MAX
        scale: dict[str, Any] = {"autoscaling_config": autoscaling_config(args.autoscaling)}
    else:
        scale = {"num_replicas": auto_replicas(args)}
    return ModelServer.options(
        **scale,
        max_ongoing_requests=max(args.max_ongoing_requests, args.max_batch_size),
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": 1 if args.gpu else 0},
        # No access-log line per request: formatting and writing it (with a rollover check
        # per line) took 7% of a replica's samples under load (py-spy, README "Serving").
        # cnnray_serve_requests_total counts every request by model, API and status instead.
        # And Ray's own replica logger at WARNING: it builds an access-log record for every
        # request even with the access log off, and drops it only in its handlers (2% of a
        # replica's CPU under load, py-spy); at WARNING `logger.info` returns at once.
        # cnnray's own lines (`log`, a child logger set to INFO) are still written.
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
        user_config=user_config,
        deployment_actors=[
            DeploymentActorConfig(
                name=METRICS_ACTOR, actor_class=ray.remote(MetricsHub), actor_options={"num_cpus": 0}
            )
        ],
    ).bind(
        user_config,
        args.limits.model_dump(),
        device="cuda" if args.gpu else "cpu",
        threads=max(1, int(args.cpus_per_replica)),
        store=store,
        # Its own deployment (explain_deployment.py), bound only when explanations are on.
        explainer=ExplainServer.bind() if args.explain else None,
        runtime=args.runtime,
    )
