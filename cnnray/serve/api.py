"""The HTTP API, as a FastAPI app built around a backend (the Serve replica, or a plain process).

    GET  /                              a page to draw or upload a digit and see the top 3 classes
    GET  /healthz                       liveness: {"status": "ok", "models": [...], "replica": ...}
    GET  /metrics                       Prometheus text (see metrics.py)
    GET  /v1/models                     every served model: version, input shape, classes, metrics
    GET  /v1/models/{name}              {"name", "version", "ready"}: 200 when ready, else 503
    POST /v1/models/{name}:predict      KServe v1: {"instances": [{"b64": ...} | C x H x W array]}
    POST /predictions/{name}            TorchServe: the raw bytes of one PNG, JPEG or BMP (PUT works too)

Every refused request answers 4xx with {"error": "..."}: unknown model 404, wrong content
type 415, body over the limit 413, anything malformed 400. No bad input reaches a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from functools import lru_cache
from importlib import resources
from typing import Any, Protocol

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnnray.serve.engine import LoadedModel
from cnnray.serve.metrics import UNKNOWN_MODEL, ServeMetrics
from cnnray.serve.preprocess import RequestError, decode_image, decode_instances, to_model_input
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
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/bmp", "application/octet-stream")
_THREAD_DECODE_BYTES = 256 * 1024  # bodies larger than this are decoded off the event loop

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in [
        (400, "malformed request"), (404, "unknown model"), (413, "body or image over the limit"),
        (415, "wrong content type"),
    ]
}


class Backend(Protocol):
    limits: Limits
    metrics: ServeMetrics

    def replica_name(self) -> str: ...
    def model(self, name: str) -> LoadedModel | None: ...
    def models(self) -> list[LoadedModel]: ...
    def failures(self) -> dict[str, tuple[int, str]]: ...
    async def infer(self, entry: LoadedModel, inputs: list[torch.Tensor]) -> torch.Tensor: ...
    async def metrics_text(self) -> bytes: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@lru_cache(maxsize=1)
def index_html() -> str:
    return resources.files("cnnray.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def build_http_app(backend: Backend) -> FastAPI:
    """The FastAPI app (routes, schemas, error handlers) over `backend`."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await backend.start()
        yield
        await backend.stop()

    app = FastAPI(
        title="cnnray serve",
        description="Classify images with cnnray checkpoints (KServe v1 and TorchServe-style APIs).",
        version="1",
        lifespan=lifespan,
    )

    # --- errors: always {"error": "..."} ------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, _one_line(exc.errors()))

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message)

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
        return {"models": [described[n] for n in sorted(described)]}

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

    # --- inference ----------------------------------------------------------------------
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
        # A RequestError leaves the tracker (which counts its status) for the app's handler.
        with backend.metrics.track(_label(backend, name), "kserve") as t:
            entry = _served(backend, name)
            _require_type(request, JSON_TYPES, "application/json")
            body = await read_body(request, backend.limits.max_body_bytes)
            req = parse_predict_request(body)
            n = len(req.instances)
            if n == 0:
                raise RequestError(400, "no instances: send at least one")
            if n > backend.limits.max_instances:
                most = backend.limits.max_instances
                raise RequestError(400, f"too many instances: {n}, at most {most} per request")
            pixels = await _off_loop_if_large(
                len(body), decode_instances, req.instances, entry.input_shape, backend.limits.max_image_pixels
            )
            probs = await backend.infer(entry, [to_model_input(p, entry.mean, entry.std) for p in pixels])
            t.status = 200
            predictions = [_prediction(entry, p) for p in probs]
            return JSONResponse({"predictions": predictions, "model_name": name, "model_version": entry.version})

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
        with backend.metrics.track(_label(backend, name), "torchserve") as t:
            entry = _served(backend, name)
            _require_type(request, IMAGE_TYPES, "image/png, image/jpeg or image/bmp", missing_ok=True)
            body = await read_body(request, backend.limits.max_body_bytes)
            pixels = await _off_loop_if_large(
                len(body), decode_image, body, entry.input_shape, backend.limits.max_image_pixels
            )
            probs = await backend.infer(entry, [to_model_input(pixels, entry.mean, entry.std)])
            t.status = 200
            answer = {**_prediction(entry, probs[0]), "model_name": name, "model_version": entry.version}
            return JSONResponse(answer)

    return app


# --- helpers ------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, f"bad Content-Length header {declared!r}") from None
        if size > limit:
            raise RequestError(413, f"body of {size} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads declare no length: count as they come
            raise RequestError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise RequestError(400, "empty body")
    return b"".join(chunks)


def parse_predict_request(body: bytes) -> PredictRequest:
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


def _prediction(entry: LoadedModel, probs: torch.Tensor) -> dict[str, Any]:
    index = int(probs.argmax())
    return {"label": entry.classes[index], "class_index": index, "probabilities": probs.tolist()}


async def _off_loop_if_large(size: int, fn: Any, *args: Any) -> Any:
    """Small payloads (an MNIST PNG is ~300 bytes) decode faster than a thread hop."""
    if size > _THREAD_DECODE_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _one_line(errors: list[dict[str, Any]]) -> str:
    """Pydantic's error list as one line: where and what, for the first few."""
    parts = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
