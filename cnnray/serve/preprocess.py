"""Turn request payloads into model inputs exactly as training turned dataset files into batches.

Training decodes an image with cnnray's one decoder (cnnray/data/decode.py: the pixels a
viewer shows), keeps one channel ("L") for a grayscale dataset and three ("RGB")
otherwise, resizes it bilinearly to the dataset's size when it differs, stores uint8
C x H x W pixels, and normalises a batch with
`cnnray.data.normalize` ((x / 255 - mean) / std, as one addcmul). Serving does the same
steps with the same functions, so an image sent over HTTP gets the prediction that the
offline evaluation gives it.

Every problem with a payload raises `RequestError` with an HTTP status (4xx) and a
one-line message; nothing here raises anything else for bad input.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cnnray.data import decode, normalize
from cnnray.data.decode import DecodeLimits


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status, `message` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, input_shape: Sequence[int], max_pixels: int) -> torch.Tensor:
    """PNG, JPEG or BMP bytes -> uint8 C x H x W pixels, by training's own decoder
    (`cnnray.data.decode.decode_image`: as a viewer shows the image, in the model's mode and
    size). Raises RequestError: 413 for an image over the decode budget (pixels, frames,
    progressive scans, all checked from the header), 400 for anything else."""
    channels, height, width = (int(s) for s in input_shape)
    limits = DecodeLimits(max_pixels=max_pixels)
    try:
        pixels = decode.decode_image(data, channels, (height, width), limits)
    except decode.DecodeError as e:
        raise RequestError(413 if e.too_costly else 400, e.message) from None
    return torch.from_numpy(pixels)


def decode_b64(text: str, input_shape: Sequence[int], max_pixels: int, where: str) -> torch.Tensor:
    """A {"b64": ...} instance -> uint8 C x H x W pixels."""
    try:
        # Line breaks are allowed (`base64` tools wrap at 76 columns); other stray characters are not.
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: b64 is not valid base64") from None
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


def to_model_input(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """C x H x W pixels (uint8, or float in 0..255) -> 1 x C x H x W normalised float32.

    Uint8 goes through the very call training batches go through; floats through the
    same formula. Normalising one image at a time gives the same numbers as a batch."""
    return normalize(pixels.unsqueeze(0), mean, std)


def decode_instances(instances: list[Any], input_shape: Sequence[int], max_pixels: int) -> list[torch.Tensor]:
    """Every instance of a :predict request, as C x H x W pixels (uint8 or float32)."""
    out = []
    for i, inst in enumerate(instances):
        where = f"instance {i}"
        if isinstance(inst, list):
            out.append(array_instance(inst, input_shape, where))
        else:  # a B64Instance (pydantic has checked the alternatives)
            out.append(decode_b64(inst.b64, input_shape, max_pixels, where))
    return out


def finite_json(obj: Any) -> Any:
    """Checkpoint metrics as JSON can carry them: NaN and infinity become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj

