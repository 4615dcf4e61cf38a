"""Pictures of explanations as PNG bytes: a heat map over the image, and one response map.

Plain numpy and Pillow (no figure, no axes): each PNG is a few hundred bytes to a few KiB,
small enough to travel base64-encoded in a JSON answer.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

# Overlays are enlarged (nearest neighbour, whole pixels) until their shorter side reaches
# this many pixels: a 28 x 28 digit becomes 112 x 112, a 224 x 224 photo stays as it is.
OVERLAY_MIN_SIDE = 112
OVERLAY_MAX_SCALE = 8
HEAT_ALPHA = 0.65  # opacity of the strongest attribution over the image
POSITIVE = np.array([255.0, 48.0, 0.0])  # red-orange: the pixels speak for the class
NEGATIVE = np.array([0.0, 120.0, 255.0])  # blue: against it


def png_bytes(rgb_or_grey: np.ndarray) -> bytes:
    """uint8 H x W (grey) or H x W x 3 (RGB) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb_or_grey)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _enlarge(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    k = max(1, min(OVERLAY_MAX_SCALE, math.ceil(OVERLAY_MIN_SIDE / max(1, min(h, w)))))
    return a.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else a


def overlay_png(pixels: torch.Tensor, heat: torch.Tensor) -> bytes:
    """The image (uint8 C x H x W, C = 1 or 3, as the model saw it) in grey, with `heat`
    (H x W) laid over it: positive values in red-orange, negative in blue, opacity in
    proportion to |value| / max |value| (an all-zero map leaves the image as it is)."""
    img = pixels.detach().cpu().numpy().astype(np.float64)
    grey = img.mean(0) if img.shape[0] != 1 else img[0]
    base = np.repeat(grey[..., None], 3, axis=2) * 0.8  # a little darker, so the colour shows
    a = heat.detach().cpu().numpy().astype(np.float64)
    scale = float(np.abs(a).max()) if a.size else 0.0
    if scale > 0:
        alpha = (np.abs(a) / scale * HEAT_ALPHA)[..., None]
        colour = np.where((a >= 0)[..., None], POSITIVE, NEGATIVE)
        base = base * (1 - alpha) + colour * alpha
    return png_bytes(_enlarge(np.clip(np.rint(base), 0, 255).astype(np.uint8)))


_MAGMA: np.ndarray | None = None


def _magma() -> np.ndarray:
    """matplotlib's 'magma' colour map as a 256 x 3 uint8 table (the report's response maps
    use the same map), built once."""
    global _MAGMA
    if _MAGMA is None:
        from matplotlib import colormaps

        _MAGMA = np.rint(colormaps["magma"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _MAGMA


def map_png(response: torch.Tensor) -> bytes:
    """One response map (h x w) as a PNG at its own size, scaled to its own range (a flat
    map is mid-level), in the 'magma' colour map: bright where the filter matches best."""
    a = response.detach().cpu().numpy().astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    unit = (a - lo) / (hi - lo) if hi > lo else np.full_like(a, 0.5)
    return png_bytes(_magma()[np.rint(unit * 255).astype(np.int64)])
