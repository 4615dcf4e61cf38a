"""The Open Inference Protocol v2 (KServe v2, Triton) for cnnray models, whatever the transport.

REST (oip.py, oip_binary.py) and gRPC (oip_grpc.py) turn their requests into `Tensor`s and
call `infer`, which checks them against the model, hands them to `Backend.infer` (the
replica's batch, with the other routes' requests: one inference path) and returns the
output tensors. Every refusal is a `RequestError` with an HTTP status; gRPC maps it to a
status code (`GRPC_CODES`).

A model's tensors (`model_metadata`), with N the batch dimension (-1 in the metadata):

    inputs   pixels         FP32   [N, C, H, W]  pixel values 0..255, as the KServe v1 route's arrays
             images         BYTES  [N]           one PNG, JPEG or BMP file per element, decoded by
                                                 cnnray.data.decode (the one decoder) in the batch
    outputs  probabilities  FP32   [N, classes]  softmax of the checkpoint's (TTA) logits
             labels         BYTES  [N]           the class name of each row's first largest probability

A request carries exactly one input (either). A model's version is the served model-store
version: `/versions/{v}` with any other v is 404.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnray.serve.preprocess import EncodedImage, Payload, RequestError, array_instance, check_decode_cost, image_pixels
from cnnray.serve.schemas import Limits

PIXELS, IMAGES = "pixels", "images"
PROBABILITIES, LABELS = "probabilities", "labels"
OUTPUTS = (PROBABILITIES, LABELS)
PLATFORM = "pytorch"
SERVER_NAME = "cnnray"
EXTENSIONS = ["binary_tensor_data"]  # REST: Inference-Header-Content-Length (oip_binary.py)
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$", re.ASCII)  # a model-store version (cnnray.store)

# RequestError's HTTP status -> gRPC status code name (grpc.StatusCode), as KServe maps them.
GRPC_CODES = {
    400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT", 422: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
    503: "UNAVAILABLE",
}


@dataclass
class Tensor:
    """One input or output tensor: `data` is a float32 array of `shape` (FP32) or a list
    of byte strings, one per element (BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    binary: bool = False  # outputs: send as binary data (REST's binary extension)


@dataclass
class InferRequest:
    """A parsed ModelInfer request: one input, the outputs asked for (None: all), and
    whether outputs default to binary data (REST's `binary_data_output` parameter)."""

    inputs: list[Tensor]
    outputs: list[tuple[str, bool | None]] | None = None  # (name, binary_data or None: the default)
    id: str = ""
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


# --- models and versions ----------------------------------------------------------------------
def served_version(backend: Any, name: str, version: str | None):
    """The served LoadedModel of `name`, if `version` (a model-store version, as text) is
    the one being served or not given. RequestError 404 otherwise, naming what is served."""
    from cnnray.serve.http_parts import served as _served

    entry = _served(backend, name)
    if version is None or version == "":
        return entry
    if not _VERSION.match(version):
        raise RequestError(404, f"model {name!r} has no version {version[:40]!r}: versions are model-store "
                                f"numbers; serving version {entry.version}")
    if int(version) != entry.version:
        raise RequestError(404, f"model {name!r} version {version} is not served; serving version {entry.version}")
    return entry


def server_ready(backend: Any) -> bool:
    """Every model the server was asked to serve has a version loaded."""
    loaded = {m.name for m in backend.models()}
    return bool(loaded) and all(n in loaded for n in backend.failures())


def model_metadata(entry: Any) -> dict[str, Any]:
    """OIP model metadata of a LoadedModel (plain data; REST sends it as JSON)."""
    c, h, w = entry.input_shape
    return {
        "name": entry.name,
        "versions": [str(entry.version)],
        "platform": PLATFORM,
        "inputs": [
            {"name": PIXELS, "datatype": "FP32", "shape": [-1, c, h, w]},
            {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(entry.classes)]},
            {"name": LABELS, "datatype": "BYTES", "shape": [-1]},
        ],
    }


# --- checking a request before any work ----------------------------------------------------
def expected_input(entry: Any, tensor_name: str, datatype: str, shape: Sequence[int], limits: Limits) -> int:
    """Check an input's name, datatype and shape against the model, before its data is
    read: the batch dimension within `limits.max_instances`, the others the model's.
    Returns N. Raises RequestError 400 with what the model takes."""
    c, h, w = entry.input_shape
    takes = f"this model takes {PIXELS!r} (FP32 [N, {c}, {h}, {w}]) or {IMAGES!r} (BYTES [N])"
    if tensor_name not in (PIXELS, IMAGES):
        raise RequestError(400, f"unknown input {str(tensor_name)[:60]!r}: {takes}")
    want_type = "FP32" if tensor_name == PIXELS else "BYTES"
    if datatype != want_type:
        raise RequestError(400, f"input {tensor_name!r} has datatype {str(datatype)[:20]!r}; expected {want_type} "
                                f"({takes})")
    shape = list(shape)
    want = [c, h, w] if tensor_name == PIXELS else []
    if len(shape) != 1 + len(want) or shape[1:] != want or not all(isinstance(d, int) for d in shape):
        shown = shape[:8] + (["..."] if len(shape) > 8 else [])
        raise RequestError(400, f"input {tensor_name!r} has shape {shown}; expected [N{''.join(f', {d}' for d in want)}]")
    n = shape[0]
    if n < 1:
        raise RequestError(400, f"input {tensor_name!r} holds no instances (N = {n}): send at least one")
    if n > limits.max_instances:
        raise RequestError(400, f"input {tensor_name!r}: N = {n} instances, at most {limits.max_instances} per request")
    return n


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def requested_outputs(names: Sequence[str]) -> None:
    for name in names:
        if name not in OUTPUTS:
            raise RequestError(400, f"unknown output {str(name)[:60]!r}: this model gives {PROBABILITIES!r} "
                                    f"(FP32 [N, classes]) and {LABELS!r} (BYTES [N])")


def only_input(inputs: Sequence[Any]) -> Any:
    if len(inputs) != 1:
        raise RequestError(400, f"{len(inputs)} inputs: send exactly one, {PIXELS!r} (FP32) or {IMAGES!r} (BYTES)")
    return inputs[0]


# --- tensors -> payloads -> outputs ---------------------------------------------------------
def payloads(entry: Any, tensor: Tensor, limits: Limits) -> list[Payload]:
    """The checked input -> one payload per instance for the batch: `pixels` rows as float32
    C x H x W (preprocess.array_instance: numbers, finite, 0..255), `images` as EncodedImages
    whose headers were read and whose pixels and decoding cost, summed over the request,
    are within `limits` (as the KServe v1 route's b64 instances)."""
    if tensor.name == PIXELS:
        arr = tensor.data
        return [array_instance(arr[i], entry.input_shape, f"input {PIXELS!r} instance {i}") for i in range(len(arr))]
    out: list[Payload] = []
    total, work = 0, (0, 0)
    for i, data in enumerate(tensor.data):
        where = f"input {IMAGES!r} element {i}"
        if not data:
            raise RequestError(400, f"{where}: empty")
        try:
            work = check_decode_cost(data, work)
            total += image_pixels(data, limits.max_image_pixels)
        except RequestError as e:
            raise RequestError(e.status, f"{where}: {e.message}") from None
        if total > limits.max_request_pixels:
            raise RequestError(413, f"the images of elements 0..{i} hold {total} pixels, over the limit of "
                                    f"{limits.max_request_pixels} pixels per request: send fewer or smaller images")
        out.append(EncodedImage(data, limits.max_image_pixels))
    return out


def output_tensors(entry: Any, results: list[Any], request: InferRequest) -> list[Tensor]:
    """Class probabilities (one row per instance) -> the requested output tensors, in the
    order asked (all, in metadata order, when none were named). Non-finite output: 422."""
    from cnnray.serve.http_parts import predictions as _predictions, raise_first_error as _raise_first_error

    _raise_first_error(results, "instance {i}: ")
    predictions = _predictions(entry, results)  # the same argmax and finiteness rule as the other routes
    n = len(predictions)
    wanted = request.outputs if request.outputs is not None else [(name, None) for name in OUTPUTS]
    out = []
    for name, binary in wanted:
        binary = request.binary_default if binary is None else binary
        if name == PROBABILITIES:
            probs = np.asarray([p["probabilities"] for p in predictions], dtype=np.float32).reshape(n, len(entry.classes))
            out.append(Tensor(name, "FP32", [n, len(entry.classes)], probs, binary))
        else:
            out.append(Tensor(name, "BYTES", [n], [p["label"].encode() for p in predictions], binary))
    return out


async def infer(backend: Any, entry: Any, request: InferRequest, limits: Limits) -> list[Tensor]:
    """Run a parsed request through the backend's batch (the shared inference path)."""
    tensor = only_input(request.inputs)
    results = await backend.infer(entry, payloads(entry, tensor, limits))
    return output_tensors(entry, results, request)


# --- BYTES on the wire: 4-byte little-endian length, then the bytes, per element -----------
def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements as the binary extension and gRPC's raw contents carry them."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def deserialize_bytes(buf: bytes | memoryview, count: int, where: str) -> list[bytes]:
    """Exactly `count` length-prefixed elements filling `buf`; RequestError 400 otherwise
    (a length past the end, too few or too many elements). Reads lengths, copies nothing
    more than the elements themselves."""
    view = memoryview(buf)
    out, pos, end = [], 0, len(view)
    for i in range(count):
        if pos + 4 > end:
            raise RequestError(400, f"{where}: binary data ends after {i} of {count} elements")
        size = int.from_bytes(view[pos:pos + 4], "little")
        pos += 4
        if size > end - pos:
            raise RequestError(400, f"{where}: element {i} declares {size} bytes, past the end of the data")
        out.append(bytes(view[pos:pos + size]))
        pos += size
    if pos != end:
        raise RequestError(400, f"{where}: {end - pos} bytes left after {count} elements")
    return out


def fp32_from_bytes(buf: bytes | memoryview, shape: Sequence[int], where: str) -> np.ndarray:
    """Little-endian float32 data of exactly `shape` (checked before any copy)."""
    want = element_count(shape) * 4
    if len(buf) != want:
        raise RequestError(400, f"{where}: {len(buf)} bytes of data; shape {list(shape)} of FP32 needs {want}")
    return np.frombuffer(buf, dtype="<f4").reshape(shape)
