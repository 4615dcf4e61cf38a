"""Image files of every variant the README's "Images" table decides, built here from known pixels.

Pillow writes most of them; what Pillow cannot write (2/4-bit and 16-bit RGB PNGs, Adam7
interlacing, gAMA and tRNS chunks of our choosing, ICC profiles other than sRGB) is written
by the small PNG and ICC writers below, straight from the specifications (PNG: ISO/IEC
15948, ICC.1:2001-04 for the v2 profile), so no fixture files are checked in.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# --- PNG -------------------------------------------------------------------------------------
# Adam7 passes: (x0, y0, dx, dy), PNG spec section 8.2.
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
COLOR_TYPES = {1: 0, 3: 2, 2: 4, 4: 6}  # channels -> PNG colour type (gray, RGB, gray+alpha, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _scanlines(a: np.ndarray, bit_depth: int) -> bytes:
    out = bytearray()
    for row in a:
        flat = row.reshape(-1).astype(np.uint32)
        if bit_depth == 16:
            data = flat.astype(">u2").tobytes()
        elif bit_depth == 8:
            data = flat.astype(np.uint8).tobytes()
        else:  # 1, 2, 4 bits per sample, most significant first, rows padded to a byte
            bits = (flat[:, None] >> np.arange(bit_depth - 1, -1, -1)) & 1
            data = np.packbits(bits.reshape(-1).astype(np.uint8)).tobytes()
        out += b"\0" + data  # filter type 0 (None)
    return bytes(out)


def png_bytes(a: np.ndarray, bit_depth: int = 8, *, interlace: bool = False,
              chunks: list[tuple[bytes, bytes]] = ()) -> bytes:
    """H x W (gray) or H x W x C samples -> a PNG file; `chunks` go before IDAT."""
    a = a if a.ndim == 3 else a[..., None]
    h, w, c = a.shape
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, COLOR_TYPES[c], 0, 0, 1 if interlace else 0)
    if interlace:
        raw = b"".join(_scanlines(a[y0::dy, x0::dx], bit_depth) for x0, y0, dx, dy in ADAM7
                       if a[y0::dy, x0::dx].size)
    else:
        raw = _scanlines(a, bit_depth)
    body = b"".join(_chunk(k, d) for k, d in chunks)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + body
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- ICC v2 RGB matrix/TRC profile -----------------------------------------------------------
def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def icc_rgb_profile(red, green, blue, gamma: float, name: str = "test") -> bytes:
    """An ICC v2 display profile: D50-adapted colorants (XYZ), one gamma curve per channel."""
    text = name.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0\0\0" + b"\0" * 67
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", desc), (b"cprt", b"text\0\0\0\0none\0"), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", _xyz(*red)), (b"gXYZ", _xyz(*green)), (b"bXYZ", _xyz(*blue)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0\0\0\0" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


# sRGB's primaries adapted to D50 (the colorants of the sRGB IEC61966-2.1 profile).
SRGB_D50 = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear light in 0..1 -> sRGB 8-bit values (IEC 61966-2-1 transfer function)."""
    v = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
    return np.round(np.clip(v, 0, 1) * 255)


# --- JPEG ------------------------------------------------------------------------------------
def jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every marker segment before the first SOS (for editing headers)."""
    pos, out = 2, []
    while data[pos + 1] != 0xDA:
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        out.append((pos, pos + 2 + length))
        pos += 2 + length
    return out


def without_segment(data: bytes, marker: int) -> bytes:
    for start, end in jpeg_segments(data):
        if data[start + 1] == marker:
            return data[:start] + data[end:]
    raise AssertionError(f"no marker {marker:#x}")


def repeat_last_scan(data: bytes, times: int) -> bytes:
    """A progressive JPEG with its last scan (SOS header and data) repeated `times` more:
    the shape of the scan-count attack (each scan costs a pass over every coefficient)."""
    last = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * times + data[end:]


def on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """What a viewer shows of `colour` with `alpha` (0..255) on a white page, rounded."""
    a = alpha.astype(np.float64) / 255
    return np.round(colour * a + 255 * (1 - a)).astype(np.uint8)
