"""The image file of a multipart/form-data upload (`curl -F "data=@digit.png"`), the form
TorchServe documents for POST /predictions/{name}: the part named `data`, else the first
part that is a file (has a filename).

The body has been read within the route's budgets (body.py: size, time, bytes held) before
this runs; parsing is python-multipart's state machine over those bytes (linear in their
size, no copies beyond the parts kept), with at most `MAX_PARTS` parts and
`MAX_PART_HEADER_BYTES` of headers each, so a form of a million empty fields costs no
more than the body's size allows. Problems raise RequestError 400.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from cnnray.serve.preprocess import RequestError

FIELD = "data"  # TorchServe's field name
MAX_PARTS = 16  # a form of one image and a few text fields; more is no upload this server expects
MAX_PART_HEADER_BYTES = 8 * 1024  # Content-Disposition and Content-Type of one part


def is_multipart(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "multipart/form-data"


def form_file(body: bytes, content_type: str) -> bytes:
    """The uploaded file's bytes: part `data`, else the first part with a filename.
    RequestError 400 when there is no boundary, the body is no valid form, it has over
    MAX_PARTS parts, or no file part."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart/form-data without a boundary parameter")
    parts: list[dict] = []
    current: dict = {}
    field_name = [b""]
    header_bytes = [0]

    def on_part_begin() -> None:
        nonlocal current
        if len(parts) >= MAX_PARTS:
            raise RequestError(400, f"form of over {MAX_PARTS} parts: send the image as field {FIELD!r}")
        current = {"headers": {}, "data": []}
        header_bytes[0] = 0
        parts.append(current)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field_name[0] += data[start:end]
        _count(end - start)

    def on_header_value(data: bytes, start: int, end: int) -> None:
        key = field_name[0].lower()
        current["headers"][key] = current["headers"].get(key, b"") + data[start:end]
        _count(end - start)

    def on_header_end() -> None:
        field_name[0] = b""

    def _count(n: int) -> None:
        header_bytes[0] += n
        if header_bytes[0] > MAX_PART_HEADER_BYTES:
            raise RequestError(400, f"a form part's headers are over {MAX_PART_HEADER_BYTES} bytes")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"].append(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise RequestError(400, f"malformed multipart/form-data body: {str(e).splitlines()[0][:120]}") from None
    named, files = [], []
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") == FIELD.encode():
            named.append(part)
        elif b"filename" in disposition:
            files.append(part)
    files = named + files
    if not files:
        raise RequestError(400, f"multipart/form-data without a file: send the image as field {FIELD!r} "
                                f"(curl -F \"{FIELD}=@digit.png\")")
    data = b"".join(files[0]["data"])
    if not data:
        raise RequestError(400, "the uploaded file is empty")
    return data
