"""The gRPC methods (inference.GRPCInferenceService) on a LocalBackend, called as Ray Serve
calls the deployment's: a parsed request message and a context to set the status on. The
wire (Serve's gRPC ingress, tritonclient.grpc) is checked against a real server in
test_protocols_slow.py; here the conversions and refusals, without Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.serve.conftest import VERSION


class Context:
    """The part of Serve's RayServegRPCContext the methods use."""

    def __init__(self) -> None:
        self.code, self.details = None, ""

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


@pytest.fixture(scope="module")
def server(local):
    from cnnray.serve.engine import LocalBackend
    from cnnray.serve.oip_grpc import OipGrpcMethods

    class GrpcBackend(LocalBackend, OipGrpcMethods):
        pass

    backend = GrpcBackend.__new__(GrpcBackend)
    backend.__dict__.update(local.backend.__dict__)  # the loaded model and limits of `local`
    return backend


def call(server, method: str, **fields):
    from cnnray.serve.proto import oip_v2_pb2 as pb

    request = getattr(pb, f"{method}Request")(**fields)
    context = Context()
    answer = asyncio.run(getattr(server, method)(request, grpc_context=context))
    return answer, context


def test_the_service_registers_under_its_wire_name():
    from cnnray.serve.oip_grpc import SERVICE, add_GRPCInferenceServiceServicer_to_server

    class Server:
        def add_generic_rpc_handlers(self, handlers):
            self.handlers = handlers

    s = Server()
    add_GRPCInferenceServiceServicer_to_server(object.__new__(type("S", (), {
        n: (lambda self, r, c: None) for n in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                 "ModelMetadata", "ModelInfer")})), s)
    assert SERVICE == "inference.GRPCInferenceService"
    assert sorted(s.handlers[0]._method_handlers) == sorted(
        f"/{SERVICE}/{m}" for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                                    "ModelInfer"))


def test_messages_are_wire_compatible_with_tritonclient():
    """Every field of cnnray's messages has tritonclient's number and type (Triton's
    grpc_service.proto extends KServe's, whose fields cnnray declares)."""
    import tritonclient.grpc.service_pb2 as triton

    from cnnray.serve.proto import oip_v2_pb2 as ours

    def same(a, b, where):
        for f in a.fields:
            g = b.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (g.number, g.type, g.is_repeated), where + f.name
        for nested in a.nested_types:
            same(nested, b.nested_types_by_name[nested.name], f"{where}{nested.name}.")

    for name, message in ours.DESCRIPTOR.message_types_by_name.items():
        same(message, triton.DESCRIPTOR.message_types_by_name[name], f"{name}.")


def test_health_and_metadata(server):
    assert call(server, "ServerLive")[0].live and call(server, "ServerReady")[0].ready
    meta, _ = call(server, "ModelMetadata", name="digits")
    assert list(meta.versions) == [str(VERSION)]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("pixels", "FP32", [-1, 1, 28, 28]),
                                                                           ("images", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("probabilities", "FP32", [-1, 10]),
                                                                            ("labels", "BYTES", [-1])]
    assert call(server, "ModelReady", name="digits", version=str(VERSION))[0].ready
    assert not call(server, "ModelReady", name="digits", version="1")[0].ready
    _, ctx = call(server, "ModelMetadata", name="digits", version="1")
    assert ctx.code.name == "NOT_FOUND" and f"serving version {VERSION}" in ctx.details


def _infer(server, name="pixels", datatype="FP32", shape=(4, 1, 28, 28), raw=None, contents=None, version=""):
    from cnnray.serve.proto import oip_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name="digits", model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape), contents=contents)
    if raw is not None:
        request.raw_input_contents.append(raw)
    context = Context()
    return asyncio.run(server.ModelInfer(request, grpc_context=context)), context


def _outputs(answer) -> tuple[np.ndarray, list[bytes]]:
    from cnnray.serve.oip_core import deserialize_bytes

    assert [o.name for o in answer.outputs] == ["probabilities", "labels"]
    probs = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(list(answer.outputs[0].shape))
    return probs, deserialize_bytes(answer.raw_output_contents[1], answer.outputs[1].shape[0], "labels")


def test_fp32_raw_and_typed_contents_and_bytes_answer_alike(server, local):
    from cnnray.serve.oip_core import serialize_bytes
    from cnnray.serve.proto import oip_v2_pb2 as pb

    raw, ctx = _infer(server, raw=local.pixels.astype("<f4").tobytes())
    assert ctx.code is None
    typed, _ = _infer(server, contents=pb.InferTensorContents(fp32_contents=local.pixels.ravel().tolist()))
    files, _ = _infer(server, "images", "BYTES", (4,), raw=serialize_bytes(local.pngs))
    files_typed, _ = _infer(server, "images", "BYTES", (4,), contents=pb.InferTensorContents(bytes_contents=local.pngs))
    want = [local.client.post("/predictions/digits", content=p, headers={"Content-Type": "image/png"}).json()
            for p in local.pngs]
    for answer in (raw, typed, files, files_typed):
        probs, labels = _outputs(answer)
        np.testing.assert_allclose(probs, [w["probabilities"] for w in want], rtol=1e-5, atol=1e-7)
        assert [b.decode() for b in labels] == [w["label"] for w in want]
        assert answer.model_version == str(VERSION)


@pytest.mark.parametrize("kw,code,says", [
    ({"name": "pixelz"}, "INVALID_ARGUMENT", "unknown input 'pixelz'"),
    ({"datatype": "FP64"}, "INVALID_ARGUMENT", "expected FP32"),
    ({"shape": (4, 3, 28, 28)}, "INVALID_ARGUMENT", "expected [N, 1, 28, 28]"),
    ({"shape": (10**12, 1, 28, 28)}, "INVALID_ARGUMENT", "at most 8 per request"),
    ({"raw": b"\0" * 12}, "INVALID_ARGUMENT", "needs 12544"),
    ({"name": "images", "datatype": "BYTES", "shape": (1,), "raw": b"\xff\xff\xff\x00abc"}, "INVALID_ARGUMENT",
     "past the end"),
    ({"name": "images", "datatype": "BYTES", "shape": (1,), "raw": b"\4\0\0\0abcd"}, "INVALID_ARGUMENT", "element 0"),
    ({"version": "7", "raw": b""}, "NOT_FOUND", "version 7 is not served"),
])
def test_refusals_set_a_grpc_status_and_message(server, kw, code, says):
    kw.setdefault("raw", np.zeros((4, 1, 28, 28), "<f4").tobytes())
    answer, ctx = _infer(server, **kw)
    assert ctx.code is not None and ctx.code.name == code
    assert says in ctx.details, ctx.details
    assert not answer.outputs
