"""OIP v2 over gRPC: `inference.GRPCInferenceService` on Ray Serve's gRPC ingress.

`cnnray serve --grpc-port 8001` gives Serve `gRPCOptions(port=8001, grpc_servicer_functions=
[SERVICER_FUNCTION])`; Serve's gRPC server (its proxy, or each replica's own server behind
HAProxy) calls the deployment's method named by the request path, `ModelInfer` for
`/inference.GRPCInferenceService/ModelInfer`, with the parsed request. `OipGrpcMethods`
holds those methods; the Serve deployment (app.py) inherits them and is the backend they
call, so gRPC requests join the same batches as the HTTP routes.

Refusals set a gRPC status (oip_core.GRPC_CODES: INVALID_ARGUMENT for a wrong input name,
datatype or shape, NOT_FOUND for an unknown model or version, ...) and a one-line message.
Message size is bounded by the gRPC server before parsing (`grpc_env`: the body limit).

    tritonclient.grpc.InferenceServerClient("localhost:8001").infer("mnist", [inp])
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from cnnray.serve import oip_core
from cnnray.serve.defaults import INLINE_PARSE_BYTES
from cnnray.serve.oip_core import (
    PIXELS,
    InferRequest,
    Tensor,
    deserialize_bytes,
    element_count,
    expected_input,
    fp32_from_bytes,
    only_input,
    requested_outputs,
    serialize_bytes,
)
from cnnray.serve.preprocess import RequestError

SERVICE = "inference.GRPCInferenceService"  # the wire name of KServe's and Triton's service
SERVICER_FUNCTION = "cnnray.serve.oip_grpc.add_GRPCInferenceServiceServicer_to_server"
API = "oip_grpc"  # the `api` label of cnnray_serve_requests_total
# A request message is the body's budget plus its framing (names, shape, parameters).
MESSAGE_OVERHEAD_BYTES = 64 * 1024


def _pb() -> Any:
    from cnnray.serve.proto import oip_v2_pb2

    return oip_v2_pb2


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (gRPC's naming)
    """Register SERVICE's unary methods of `servicer` on `server`, as protoc's generated
    `add_..._to_server` does (cnnray's messages live in package cnnray.oip: see oip_v2.proto)."""
    import grpc

    pb = _pb()
    methods = {
        "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )
        for name, (req, resp) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def grpc_options(port: int) -> dict[str, Any]:
    """Serve's gRPCOptions (as plain data) for SERVICE on `port`. Reflection is off: it
    would describe cnnray's package name, not the service's wire name."""
    return {"port": port, "grpc_servicer_functions": [SERVICER_FUNCTION], "enable_reflection": False}


def grpc_env(max_body_bytes: int) -> dict[str, str]:
    """Environment for Ray's processes (set before Ray starts): Serve's gRPC servers refuse
    a message over the body budget before parsing it (Ray's default is 2 GiB)."""
    return {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(max_body_bytes + MESSAGE_OVERHEAD_BYTES)}


def _refuse(context: Any, e: RequestError, empty: Any) -> Any:
    import grpc

    if context is not None:
        context.set_code(getattr(grpc.StatusCode, oip_core.GRPC_CODES.get(e.status, "INVALID_ARGUMENT")))
        context.set_details(e.message)
    return empty


def request_from_proto(msg: Any, entry: Any, limits: Any) -> InferRequest:
    """A ModelInferRequest -> InferRequest, checked as the REST body is: name, datatype and
    shape first, then the data's size against the shape. Raw contents (tritonclient's way)
    or typed contents (fp32_contents, bytes_contents: each element the file itself)."""
    tensor = only_input(msg.inputs)
    shape = list(tensor.shape)
    n = expected_input(entry, tensor.name, tensor.datatype, shape, limits)
    where = f"input {tensor.name!r}"
    if msg.raw_input_contents:
        if len(msg.raw_input_contents) != len(msg.inputs):
            raise RequestError(400, "raw_input_contents must hold one entry per input")
        raw = msg.raw_input_contents[0]
        data = fp32_from_bytes(raw, shape, where) if tensor.name == PIXELS else deserialize_bytes(raw, n, where)
    elif tensor.name == PIXELS:
        values = tensor.contents.fp32_contents
        if len(values) != element_count(shape):
            raise RequestError(400, f"{where}: {len(values)} fp32_contents for shape {shape} "
                                    f"({element_count(shape)} values)")
        data = np.asarray(values, dtype=np.float32).reshape(shape)
    else:
        items = list(tensor.contents.bytes_contents)
        if len(items) != n:
            raise RequestError(400, f"{where}: {len(items)} bytes_contents for shape {shape}")
        data = items
    outputs = None
    if msg.outputs:
        names = [o.name for o in msg.outputs]
        requested_outputs(names)
        outputs = [(name, True) for name in dict.fromkeys(names)]
    return InferRequest([Tensor(tensor.name, tensor.datatype, shape, data)], outputs, msg.id)


def response_to_proto(entry: Any, outputs: list[Tensor], request: InferRequest) -> Any:
    """Output tensors -> ModelInferResponse with raw_output_contents, as Triton answers."""
    pb = _pb()
    resp = pb.ModelInferResponse(model_name=entry.name, model_version=str(entry.version), id=request.id)
    for t in outputs:
        resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        blob = t.data.astype("<f4").tobytes() if t.datatype == "FP32" else serialize_bytes(t.data)
        resp.raw_output_contents.append(blob)
    return resp


class OipGrpcMethods:
    """SERVICE's methods, for a class that is a `Backend` (api.py): the Serve deployment."""

    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return _pb().ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return _pb().ServerReadyResponse(ready=oip_core.server_ready(self))

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        import cnnray

        return _pb().ServerMetadataResponse(name=oip_core.SERVER_NAME, version=cnnray.__version__,
                                            extensions=oip_core.EXTENSIONS)

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            oip_core.served_version(self, request.name, request.version)
        except RequestError:
            return _pb().ModelReadyResponse(ready=False)  # as REST's non-200: not ready, no error
        return _pb().ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        pb = _pb()
        try:
            meta = oip_core.model_metadata(oip_core.served_version(self, request.name, request.version))
        except RequestError as e:
            return _refuse(grpc_context, e, pb.ModelMetadataResponse())
        return pb.ModelMetadataResponse(**meta)

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        from cnnray.serve.http_parts import label as _label

        pb = _pb()
        with self.metrics.track(_label(self, request.model_name), API) as t:
            try:
                entry = oip_core.served_version(self, request.model_name, request.model_version)
                if request.ByteSize() <= INLINE_PARSE_BYTES:  # cheaper than a thread hop
                    req, items = _prepare(request, entry, self.limits)
                else:
                    req, items = await asyncio.to_thread(_prepare, request, entry, self.limits)
                results = await self.infer(entry, items)
                answer = response_to_proto(entry, oip_core.output_tensors(entry, results, req), req)
            except RequestError as e:
                t.status = e.status
                return _refuse(grpc_context, e, pb.ModelInferResponse())
            t.status = 200
            return answer


def _prepare(msg: Any, entry: Any, limits: Any) -> tuple[InferRequest, list[Any]]:
    req = request_from_proto(msg, entry, limits)
    return req, oip_core.payloads(entry, req.inputs[0], limits)
