"""OIP v2 REST bodies: JSON, and the binary tensor data extension, both ways.

With the extension (which `tritonclient.http` uses by default) a body is a JSON header of
`Inference-Header-Content-Length` bytes followed by the tensors' raw data, each input's
size in its `parameters.binary_data_size`: FP32 as little-endian float32, BYTES as a
4-byte little-endian length then the bytes, per element. Outputs come back the same way
when asked for (`"binary_data": true` on an output, or `"binary_data_output": true` for
all). Without it, JSON: FP32 as numbers (flat or nested), BYTES as strings; an image file
is no UTF-8 text, so in JSON a BYTES input element is the file in base64 (as the KServe v1
route's {"b64": ...}); labels come back as plain strings.

Cost is bounded before work, in this order: the body's size (body.py), the header length
(digits, within the body), the JSON's values and nesting (counted before parsing), the
input's name, datatype and shape against the model (before its data is read), then the
binary sizes against the shape. See https://github.com/kserve/open-inference-protocol
(binary_tensor_data extension) for the format.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from cnnray.serve.oip_core import (
    IMAGES,
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
from cnnray.serve.preprocess import RequestError, b64_bytes, json_depth
from cnnray.serve.schemas import Limits

HEADER_LENGTH = "inference-header-content-length"
# {"inputs": [{"data": [[[[ ... ]]]]}]}: 7 deep for an FP32 input nested N x C x H x W.
MAX_JSON_DEPTH = 8
Parameter = StrictBool | StrictInt | float | StrictStr


class _Open(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is refused, not ignored


class InputJSON(_Open):
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: dict[str, Parameter] = {}
    data: Any = None


class OutputJSON(_Open):
    name: StrictStr
    parameters: dict[str, Parameter] = {}


class RequestJSON(_Open):
    id: StrictStr | None = None
    parameters: dict[str, Parameter] = {}
    inputs: list[InputJSON]
    outputs: list[OutputJSON] | None = None


def header_length(raw: str | None, body_size: int) -> int | None:
    """The JSON header's length from `Inference-Header-Content-Length`: ASCII digits, at
    most the body's size. RequestError 400 otherwise."""
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise RequestError(400, f"bad Inference-Header-Content-Length {raw[:40]!r}: give the JSON header's size in bytes")
    size = int(text)
    if not 0 < size <= body_size:
        raise RequestError(400, f"Inference-Header-Content-Length {size} does not fit the body of {body_size} bytes")
    return size


def max_json_values(entry: Any, limits: Limits) -> int:
    """JSON values a valid request can need: every instance's pixels as numbers (and the
    lists nesting them), plus the request's own few dozen fields."""
    c, h, w = entry.input_shape
    return limits.max_instances * (c * h * w + c * h + c + 1) + 256


def parse_request(body: bytes, raw_header_length: str | None, entry: Any, limits: Limits) -> InferRequest:
    """A REST infer body -> InferRequest whose input is checked against `entry` and holds
    its data (a float32 array for pixels, a list of file bytes for images). RequestError
    400/413 for anything malformed or over budget. CPU work: off the event loop when large."""
    size = header_length(raw_header_length, len(body))
    head = body if size is None else body[:size]
    binary = memoryview(body)[len(head):]
    values = head.count(b",") + head.count(b"[") + head.count(b"{")  # >= JSON values - 1
    if values > max_json_values(entry, limits):
        raise RequestError(413, f"JSON holds over {max_json_values(entry, limits)} values, more than this model's "
                                "largest request can need")
    depth = json_depth(head)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, f"JSON nested {depth} deep; an infer request nests at most {MAX_JSON_DEPTH} deep")
    try:
        obj = json.loads(head)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"infer request is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise RequestError(400, 'infer request must be a JSON object {"inputs": [...]}')
    try:
        req = RequestJSON.model_validate(obj)
    except ValidationError as e:
        from cnnray.serve.http_parts import one_line as _one_line

        raise RequestError(400, _one_line(e.errors())) from None
    tensor = only_input(req.inputs)
    n = expected_input(entry, tensor.name, tensor.datatype, tensor.shape, limits)
    data = _input_data(tensor, n, binary)
    outputs = None
    if req.outputs is not None:
        names = [o.name for o in req.outputs]
        requested_outputs(names)
        if len(set(names)) != len(names):
            raise RequestError(400, "an output is named twice in outputs")
        outputs = [(o.name, _flag(o.parameters, "binary_data", f"output {o.name!r}")) for o in req.outputs]
    default = _flag(req.parameters, "binary_data_output", "request") or False
    return InferRequest([Tensor(tensor.name, tensor.datatype, tensor.shape, data)], outputs, req.id or "", default)


def _flag(params: dict[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(400, f"{where}: parameter {key!r} must be true or false")
    return value


def _input_data(tensor: InputJSON, n: int, binary: memoryview) -> Any:
    where = f"input {tensor.name!r}"
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError(400, f"{where}: binary_data_size must be a whole number of bytes")
        if tensor.data is not None:
            raise RequestError(400, f"{where}: both data and binary_data_size given: send one")
        if size != len(binary):
            raise RequestError(400, f"{where}: binary_data_size {size}, but {len(binary)} bytes follow the JSON header")
        if tensor.name == PIXELS:
            return fp32_from_bytes(binary, tensor.shape, where)
        return deserialize_bytes(binary, n, where)
    if len(binary):
        raise RequestError(400, f"{len(binary)} bytes follow the JSON header, but no input declares binary_data_size")
    if tensor.data is None:
        raise RequestError(400, f"{where}: no data (give data, or binary_data_size with the binary extension)")
    if tensor.name == IMAGES:
        items = tensor.data
        if not isinstance(items, list) or len(items) != n or not all(isinstance(s, str) for s in items):
            raise RequestError(400, f"{where}: data must be a list of {n} strings (each image file in base64)")
        return [b64_bytes(s, f"{where} element {i}") for i, s in enumerate(items)]
    try:
        arr = np.asarray(tensor.data)
    except ValueError:
        arr = None
    if arr is None or arr.dtype == object or arr.dtype.kind not in "iuf":
        raise RequestError(400, f"{where}: data must be numbers, flat or nested as the shape")
    if arr.size != element_count(tensor.shape):
        raise RequestError(400, f"{where}: {arr.size} values for shape {tensor.shape} "
                                f"({element_count(tensor.shape)} values)")
    return arr.reshape(tensor.shape)


def encode_response(entry: Any, outputs: list[Tensor], request: InferRequest) -> tuple[bytes, int | None]:
    """Output tensors -> (body, JSON header length or None when no output is binary)."""
    described, blobs = [], []
    for t in outputs:
        item: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.binary:
            blob = t.data.astype("<f4").tobytes() if t.datatype == "FP32" else serialize_bytes(t.data)
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = t.data.reshape(-1).tolist() if t.datatype == "FP32" else [b.decode() for b in t.data]
        described.append(item)
    answer: dict[str, Any] = {"model_name": entry.name, "model_version": str(entry.version), "outputs": described}
    if request.id:
        answer["id"] = request.id
    head = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
