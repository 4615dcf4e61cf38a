"""What every HTTP route shares, below the app (api.py) and the routes beside it (explain.py,
the OIP v2 routes): the accepted content types, the error table of the OpenAPI document,
request checks and the :predict body's parsing, all bounded before work (see api.py's
docstring for the budgets). Imports nothing of the app, so a route module can use it
without importing api.py (which imports the routes).
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from cnnray.serve.metrics import UNKNOWN_MODEL
from cnnray.serve.preprocess import Payload, RequestError, instance_payloads, json_depth
from cnnray.serve.schemas import ErrorBody, Limits, PredictRequest

JSON_TYPES = ("application/json",)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/bmp", "application/octet-stream")
# {"instances": [ [C [H [W values]]] ]} nests 5 deep ({"b64": ...} instances 3): deeper is malformed.
MAX_JSON_DEPTH = 5

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in [
        (400, "malformed request"), (404, "unknown model"), (408, "body not received in time"),
        (413, "body, JSON or pixels over the limit"), (415, "wrong content type"),
        (422, "the model gives no finite output for this input"),
    ]
}



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
        raise RequestError(400, one_line(e.errors())) from None


def max_json_values(input_shape: tuple[int, int, int], max_instances: int) -> int:
    """Upper bound on the JSON values of a valid :predict body: every instance a full
    C x H x W array (its numbers and nested lists), plus the outer object and list."""
    c, h, w = input_shape
    return max_instances * (c * h * w + c * h + c + 2) + 16


def predict_payloads(body: bytes, entry: Any, limits: Limits) -> list[Payload]:
    """A :predict body -> its instances, checked, for the batch (files are decoded there)."""
    req = parse_predict_request(body, max_json_values(entry.input_shape, limits.max_instances))
    n = len(req.instances)
    if n == 0:
        raise RequestError(400, "no instances: send at least one")
    if n > limits.max_instances:
        raise RequestError(400, f"too many instances: {n}, at most {limits.max_instances} per request")
    return instance_payloads(req.instances, entry.input_shape, limits.max_image_pixels, limits.max_request_pixels)


def raise_first_error(results: list[Any], where: str) -> None:
    """The first instance the backend refused (a file that does not decode), as the request's
    answer; `where` prefixes its message ("instance {i}: ")."""
    for i, r in enumerate(results):
        if isinstance(r, RequestError):
            raise RequestError(r.status, where.format(i=i) + r.message) from None


def require_type(request: Request, accepted: tuple[str, ...], say: str, missing_ok: bool = False) -> None:
    raw = request.headers.get("content-type")
    if raw is None and missing_ok:
        return
    kind = (raw or "").split(";")[0].strip().lower()
    if kind not in accepted:
        got = f"Content-Type {raw!r}" if raw else "no Content-Type"
        raise RequestError(415, f"{got}: send {say}")


def served(backend: Any, name: str) -> Any:
    entry = backend.model(name)
    if entry is None:
        if name in backend.failures():
            raise RequestError(404, f"model {name!r} is not ready: {backend.failures()[name][1]}")
        raise RequestError(404, unknown(backend, name))
    return entry


def unknown(backend: Any, name: str) -> str:
    served = ", ".join(sorted(m.name for m in backend.models())) or "none"
    return f"unknown model {name[:100]!r}; served models: {served}"


def label(backend: Any, name: str) -> str:
    return name if backend.model(name) is not None else UNKNOWN_MODEL


def predictions(entry: Any, rows: list[list[float]]) -> list[dict[str, Any]]:
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


def one_line(errors: list[dict[str, Any]]) -> str:
    """Pydantic's error list as one line: where and what, for the first few."""
    parts = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
