"""The HTTP API, as a FastAPI app built around a backend (the Serve replica, or a plain process).

    GET  /                              a page to draw or upload a digit and see the top 3 classes
    GET  /healthz                       liveness: {"status": "ok", "models": [...], "replica": ...}
    GET  /metrics                       Prometheus text (see metrics.py)
    GET  /v1/models                     every served model: version, input shape, classes, metrics
    GET  /v1/models/{name}              {"name", "version", "ready"}: 200 when ready, else 503
    POST /v1/models/{name}:predict      KServe v1: {"instances": [{"b64": ...} | C x H x W array]}
    POST /predictions/{name}            TorchServe: the raw bytes of one image file (PUT works too)

Every refused request answers 4xx with {"error": "..."}: unknown model 404, wrong content
type 415, a body that does not arrive within `Limits.body_timeout_s` 408, body, JSON or
pixels over a budget 413, a model output that is not finite 422, anything malformed 400.
No bad input reaches a 5xx.

Cost bounds (see `Limits`): each budget is checked before the work it bounds, and the heavy
work runs off the event loop, so /healthz and other requests keep answering while it runs:
JSON bodies over `INLINE_PARSE_BYTES` are parsed on a small thread pool per app; image files
are decoded and normalised by the backend (the replica's batch, on its inference thread). An
oversized body is read and discarded (up to `max_drain_bytes`) before its 413 is sent, so
clients that send the whole body before reading the answer read the 413, not a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnnray.serve.body import BodyBudget, discard_body
from cnnray.serve.defaults import DECODE_THREADS, INLINE_PARSE_BYTES
from cnnray.serve.engine import LoadedModel
from cnnray.serve.lean import LeanApp
from cnnray.serve.metrics import UNKNOWN_MODEL, ServeMetrics
from cnnray.serve.preprocess import (
    EncodedImage,
    Payload,
    RequestError,
    instance_payloads,
    json_depth,
)
from cnnray.serve.schemas import (
    ErrorBody,
    Health,
    Limits,
    ModelList,
    ModelStatus,
    PredictRequest,
    PredictResponse,
    TorchServeResponse,
)

log = logging.getLogger("cnnray.serve")

JSON_TYPES = ("application/json",)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/bmp", "image/webp", "image/tiff", "image/gif",
               "image/x-portable-anymap", "application/octet-stream")
# {"instances": [ [C [H [W values]]] ]} nests 5 deep ({"b64": ...} instances 3): deeper is malformed.
MAX_JSON_DEPTH = 5

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in [
        (400, "malformed request"), (404, "unknown model"), (408, "body not received in time"),
        (413, "body, JSON or pixels over the limit"), (415, "wrong content type"),
        (422, "the model gives no finite output for this input"),
    ]
}


class Backend(Protocol):
    limits: Limits
    metrics: ServeMetrics

    def replica_name(self) -> str: ...
    def model(self, name: str) -> LoadedModel | None: ...
    def models(self) -> list[LoadedModel]: ...
    def failures(self) -> dict[str, tuple[int, str]]: ...
    def problems(self) -> list[str]: ...
    async def infer(self, entry: LoadedModel, payloads: list[Payload]) -> list[list[float] | RequestError]: ...
    async def metrics_text(self) -> bytes: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def error(status: int, message: str, close: bool = False) -> JSONResponse:
    """{"error": message}; `close` asks the server to close the connection after the answer
    (a body left unread, or a client too slow to keep)."""
    headers = {"Connection": "close"} if close else {}
    if status == 429:
        headers["Retry-After"] = "1"  # seconds: bodies in flight are read within body_timeout_s
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


@lru_cache(maxsize=1)
def index_html() -> str:
    return resources.files("cnnray.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def build_http_app(backend: Backend, lean: bool = True) -> FastAPI:
    """The FastAPI app (routes, schemas, error handlers) over `backend`. `lean`: the inference
    routes skip FastAPI's middleware and router (see `cnnray.serve.lean.LeanApp`); False
    gives a plain FastAPI app (the load benchmark's baseline)."""

    # JSON bodies larger than INLINE_PARSE_BYTES are parsed off the event loop; image files
    # are decoded in the backend, off the loop too (Pillow and numpy release the GIL while
    # they decode and convert, so the loop keeps answering).
    pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="cnnray-decode")
    buffered = BodyBudget(backend.limits.max_buffered_bytes)

    async def off_loop(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await backend.start()
        yield
        await backend.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = LeanApp(
        title="cnnray serve",
        description="Classify images with cnnray checkpoints (KServe v1 and TorchServe-style APIs).",
        version="1",
        lifespan=lifespan,
    )

    # --- errors: always {"error": "..."} ------------------------------------------------
    async def refusal(request: Request, exc: RequestError) -> JSONResponse:
        close = exc.close
        try:
            close = await discard_body(request, backend.limits) or close
        except RequestError:  # the client went away while we drained: nobody reads this
            close = True
        return error(exc.status, exc.message, close=close)

    def internal(exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback, answered without details.
        log.error("cnnray: unexpected error", exc_info=exc)
        return error(500, "internal error (logged by the server)")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # No such route or method: the body was never read, so drop it as for a RequestError.
        try:
            close = await discard_body(request, backend.limits)
        except RequestError:
            close = True
        return error(exc.status_code, str(exc.detail), close=close)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, _one_line(exc.errors()))

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return await refusal(request, exc)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return internal(exc)

    # --- inference: one handler per route, reached through FastAPI or the lean path -------
    # Registered first: Ray Serve matches each request against the app's routes in order
    # (to label its metrics), and these take nearly all the traffic.
    async def kserve(name: str, request: Request) -> Response:
        # A RequestError leaves the tracker (which counts its status) for the caller's handler.
        with backend.metrics.track(_label(backend, name), "kserve") as t:
            entry = _served(backend, name)
            _require_type(request, JSON_TYPES, "application/json")
            limits = backend.limits
            async with buffered.hold(request, limits) as body:
                if len(body) <= INLINE_PARSE_BYTES:  # cheaper than a thread hop
                    payloads = _predict_payloads(body, entry, limits)
                else:
                    payloads = await off_loop(_predict_payloads, body, entry, limits)
                results = await backend.infer(entry, payloads)
            _raise_first_error(results, "instance {i}: ")
            response = JSONResponse(
                {"predictions": _predictions(entry, results), "model_name": name, "model_version": entry.version}
            )
            t.status = response.status_code  # counted as sent: built without error
            return response

    async def torchserve(name: str, request: Request) -> Response:
        with backend.metrics.track(_label(backend, name), "torchserve") as t:
            entry = _served(backend, name)
            _require_type(request, IMAGE_TYPES, "image/png, image/jpeg or image/bmp (or image/webp, image/tiff, image/gif)", missing_ok=True)
            limits = backend.limits
            async with buffered.hold(request, limits) as body:
                image = EncodedImage(body, min(limits.max_image_pixels, limits.max_request_pixels))
                results = await backend.infer(entry, [image])
            _raise_first_error(results, "")
            answer = {**_predictions(entry, results)[0], "model_name": name, "model_version": entry.version}
            response = JSONResponse(answer)
            t.status = response.status_code
            return response

    handlers = {"kserve": kserve, "torchserve": torchserve}

    async def hot(kind: str, name: str, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            response = await handlers[kind](name, request)
        except RequestError as exc:
            response = await refusal(request, exc)
        except Exception as exc:
            response = internal(exc)
        await response(scope, receive, send)

    if lean:
        app.hot = hot

    @app.post(
        "/v1/models/{name}:predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(name: str, request: Request) -> Response:
        return await kserve(name, request)

    @app.api_route(
        "/predictions/{name}",
        methods=["POST", "PUT"],
        response_model=TorchServeResponse,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/png", "image/jpeg")},
            }
        },
    )
    async def predictions(name: str, request: Request) -> Response:
        return await torchserve(name, request)

    # --- pages and probes ---------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html())

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(m.name for m in backend.models()), "replica": backend.replica_name()}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await backend.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    # --- models -------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        described = {m.name: m.describe() for m in backend.models()}
        for name, (version, why) in backend.failures().items():
            if name in described:
                described[name]["error"] = f"version {version} failed to load: {why}"
            else:
                described[name] = {"name": name, "version": version, "ready": False, "error": why}
        return {"models": [described[n] for n in sorted(described)], "problems": backend.problems()}

    @app.get(
        "/v1/models/{name}", response_model=ModelStatus, responses={404: _ERRORS[404], 503: {"model": ModelStatus}}
    )
    async def model_status(name: str) -> Any:
        entry = backend.model(name)
        failed = backend.failures().get(name)
        if entry is not None:
            return {"name": name, "version": entry.version, "ready": True}
        if failed is not None:
            body = {"name": name, "version": failed[0], "ready": False, "error": failed[1]}
            return JSONResponse(body, status_code=503)
        raise RequestError(404, _unknown(backend, name))

    return app


# --- helpers ------------------------------------------------------------------------------
def parse_predict_request(body: bytes, max_values: int) -> PredictRequest:
    """A :predict body -> PredictRequest, its size (JSON values) and depth checked before
    `json.loads` builds any object: 8 MiB of `[[0],[0],...]` would be ~300 MB of lists."""
    values = body.count(b",") + body.count(b"[") + body.count(b"{")  # >= JSON values - 1
    if values > max_values:
        raise RequestError(413, f"JSON body holds over {max_values} values, more than this model's "
                                f"largest request can need")
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, f"JSON nested {depth} deep; a :predict body nests at most {MAX_JSON_DEPTH} deep")
    try:
        obj = json.loads(body)  # accepts NaN and Infinity literals: refused later, by name
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RequestError(400, f"body is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict) or "instances" not in obj:
        raise RequestError(400, 'body must be a JSON object {"instances": [...]}')
    try:
        return PredictRequest.model_validate(obj)
    except ValidationError as e:
        raise RequestError(400, _one_line(e.errors())) from None


def max_json_values(input_shape: tuple[int, int, int], max_instances: int) -> int:
    """Upper bound on the JSON values of a valid :predict body: every instance a full
    C x H x W array (its numbers and nested lists), plus the outer object and list."""
    c, h, w = input_shape
    return max_instances * (c * h * w + c * h + c + 2) + 16


def _predict_payloads(body: bytes, entry: LoadedModel, limits: Limits) -> list[Payload]:
    """A :predict body -> its instances, checked, for the batch (files are decoded there)."""
    req = parse_predict_request(body, max_json_values(entry.input_shape, limits.max_instances))
    n = len(req.instances)
    if n == 0:
        raise RequestError(400, "no instances: send at least one")
    if n > limits.max_instances:
        raise RequestError(400, f"too many instances: {n}, at most {limits.max_instances} per request")
    return instance_payloads(req.instances, entry.input_shape, limits.max_image_pixels, limits.max_request_pixels)


def _raise_first_error(results: list[Any], where: str) -> None:
    """The first instance the backend refused (a file that does not decode), as the request's
    answer; `where` prefixes its message ("instance {i}: ")."""
    for i, r in enumerate(results):
        if isinstance(r, RequestError):
            raise RequestError(r.status, where.format(i=i) + r.message) from None


def _require_type(request: Request, accepted: tuple[str, ...], say: str, missing_ok: bool = False) -> None:
    raw = request.headers.get("content-type")
    if raw is None and missing_ok:
        return
    kind = (raw or "").split(";")[0].strip().lower()
    if kind not in accepted:
        got = f"Content-Type {raw!r}" if raw else "no Content-Type"
        raise RequestError(415, f"{got}: send {say}")


def _served(backend: Backend, name: str) -> LoadedModel:
    entry = backend.model(name)
    if entry is None:
        if name in backend.failures():
            raise RequestError(404, f"model {name!r} is not ready: {backend.failures()[name][1]}")
        raise RequestError(404, _unknown(backend, name))
    return entry


def _unknown(backend: Backend, name: str) -> str:
    served = ", ".join(sorted(m.name for m in backend.models())) or "none"
    return f"unknown model {name[:100]!r}; served models: {served}"


def _label(backend: Backend, name: str) -> str:
    return name if backend.model(name) is not None else UNKNOWN_MODEL


def _predictions(entry: LoadedModel, rows: list[list[float]]) -> list[dict[str, Any]]:
    """Class probabilities, one row per instance -> one prediction each (the first most
    probable class, as torch.argmax picks). An output that is not finite (a model that
    overflows on this input) is refused with 422, never sent as invalid JSON."""
    out = []
    for i, p in enumerate(rows):
        if not all(map(math.isfinite, p)):
            raise RequestError(
                422, f"model {entry.name!r} gives NaN or infinity for instance {i}: it cannot classify this input"
            )
        index = max(range(len(p)), key=p.__getitem__)
        out.append({"label": entry.classes[index], "class_index": index, "probabilities": p})
    return out


def _one_line(errors: list[dict[str, Any]]) -> str:
    """Pydantic's error list as one line: where and what, for the first few."""
    parts = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
