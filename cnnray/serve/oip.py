"""OIP v2 (KServe v2 / Triton) REST routes, on the same app and port as the other routes.

    GET  /v2/health/live                                 200 {"live": true}
    GET  /v2/health/ready                                200 {"ready": true} when every model is loaded, else 503
    GET  /v2                                             server metadata: name, version, extensions
    GET  /v2/models/{name}[/versions/{v}]                model metadata (oip_core.model_metadata)
    GET  /v2/models/{name}[/versions/{v}]/ready          200 {"name", "ready": true}
    POST /v2/models/{name}[/versions/{v}]/infer          JSON, or the binary tensor data extension

An infer request goes through `Backend.infer` like the KServe v1 and TorchServe routes:
the same batch, metrics (api="oip"), version watcher and TTA. Refusals are the app's
`{"error": "..."}` with a 4xx status, as everywhere else.

    curl -s localhost:8000/v2/models/mnist
    tritonclient.http.InferenceServerClient("localhost:8000").infer("mnist", [inp])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import cnnray
from cnnray.serve import oip_core
from cnnray.serve.body import BodyBudget
from cnnray.serve.defaults import INLINE_PARSE_BYTES
from cnnray.serve.oip_binary import HEADER_LENGTH, encode_response, parse_request
from cnnray.serve.preprocess import RequestError
from cnnray.serve.schemas import Limits

API = "oip"  # the `api` label of cnnray_serve_requests_total


def add_oip_routes(app: FastAPI, backend: Any, buffered: BodyBudget,
                   off_loop: Callable[..., Awaitable[Any]]) -> None:
    """Register the OIP v2 routes on `app` (api.build_http_app's), reading bodies within
    `buffered` and parsing large ones with `off_loop` as the other routes do."""
    from cnnray.serve.http_parts import ERRORS as _ERRORS, label as _label

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready", responses={503: _ERRORS[404]})
    async def ready() -> Any:
        if oip_core.server_ready(backend):
            return {"ready": True}
        failed = "; ".join(f"{n}: {why}" for n, (_, why) in sorted(backend.failures().items()))
        return JSONResponse({"error": f"not every model is loaded ({failed or 'no models'})"}, status_code=503)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": oip_core.SERVER_NAME, "version": cnnray.__version__, "extensions": oip_core.EXTENSIONS}

    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return oip_core.model_metadata(oip_core.served_version(backend, name, version))

    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        entry = oip_core.served_version(backend, name, version)
        return {"name": name, "version": str(entry.version), "ready": True}

    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        with backend.metrics.track(_label(backend, name), API) as t:
            entry = oip_core.served_version(backend, name, version)
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RequestError(415, f"Content-Encoding {encoding[:30]!r}: send the body uncompressed")
            limits: Limits = backend.limits
            head = request.headers.get(HEADER_LENGTH)
            async with buffered.hold(request, limits) as body:
                if len(body) <= INLINE_PARSE_BYTES:  # cheaper than a thread hop
                    req, items = _prepare(body, head, entry, limits)
                else:
                    req, items = await off_loop(_prepare, body, head, entry, limits)
                results = await backend.infer(entry, items)
            outputs = oip_core.output_tensors(entry, results, req)
            answer, json_size = encode_response(entry, outputs, req)
            if json_size is None:
                response = Response(answer, media_type="application/json")
            else:
                response = Response(answer, media_type="application/octet-stream",
                                    headers={"Inference-Header-Content-Length": str(json_size)})
            t.status = response.status_code
            return response

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, metadata, methods=["GET"], responses={404: _ERRORS[404]})
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"], responses={404: _ERRORS[404]})
        app.add_api_route(prefix + "/infer", infer, methods=["POST"], responses=_ERRORS,
                          openapi_extra={"requestBody": {"required": True, "content": {
                              "application/json": {"schema": {"type": "object"}},
                              "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})


def _prepare(body: bytes, head: str | None, entry: Any, limits: Limits) -> tuple[oip_core.InferRequest, list[Any]]:
    """Parse and check a body, and turn its input into the batch's payloads (CPU work)."""
    req = parse_request(body, head, entry, limits)
    return req, oip_core.payloads(entry, req.inputs[0], limits)
