"""`POST /v1/models/{name}:explain`: KServe v1's explain route, answered beside the predict path.

    curl -s -X POST --data-binary @digit.png -H 'Content-Type: image/png' \
        'http://127.0.0.1:8000/v1/models/mnist:explain?methods=occlusion,gradcam&layers=all&channels=4'

The body is what :predict takes for one image (a KServe v1 body of one instance, or the
raw PNG/JPEG/BMP file), read, checked and decoded by the same code and limits. The options
travel in the query string: `methods` (occlusion, gradcam; default every one the model
supports), `layers` ("all" or conv layer names: their response maps), `channels` (maps per
layer, 1..8, default 4) and `target` (class index; default the predicted class). The answer
holds the prediction and `cnnray.explain.Explanation.to_json()`.

Explanations never run in the batched predict path. Under `cnnray serve` they run in their
own Ray Serve deployment (explain_deployment.py: its own process in Linux's SCHED_IDLE class,
one torch thread, `EXPLAIN_THREADS` at a time); the plain LocalBackend runs them in-process on
its own thread at nice +`EXPLAIN_NICE` (not SCHED_IDLE: that thread shares the process's GIL,
and a thread that may wait long for a core while holding it would stall the event loop). Either way each explanation uses its own copy of the model (hooks added
while explaining never touch the model that answers predictions), and at most
`EXPLAIN_MAX_PENDING` explanations run or wait per predict replica; more are answered 429
with Retry-After at once, before their body is read. `cnnray serve --no-explain` turns the
route off (403).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from cnnray.serve import http_parts
from cnnray.serve.preprocess import EncodedImage, Payload, RequestError
from cnnray.serve.schemas import ErrorBody, PredictRequest

if TYPE_CHECKING:
    from cnnray.explain import Explainer

EXPLAIN_THREADS = 1  # per explain replica (or LocalBackend): one explanation computes at a time
EXPLAIN_MAX_PENDING = 4  # per predict replica, running or waiting; the next is answered 429
# The explain threads' nice value (Linux; the deployment's are in SCHED_IDLE as well): when
# predictions and explanations want the same core, the scheduler gives predictions ~10x the
# CPU time (weights 1024 vs 110), so a burst of explanations cannot starve the batches.
EXPLAIN_NICE = 10
OFF_MESSAGE = "explanations are off on this server (it was started with --no-explain)"


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), EXPLAIN_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the normal priority
        pass


class Admission:
    """At most `max_pending` explanations running or waiting; counted on the event loop."""

    def __init__(self, max_pending: int = EXPLAIN_MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._pending = 0  # touched on the event loop only

    def admit(self) -> None:
        """Take a slot or raise RequestError 429 (called before the body is read)."""
        if self._pending >= self.max_pending:
            raise RequestError(429, f"explain: {self._pending} explanations already running or waiting on this "
                                    f"replica (at most {self.max_pending}); retry in a moment")
        self._pending += 1

    def release(self) -> None:
        self._pending -= 1


class ExplainService(Admission):
    """Explanations in this process: their thread pool, admission count and model copies."""

    def __init__(self, threads: int = EXPLAIN_THREADS, max_pending: int = EXPLAIN_MAX_PENDING) -> None:
        super().__init__(max_pending)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cnnray-explain",
                                        initializer=_lower_priority)
        self._lock = threading.Lock()
        # One Explainer (over a deep copy of the served module) per loaded model version,
        # dropped with it when a new version is swapped in.
        self._explainers: weakref.WeakKeyDictionary[Any, Explainer] = weakref.WeakKeyDictionary()

    def explainer(self, entry: Any) -> Explainer:  # entry: engine.LoadedModel
        from cnnray.explain import Explainer

        with self._lock:
            found = self._explainers.get(entry)
            if found is None:
                module = copy.deepcopy(entry.module).eval()
                found = self._explainers[entry] = Explainer(module, entry.input_shape, len(entry.classes))
            return found

    async def run(self, entry: Any, payload: Payload, query: dict[str, str]) -> bytes:
        """The JSON answer (bytes) for one image, computed on the explain pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._work, entry, payload, query)

    def _work(self, entry: Any, payload: Payload, query: dict[str, str]) -> bytes:
        import torch

        from cnnray.explain import ExplainError
        from cnnray.models.tta import tta_logits
        from cnnray.checkpoint import checkpoint_tta

        ex = self.explainer(entry)
        try:
            opts = ex.options(query.get("methods"), query.get("layers"), query.get("channels"), query.get("target"))
        except ExplainError as e:
            raise RequestError(400, str(e)) from None
        x, errors = entry.inputs([payload])  # the predict path's decoder, limits and normalisation
        if errors[0] is not None:
            raise errors[0]
        mean = torch.tensor(entry.mean).view(-1, 1, 1)
        std = torch.tensor(entry.std).view(-1, 1, 1)
        pixels = ((x[0] * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)  # as decoded
        device = next(ex.model.parameters()).device
        with torch.no_grad():  # the served prediction: the checkpoint's test-time augmentation
            probs = torch.softmax(tta_logits(ex.model, x.to(device), checkpoint_tta(entry.meta)).float(), 1)[0].cpu()
        if not torch.isfinite(probs).all():
            raise RequestError(422, f"model {entry.name!r} gives NaN or infinity for this image: it cannot classify it")
        result = ex.explain(x, pixels, opts, probabilities=probs)
        doc = result.to_json()
        if not all(torch.isfinite(h.values).all() for h in result.heatmaps):
            raise RequestError(422, f"model {entry.name!r} gives no finite explanation for this image")
        index = int(probs.argmax())
        body = {
            "model_name": entry.name,
            "model_version": entry.version,
            "input_shape": list(entry.input_shape),
            "prediction": {"label": entry.classes[index], "class_index": index, "probabilities": probs.tolist()},
            "target": {"label": entry.classes[result.target], "class_index": result.target},
            "explanations": doc["explanations"],
            "feature_maps": doc["feature_maps"],
        }
        return json.dumps(body, separators=(",", ":")).encode()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


QUERY_KEYS = ("methods", "layers", "channels", "target")
MAX_QUERY_CHARS = 4096  # the whole query string: 64 layer names of ~60 characters fit


def explain_router(backend: Any, buffered: Any, off_loop: Any) -> APIRouter:
    """The :explain route over `backend` (api.Backend; its `explainer` is an ExplainService,
    or None when explanations are off), sharing the app's body budget and parse pool."""
    router = APIRouter()

    @router.post(
        "/v1/models/{name}:explain",
        responses={**http_parts.ERRORS, 403: {"model": ErrorBody, "description": "explanations are off"},
                   429: {"model": ErrorBody, "description": "too many explanations at once"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()},
                            **{t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/png", "image/jpeg")}},
            }
        },
    )
    async def explain(name: str, request: Request) -> Response:
        with backend.metrics.track(http_parts.label(backend, name), "explain") as t:
            service = getattr(backend, "explainer", None)
            if service is None:
                raise RequestError(403, OFF_MESSAGE)
            entry = http_parts.served(backend, name)
            query = _query(request)
            kind = _body_kind(request)
            service.admit()
            try:
                async with buffered.hold(request, backend.limits) as data:  # held until answered
                    payload = await _payload(data, kind, entry, backend.limits, off_loop)
                    body = await service.run(entry, payload, query)
            finally:
                service.release()
            t.status = 200
            return Response(body, media_type="application/json")

    return router


def _query(request: Request) -> dict[str, str]:
    raw = request.scope.get("query_string", b"")
    if len(raw) > MAX_QUERY_CHARS:
        raise RequestError(414, f"query string of {len(raw)} bytes, over {MAX_QUERY_CHARS}: use layers=all")
    params = request.query_params
    unknown = sorted(set(params.keys()) - set(QUERY_KEYS))
    if unknown:
        raise RequestError(400, f"unknown query parameter {unknown[0][:100]!r}; use: {', '.join(QUERY_KEYS)}")
    repeated = [k for k in QUERY_KEYS if len(params.getlist(k)) > 1]
    if repeated:
        raise RequestError(400, f"query parameter {repeated[0]!r} given more than once: give one comma-separated list")
    return {k: params[k] for k in QUERY_KEYS if k in params}


def _body_kind(request: Request) -> str:
    """"json" or "image" from the Content-Type (a missing one is an image, as for
    POST /predictions/{name}); else RequestError 415."""
    raw = request.headers.get("content-type")
    kind = (raw or "").split(";")[0].strip().lower()
    if kind in http_parts.JSON_TYPES:
        return "json"
    http_parts.require_type(request, http_parts.IMAGE_TYPES, "application/json (KServe v1, one instance), image/png, "
                      "image/jpeg or image/bmp", missing_ok=True)
    return "image"


async def _payload(body: bytes, kind: str, entry: Any, limits: Any, off_loop: Any) -> Payload:
    """The one image of the request, checked as :predict checks it (KServe v1 JSON of one
    instance, or the raw file as POST /predictions/{name} takes it)."""
    if kind == "json":
        payloads = await off_loop(http_parts.predict_payloads, body, entry, limits)
        if len(payloads) != 1:
            raise RequestError(400, f"{len(payloads)} instances: :explain takes exactly one")
        return payloads[0]
    return EncodedImage(body, min(limits.max_image_pixels, limits.max_request_pixels))
