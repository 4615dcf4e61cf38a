"""Turn request payloads into model inputs exactly as training turned dataset files into batches.

Training decodes an image with cnnray's one decoder (cnnray/data/decode.py: the pixels a
viewer shows), keeps one channel ("L") for a grayscale dataset and three ("RGB")
otherwise, resizes it bilinearly to the dataset's size when it differs, stores uint8
C x H x W pixels, and normalises a batch with
`cnnray.data.normalize` ((x / 255 - mean) / std, as one addcmul). Serving does the same
steps with the same functions, so an image sent over HTTP gets the prediction that the
offline evaluation gives it.

Every problem with a payload raises `RequestError` with an HTTP status (4xx) and a
one-line message; nothing here raises anything else for bad input. The functions here are
CPU work: the HTTP layer runs them on its thread pool, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from cnnray.data import decode, normalize
from cnnray.data.decode import JPEG_MARKER, DecodeLimits


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status, `message` says why."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close  # answer with Connection: close (body left unread, or too slow)


# Decoding work that the pixel budget does not bound: Pillow walks a PNG's chunks (every
# one, IDAT or ancillary, before and after the image data) and decodes RLE-compressed BMPs
# in Python loops. Measured on the shared 2-core machine: an 8 MiB 28x28 PNG of 700,000
# empty chunks took 3-4 s to open and again to decode, an 8 MiB RLE8 BMP 4.6 s, each on the
# replica's one inference thread (every batch-mate waits). Encoders write a PNG's image
# data in 8-64 KiB IDAT chunks (libpng 8 KiB: ~1,000 for an 8 MiB file), so 10,000 chunks
# (~40 ms of Pillow's loop) refuse no real image; RLE BMPs are rare and compress well.
MAX_PNG_CHUNKS = 10_000
MAX_RLE_BMP_BYTES = 256 * 1024  # ~0.15 s of Pillow's Python RLE decoder
# JPEG: Pillow reads the markers before the first scan one by one in Python (and cnnray's
# scan counter walks every marker): an 8 MiB file of 2 M empty COM segments, or of 0xFF
# fill bytes, took 3.5-6 s to open and as long to decode. Real files carry tens of markers,
# plus ~1 per 265 bytes of binary EXIF/ICC payload (0xFF then a marker byte, by chance);
# entropy-coded data carries none (ITU-T T.81 B.1.1.5). Each file may hold
# `len // JPEG_BYTES_PER_FREE_MARKER` markers, and those beyond count as PNG chunks do.
JPEG_BYTES_PER_FREE_MARKER = 128
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_decode_cost(data: bytes, spent: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Refuse (RequestError 413) an image whose decoding costs more than its pixels say: a
    PNG of over `MAX_PNG_CHUNKS` chunks, a JPEG of over `MAX_PNG_CHUNKS` markers beyond its
    free ones (`JPEG_BYTES_PER_FREE_MARKER`), or an RLE-compressed BMP over `MAX_RLE_BMP_BYTES`.
    `spent`: (PNG chunks, RLE BMP bytes) of the request's images before this one, so the
    budgets bound a request's images together, not each (64 PNGs of 9,999 chunks cost
    as one of 640,000). Returns `spent` with this image's added. Reads the bytes only (at
    most MAX_PNG_CHUNKS chunk headers); anything malformed is left to the decoder (400)."""
    chunks, rle = spent
    if data.startswith(_PNG_SIGNATURE):
        pos, end = len(_PNG_SIGNATURE), len(data)
        while pos + 8 <= end:
            length, kind = struct.unpack_from(">I4s", data, pos)
            chunks += 1
            if chunks > MAX_PNG_CHUNKS:
                what = "PNG" if spent == (0, 0) else "PNGs of one request"
                raise RequestError(413, f"{what} of over {MAX_PNG_CHUNKS} chunks refused (decoding cost "
                                        "grows with every chunk): re-encode the image")
            if kind == b"IEND":
                break
            pos += 12 + length  # length, type, data, CRC
    elif data[:2] == b"\xff\xd8":  # JPEG SOI
        free = len(data) // JPEG_BYTES_PER_FREE_MARKER
        markers = 0
        for _ in JPEG_MARKER.finditer(data):  # C-speed search; stops at the budget
            markers += 1
            if markers > free and chunks + markers - free > MAX_PNG_CHUNKS:
                what = "JPEG" if spent == (0, 0) else "JPEGs of one request"
                raise RequestError(413, f"{what} of too many marker segments refused (decoding cost grows "
                                        "with every segment): re-encode the image")
        chunks += max(0, markers - free)
    elif data[:2] == b"BM" and len(data) >= 34 and struct.unpack_from("<I", data, 14)[0] >= 40:
        if struct.unpack_from("<I", data, 30)[0] in (1, 2):  # biCompression: BI_RLE8, BI_RLE4
            rle += len(data)
            if rle > MAX_RLE_BMP_BYTES:
                raise RequestError(413, f"RLE-compressed BMP bytes of one request over the limit of "
                                        f"{MAX_RLE_BMP_BYTES}: send PNG")
    return chunks, rle


def decode_image(data: bytes, input_shape: Sequence[int], max_pixels: int) -> torch.Tensor:
    """PNG, JPEG or BMP bytes -> uint8 C x H x W pixels, by training's own decoder
    (`cnnray.data.decode.decode_image`: as a viewer shows the image, in the model's mode and
    size). Raises RequestError: 413 for an image over the decode budget (pixels, frames,
    progressive scans, all checked from the header; PNG chunks and RLE BMP bytes,
    `check_decode_cost`), 400 for anything else."""
    channels, height, width = (int(s) for s in input_shape)
    limits = DecodeLimits(max_pixels=max_pixels)
    check_decode_cost(data)
    try:
        pixels = decode.decode_image(data, channels, (height, width), limits)
    except decode.DecodeError as e:
        raise RequestError(413 if e.too_costly else 400, e.message) from None
    return torch.from_numpy(pixels)


def b64_bytes(text: str, where: str) -> bytes:
    """The file a {"b64": ...} instance carries."""
    try:
        # Line breaks are allowed (`base64` tools wrap at 76 columns); other stray characters are not.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: b64 is not valid base64") from None


def image_pixels(data: bytes, max_pixels: int) -> int:
    """Width x height that an image file declares, read from its header alone (no decoding),
    with the decoder's own format and per-image cost checks (`cnnray.data.decode.open_image`).
    Raises RequestError: 413 over a per-image budget, 400 for anything else."""
    check_decode_cost(data)
    try:
        with decode.open_image(data, DecodeLimits(max_pixels=max_pixels)) as img:
            return int(img.width) * int(img.height)
    except decode.DecodeError as e:
        raise RequestError(413 if e.too_costly else 400, e.message) from None


def decode_b64(text: str, input_shape: Sequence[int], max_pixels: int, where: str) -> torch.Tensor:
    """A {"b64": ...} instance -> uint8 C x H x W pixels."""
    data = b64_bytes(text, where)
    try:
        return decode_image(data, input_shape, max_pixels)
    except RequestError as e:
        raise RequestError(e.status, f"{where}: {e.message}") from None


def array_instance(value: list[Any], input_shape: Sequence[int], where: str) -> torch.Tensor:
    """A nested list of pixel values in 0..255 of exactly the model's C x H x W shape -> float32."""
    shape = tuple(int(s) for s in input_shape)
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged nesting, on some numpy versions
        arr = None
    if arr is None or arr.dtype == object:
        raise RequestError(400, f"{where}: not a regular nesting of numbers; expected shape {list(shape)}")
    if arr.shape != shape:
        raise RequestError(400, f"{where}: array of shape {list(arr.shape)}; expected {list(shape)}")
    if arr.dtype.kind not in "iuf":  # booleans, strings, ...
        raise RequestError(400, f"{where}: array must hold numbers (pixel values 0..255)")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise RequestError(400, f"{where}: array holds NaN or infinity")
    if arr.min() < 0 or arr.max() > 255:
        raise RequestError(400, f"{where}: pixel values must lie in 0..255 (got {arr.min():g}..{arr.max():g})")
    return torch.from_numpy(arr.astype(np.float32))


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """An image file (PNG, JPEG or BMP bytes) still to be decoded, within `max_pixels`
    (width x height, checked from its header before decoding)."""

    data: bytes
    max_pixels: int


# What a request hands to the batch: a file to decode there, or validated float32
# C x H x W pixels in 0..255 (a JSON array instance).
Payload = Union[EncodedImage, torch.Tensor]


def instance_payloads(
    instances: list[Any], input_shape: Sequence[int], max_pixels: int, max_total_pixels: int | None = None
) -> list[Payload]:
    """Every instance of a :predict request, checked and ready for the batch: arrays as
    float32 pixels, {"b64": ...} files as `EncodedImage`s (decoded later, in the batch).

    The images' headers are read here: width x height summed over the request must stay
    within `max_total_pixels`, and their PNG chunks and RLE BMP bytes within
    `check_decode_cost`'s budgets (else 413), before any image is decoded, so a request's decoding
    cost is bounded whatever its images (64 PNGs of 4096 x 4096 in 4 MiB are refused at once)."""
    out: list[Payload] = []
    total = 0
    work = (0, 0)  # PNG chunks and RLE BMP bytes so far (check_decode_cost)
    for i, inst in enumerate(instances):
        where = f"instance {i}"
        if isinstance(inst, list):
            out.append(array_instance(inst, input_shape, where))
            continue
        data = b64_bytes(inst.b64, where)  # a B64Instance (pydantic has checked the alternatives)
        try:
            work = check_decode_cost(data, work)
            total += image_pixels(data, max_pixels)
        except RequestError as e:
            raise RequestError(e.status, f"{where}: {e.message}") from None
        if max_total_pixels is not None and total > max_total_pixels:
            raise RequestError(
                413, f"the images of instances 0..{i} hold {total} pixels, over the limit of "
                     f"{max_total_pixels} pixels per request: send fewer or smaller images"
            )
        out.append(EncodedImage(data, max_pixels))
    return out


def batch_inputs(
    payloads: Sequence[Payload], input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor | None, list[RequestError | None]]:
    """Payloads of several requests -> (N x C x H x W normalised float32 of those that
    decoded, in order; one RequestError or None per payload).

    Files are decoded by training's decoder (`decode_image`); the pixels are then normalised
    as one batch with training's call (`cnnray.data.normalize`): uint8 pixels exactly as
    training batches are, a batch holding JSON arrays in float32 by the same formula (uint8
    values convert to float32 exactly, so the numbers are the same). CPU work: the serving
    batch runs it on its inference thread, never on the event loop."""
    pixels: list[torch.Tensor] = []
    errors: list[RequestError | None] = []
    for p in payloads:
        if isinstance(p, EncodedImage):
            try:
                pixels.append(decode_image(p.data, input_shape, p.max_pixels))
            except RequestError as e:
                errors.append(e)
                continue
        else:
            pixels.append(p)
        errors.append(None)
    if not pixels:
        return None, errors
    if any(t.dtype != torch.uint8 for t in pixels):
        pixels = [t.float() for t in pixels]
    return normalize(torch.stack(pixels), mean, std), errors


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(text: bytes) -> int:
    """How deep JSON `text` nests ([ and {), counted without parsing (bytes.translate and a
    numpy cumulative sum: ~10 ms for 8 MiB). Brackets inside strings count too, which only
    over-counts for strings no :predict body carries (base64 has no brackets)."""
    brackets = text.translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    b = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((b == ord("[")) | (b == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def finite_json(obj: Any) -> Any:
    """Checkpoint metrics as JSON can carry them: NaN and infinity become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj

