"""Image files of every variant the README's "Images" table decides, built here from known pixels,
with the pixels a viewer shows of each (`VARIANTS`).

Pillow writes most of them; what Pillow cannot write (2/4-bit and 16-bit RGB PNGs, Adam7
interlacing, gAMA and tRNS chunks of our choosing, ICC profiles other than sRGB) is written
by the small PNG and ICC writers below, straight from the specifications (PNG: ISO/IEC
15948, ICC.1:2001-04 for the v2 profile), so no fixture files are checked in.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageCms

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


# --- the variants ------------------------------------------------------------------------------
H, W = 24, 32  # not square, so a wrong rotation cannot pass
_rng = np.random.default_rng(14)
GRAY = _rng.integers(0, 256, (H, W), dtype=np.uint8)
RGB = _rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = _rng.integers(0, 256, (H, W), dtype=np.uint8)
ALPHA[:4] = 0  # fully transparent rows
ALPHA[4:8] = 255  # fully opaque rows


def chw(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def jpeg_pixels(data: bytes) -> np.ndarray:
    """What libjpeg decodes from a plain JPEG (the reference for JPEG variants)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode != "L" else im)


def exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


# --- the variants: name -> () -> (file bytes, reference C x H x W, tolerance in levels) ----------
def _palette(gray_palette: bool, alphas: bool):
    idx = (np.arange(H * W).reshape(H, W) * 7) % 16
    pal = _rng.integers(0, 256, (16, 3), dtype=np.uint8)
    if gray_palette:
        pal = np.repeat(pal[:, :1], 3, axis=1)
    img = Image.fromarray(idx.astype(np.uint8), mode="P")
    img.putpalette(pal.reshape(-1).tolist())
    colour = pal[idx]
    if not alphas:
        return encode(img, "PNG"), chw(colour[..., 0] if gray_palette else colour), 0
    alpha = np.linspace(0, 255, 16).astype(np.uint8)
    out = on_white(colour, alpha[idx][..., None])
    return encode(img, "PNG", transparency=alpha.tobytes()), chw(out[..., 0] if gray_palette else out), 0


def _trns_gray16():
    v = GRAY.astype(np.uint16) * 257
    t = int(v[0, 0])
    ref = GRAY.copy()
    ref[v == t] = 255
    return png_bytes(v, 16, chunks=[(b"tRNS", struct.pack(">H", t))]), chw(ref), 0


def _trns_rgb():
    t = RGB[0, 0]
    ref = RGB.copy()
    ref[(RGB == t).all(-1)] = 255
    return png_bytes(RGB, chunks=[(b"tRNS", struct.pack(">3H", *map(int, t)))]), chw(ref), 0


def _trns_gray():
    t = int(GRAY[0, 0])
    ref = GRAY.copy()
    ref[GRAY == t] = 255
    return png_bytes(GRAY, chunks=[(b"tRNS", struct.pack(">H", t))]), chw(ref), 0


def _cmyk(adobe: bool):
    # Flat 8x8-aligned patches (JPEG keeps flat blocks within a level or two): cyan, magenta,
    # yellow, 50% black. A viewer shows them as these RGB colours.
    ink = np.zeros((16, 32, 4), np.uint8)
    ink[:, 0:8, 0] = ink[:, 8:16, 1] = ink[:, 16:24, 2] = 255
    ink[:, 24:32, 3] = 128
    ref = np.zeros((16, 32, 3), np.uint8)
    ref[:, 0:8] = (0, 255, 255)
    ref[:, 8:16] = (255, 0, 255)
    ref[:, 16:24] = (255, 255, 0)
    ref[:, 24:32] = 127
    data = encode(Image.fromarray(ink, mode="CMYK"), "JPEG", quality=95)
    if not adobe:
        data = without_segment(data, 0xEE)  # no APP14 "Adobe" marker
    return data, chw(ref), 3


# EXIF orientation -> how the stored H x W x C pixels are shown (EXIF 2.3, tag 0x0112).
SHOWN = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # rotated 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # rotated 90 degrees counter-clockwise
}


def _rotated(fmt: str, orientation: int):
    base = Image.fromarray(RGB)
    data = encode(base, fmt, exif=exif(orientation), **({"quality": 90} if fmt == "JPEG" else {}))
    plain = RGB if fmt == "PNG" else jpeg_pixels(encode(base, fmt, quality=90))
    return data, chw(np.ascontiguousarray(SHOWN[orientation](plain))), 0


def _mpo():
    first, second = Image.fromarray(RGB), Image.fromarray(255 - RGB)
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=90)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "MPO" and im.n_frames == 2
    return data, chw(jpeg_pixels(encode(first, "JPEG", quality=90))), 0


def _linear_icc():
    # A linear-light image tagged with a gamma-1.0 profile of sRGB's primaries: a
    # colour-managed viewer shows sRGB's encoding of the linear values (IEC 61966-2-1).
    profile = icc_rgb_profile(*SRGB_D50, gamma=1.0, name="linear sRGB")
    return encode(Image.fromarray(RGB), "PNG", icc_profile=profile), chw(srgb_encode(RGB / 255.0)), 1


VARIANTS: dict[str, Callable[[], tuple[bytes, np.ndarray, int]]] = {
    "png-gray-8bit": lambda: (encode(Image.fromarray(GRAY), "PNG"), chw(GRAY), 0),
    "png-gray-16bit-twin": lambda: (encode(Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG"), chw(GRAY), 0),
    "png-gray-16bit-high-byte": lambda: (png_bytes(GRAY.astype(np.uint16) * 256 + 255, 16), chw(GRAY), 0),
    "png-gray-1bit": lambda: (encode(Image.fromarray(GRAY > 127), "PNG"), chw(np.where(GRAY > 127, 255, 0)), 0),
    "png-gray-2bit": lambda: (png_bytes(GRAY >> 6, 2), chw((GRAY >> 6) * 85), 0),
    "png-gray-4bit": lambda: (png_bytes(GRAY >> 4, 4), chw((GRAY >> 4) * 17), 0),
    "png-rgb-8bit": lambda: (encode(Image.fromarray(RGB), "PNG"), chw(RGB), 0),
    "png-rgb-16bit": lambda: (png_bytes(RGB.astype(np.uint16) * 257, 16), chw(RGB), 0),
    "png-palette": lambda: _palette(False, False),
    "png-palette-gray": lambda: _palette(True, False),
    "png-palette-transparent": lambda: _palette(False, True),
    "png-palette-gray-transparent": lambda: _palette(True, True),
    "png-gray-alpha": lambda: (encode(Image.fromarray(np.dstack([GRAY, ALPHA]), mode="LA"), "PNG"),
                               chw(on_white(GRAY[..., None], ALPHA[..., None])[..., 0]), 0),
    "png-rgba": lambda: (encode(Image.fromarray(np.dstack([RGB, ALPHA]), mode="RGBA"), "PNG"),
                         chw(on_white(RGB, ALPHA[..., None])), 0),
    "png-gray-alpha-16bit": lambda: (png_bytes(np.dstack([GRAY, ALPHA]).astype(np.uint16) * 257, 16),
                                     chw(on_white(GRAY[..., None], ALPHA[..., None])[..., 0]), 0),
    "png-rgba-16bit": lambda: (png_bytes(np.dstack([RGB, ALPHA]).astype(np.uint16) * 257, 16),
                               chw(on_white(RGB, ALPHA[..., None])), 0),
    "png-gray-trns": _trns_gray,
    "png-gray-16bit-trns": _trns_gray16,
    "png-rgb-trns": _trns_rgb,
    "png-interlaced-gray": lambda: (png_bytes(GRAY, interlace=True), chw(GRAY), 0),
    "png-interlaced-rgb": lambda: (png_bytes(RGB, interlace=True), chw(RGB), 0),
    "png-gamma-chunk-ignored": lambda: (png_bytes(RGB, chunks=[(b"gAMA", struct.pack(">I", 100000))]), chw(RGB), 0),
    "png-icc-srgb": lambda: (encode(Image.fromarray(RGB), "PNG", icc_profile=ImageCms.ImageCmsProfile(
        ImageCms.createProfile("sRGB")).tobytes()), chw(RGB), 0),
    "png-icc-linear": _linear_icc,
    **{f"png-exif-orientation-{o}": (lambda o=o: _rotated("PNG", o)) for o in SHOWN},
    "jpeg-exif-orientation-6": lambda: _rotated("JPEG", 6),
    "jpeg-exif-orientation-8": lambda: _rotated("JPEG", 8),
    "jpeg-baseline": lambda: (encode(Image.fromarray(RGB), "JPEG", quality=90),
                              chw(jpeg_pixels(encode(Image.fromarray(RGB), "JPEG", quality=90))), 0),
    "jpeg-progressive": lambda: (encode(Image.fromarray(RGB), "JPEG", quality=90, progressive=True),
                                 chw(jpeg_pixels(encode(Image.fromarray(RGB), "JPEG", quality=90))), 0),
    "jpeg-gray": lambda: (encode(Image.fromarray(GRAY), "JPEG", quality=90),
                          chw(jpeg_pixels(encode(Image.fromarray(GRAY), "JPEG", quality=90))), 0),
    "jpeg-cmyk-adobe": lambda: _cmyk(True),
    "jpeg-cmyk-no-adobe-marker": lambda: _cmyk(False),
    "jpeg-mpo": _mpo,
    "png-apng-first-frame": lambda: (encode(Image.fromarray(RGB), "PNG", save_all=True,
                                            append_images=[Image.fromarray(255 - RGB)]), chw(RGB), 0),
    "bmp-rgb": lambda: (encode(Image.fromarray(RGB), "BMP"), chw(RGB), 0),
    "bmp-gray": lambda: (encode(Image.fromarray(GRAY), "BMP"), chw(GRAY), 0),
    "bmp-1bit": lambda: (encode(Image.fromarray(GRAY > 127), "BMP"), chw(np.where(GRAY > 127, 255, 0)), 0),
}


def variant(name: str) -> tuple[bytes, np.ndarray, int]:
    data, ref, tol = VARIANTS[name]()
    return data, ref.astype(np.uint8), tol


def assert_close(got: np.ndarray, ref: np.ndarray, tol: int) -> None:
    assert got.dtype == np.uint8 and got.shape == ref.shape, (got.shape, ref.shape)
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= tol, f"max difference {diff.max()} > {tol} at {np.argwhere(diff > tol)[:3].tolist()}"
