"""The HTTP API, as a FastAPI app built around a backend (the Serve replica, or a plain process).

    GET  /                              a page to draw or upload a digit and see the top 3 classes
    GET  /healthz                       liveness: {"status": "ok", "models": [...], "replica": ...}
    GET  /metrics                       Prometheus text (see metrics.py)
    GET  /v1/models                     every served model: version, input shape, classes, metrics
    GET  /v1/models/{name}              {"name", "version", "ready"}: 200 when ready, else 503
    POST /v1/models/{name}:predict      KServe v1: {"instances": [{"b64": ...} | C x H x W array]}
    POST /predictions/{name}            TorchServe: the raw bytes of one image file (PUT works too),
                                        or a multipart form (field "data", else the first file: multipart.py)
    GET|POST /v2/...                    OIP v2 (KServe v2, Triton): health, metadata, infer (oip.py)
    POST /v1/models/{name}:explain      KServe v1: heat maps and response maps of one image (explain.py)

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
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnnray.serve.body import BodyBudget, discard_body
from cnnray.serve.defaults import DECODE_THREADS, INLINE_PARSE_BYTES
from cnnray.serve.engine import LoadedModel
from cnnray.serve.http_parts import (  # shared with the routes beside this app
    ERRORS as _ERRORS,
    IMAGE_TYPES,
    JSON_TYPES,
    label as _label,
    one_line as _one_line,
    predict_payloads as _predict_payloads,
    predictions as _predictions,
    raise_first_error as _raise_first_error,
    require_type as _require_type,
    served as _served,
    unknown as _unknown,
)
from cnnray.serve.lean import LeanApp
from cnnray.serve.metrics import ServeMetrics
from cnnray.serve.multipart import form_file, is_multipart
from cnnray.serve.preprocess import (
    EncodedImage,
    Payload,
    RequestError,
)
from cnnray.serve.schemas import (
    Health,
    Limits,
    ModelList,
    ModelStatus,
    PredictRequest,
    PredictResponse,
    TorchServeResponse,
)

log = logging.getLogger("cnnray.serve")


class Backend(Protocol):
    limits: Limits
    metrics: ServeMetrics
    explainer: Any  # explain.ExplainService (in-process) or explain_deployment.RemoteExplain; None: off

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
            _require_type(request, IMAGE_TYPES + ("multipart/form-data",),
                          "image/png, image/jpeg or image/bmp (or image/webp, image/tiff, image/gif, "
                          "or a multipart form)", missing_ok=True)
            limits = backend.limits
            async with buffered.hold(request, limits) as body:
                kind = request.headers.get("content-type")
                if is_multipart(kind):  # curl -F "data=@digit.png"; parsing 8 MiB takes ~0.2 s: off the loop
                    body = form_file(body, kind) if len(body) <= INLINE_PARSE_BYTES else await off_loop(form_file, body, kind)
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

    from cnnray.serve.explain import explain_router  # POST /v1/models/{name}:explain, off the batched path

    app.include_router(explain_router(backend, buffered, off_loop))

    from cnnray.serve.oip import add_oip_routes

    add_oip_routes(app, backend, buffered, off_loop)  # OIP v2 (KServe v2, Triton) REST

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


