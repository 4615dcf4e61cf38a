"""`:explain` under `cnnray serve`: its own Ray Serve deployment, so it never slows predictions.

The predict replicas (app.ModelServer) answer `POST /v1/models/{name}:explain` over HTTP
as before (route, limits, decoding checks: explain.py) but hand the work to `ExplainServer`
through a DeploymentHandle (`RemoteExplain`). Why a deployment of its own and not a thread
in the predict replica: a thread shares the replica's GIL, and Captum's Python, the PNG
overlays and the JSON of the heat maps hold it for milliseconds at a time; worse, a thread
at lower CPU priority that holds the GIL while the kernel runs someone else stalls the
replica's event loop and batches behind it (priority inversion). In its own process the
explanation has its own GIL, and its CPU share is the kernel's business alone:

- every thread of the explain replica runs in Linux's SCHED_IDLE class (and at nice
  +`EXPLAIN_NICE`), set in `__init__`, the first code of ours that runs in the actor's
  process, on every thread Ray started there (threads started later inherit it): a waking
  prediction thread takes the core from an explanation at once (`lower_process_priority`);
- one torch intra-op thread, so one explanation occupies at most one core;
- it reserves no CPU (`num_cpus=0`): its scheduling class, not Ray's bookkeeping, gives it only what
  the predict replicas leave, and a reservation would take a core from them
  (`--replicas auto` fills the machine's CPUs with predict replicas);
- `EXPLAIN_THREADS` explanations compute at a time per explain replica (its thread pool);
  the others wait inside the replica (`max_ongoing_requests`, `EXPLAIN_MAX_ONGOING`), not in
  the predict replicas' routers; each predict replica admits at most `EXPLAIN_MAX_PENDING`
  running or waiting (429 before the body is read), and its handle queues at most as many
  (`max_queued_requests`; Serve's BackPressureError becomes the same readable 429 with
  Retry-After);
- each explanation's cost is bounded before it starts (explain.py: one image, at most 144
  occlusion windows, at most 8 maps per layer).

The explain replica runs on the CPU (it takes no GPU: those are the predict replicas'), and
loads the version the predict replica serves from the same checkpoint path, keeping the last
few it was asked for.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from cnnray.serve.explain import EXPLAIN_MAX_PENDING, EXPLAIN_NICE, EXPLAIN_THREADS, Admission, ExplainService
from cnnray.serve.preprocess import Payload, RequestError

EXPLAIN_DEPLOYMENT = "ExplainServer"
EXPLAIN_REPLICAS = 1  # explanations are a diagnostic at human pace (the page asks ~3 per second of drawing)
EXPLAIN_TORCH_THREADS = 1  # intra-op threads: one explanation uses at most one core
EXPLAIN_CACHED_MODELS = 4  # model versions kept loaded in the explain replica (a swap adds one)
# Requests the explain replica holds at once (Serve's max_ongoing_requests): they wait there,
# a coroutine each, for its one explain thread. Waiting in the callers' routers instead would
# cost the predict replicas' event loops: a router whose replicas are all full polls them
# with queue-length probes, backing off 25 ms doubling to 0.5 s (Ray 2.60,
# serve/_private/request_router), which also delays each explanation by up to the backoff.
# 16: the admitted explanations (EXPLAIN_MAX_PENDING each) of 4 predict replicas.
EXPLAIN_MAX_ONGOING = 4 * EXPLAIN_MAX_PENDING
RETRY_AFTER_S = 1  # seconds, in the 429's Retry-After: an MNIST explanation takes ~0.1-0.5 s on one core


def lower_process_priority(nice: int = EXPLAIN_NICE) -> int:
    """Put every thread of this process in the SCHED_IDLE class and at nice >= `nice` (Linux
    keeps both per thread: setpriority(PRIO_PROCESS, 0) would change the calling thread
    alone). Threads started later inherit their creator's. Returns the number of threads
    set; 0 off Linux. Raising one's own nice value and entering SCHED_IDLE need no privilege.

    Why SCHED_IDLE and not nice alone: nice weights only the CPU *share*; a niced task that
    holds a core may keep it to the end of its slice when a prediction's thread wakes
    (EEVDF's run-to-parity), and a prediction passes through several wake-ups (HAProxy, the
    replica's event loop, its inference thread). A waking SCHED_NORMAL thread preempts a
    SCHED_IDLE one at once (kernel/sched/fair.c, check_preempt_wakeup_fair), and a core
    running only SCHED_IDLE threads counts as idle when the kernel places a waking thread.
    The nice value stays for kernels without SCHED_IDLE. (Measured on the shared 2-core
    machine, docs/explain.md: within the noise either way, which there is large.)"""
    changed = 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return 0
    idle = getattr(os, "SCHED_IDLE", None)
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            if idle is not None:
                os.sched_setscheduler(tid, idle, os.sched_param(0))
            changed += 1
        except OSError:  # the thread ended meanwhile, or not allowed
            pass
    return changed


@serve.deployment(
    name=EXPLAIN_DEPLOYMENT,
    num_replicas=EXPLAIN_REPLICAS,
    max_ongoing_requests=EXPLAIN_MAX_ONGOING,  # held in the replica; EXPLAIN_THREADS compute at a time
    max_queued_requests=EXPLAIN_MAX_PENDING,  # then per caller in its router; beyond: 429
    backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
    ray_actor_options={"num_cpus": 0, "num_gpus": 0},
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
    graceful_shutdown_timeout_s=30,
    # Its health check runs on SCHED_IDLE threads too: while predictions keep both cores busy
    # it may answer late; Serve's default 30 s would restart a replica that is merely waiting.
    health_check_timeout_s=120,
)
class ExplainServer:
    """Explanations of the models the predict replicas serve, one at a time, at low priority."""

    def __init__(self) -> None:
        import torch

        from cnnray.serve.replica_net import replica_grpc_on_loopback

        replica_grpc_on_loopback()  # like the predict replicas: nothing beyond loopback on one machine
        self.threads_reniced = lower_process_priority()
        torch.set_num_threads(EXPLAIN_TORCH_THREADS)
        self.service = ExplainService(threads=EXPLAIN_THREADS)
        self._models: OrderedDict[tuple[str, str, int], Any] = OrderedDict()  # -> engine.LoadedModel

    def _entry(self, name: str, path: str, version: int) -> Any:
        from cnnray.serve.engine import load_served_model, public_error
        from cnnray.serve.schemas import ModelRef

        key = (name, path, version)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        try:  # torch runtime on the CPU: explanations need the module and its gradients
            entry = load_served_model(name, ModelRef(path=path, version=version), "cpu", "torch", EXPLAIN_TORCH_THREADS)
        except Exception as e:
            raise RequestError(503, f"explain: cannot load {name} version {version}: "
                                    f"{public_error(e, path, f'{name}/{version}')}") from None
        self._models[key] = entry
        while len(self._models) > EXPLAIN_CACHED_MODELS:
            self._models.popitem(last=False)
        return entry

    async def explain(self, name: str, path: str, version: int, payload: Payload,
                      query: dict[str, str]) -> tuple[int, bytes]:
        """(200, the JSON answer) or (4xx/5xx status, the error message as UTF-8): refusals
        travel back as values, never as exceptions through Ray."""
        try:
            entry = await asyncio.to_thread(self._entry, name, path, version)
            return 200, await self.service.run(entry, payload, query)
        except RequestError as e:
            return e.status, e.message.encode()


class RemoteExplain(Admission):
    """The predict replica's side: admission (before the body is read), then one call to the
    ExplainServer deployment through `handle`; the answer's bytes come back as they are."""

    def __init__(self, handle: Any, max_pending: int = EXPLAIN_MAX_PENDING) -> None:
        super().__init__(max_pending)
        self._handle = handle  # ray.serve.handle.DeploymentHandle of ExplainServer

    async def run(self, entry: Any, payload: Payload, query: dict[str, str]) -> bytes:
        from ray.serve.exceptions import BackPressureError

        try:
            status, body = await self._handle.explain.remote(entry.name, entry.path, entry.version, payload, query)
        except BackPressureError as e:
            queued, limit = e.args[:2]  # BackPressureError(num_queued_requests, max_queued_requests, ...)
            raise RequestError(429, f"explain: {queued} explanations already waiting for the explain replica "
                                    f"(at most {limit}); retry in a moment") from None
        except Exception as e:  # the explain replica died or is restarting: the route says so, never a 500
            raise RequestError(503, f"explain: the explain replica cannot answer now ({type(e).__name__}); "
                                    "retry in a moment") from None
        if status != 200:
            raise RequestError(status, body.decode())
        return body

    def close(self) -> None:
        pass

