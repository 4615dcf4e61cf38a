"""The one image decoder: file bytes -> uint8 C x H x W pixels as an image viewer shows them.

Training image folders (imagefolder.py) and serving (cnnray/serve/preprocess.py) both call
`decode_image`, so the same bytes give the same tensor both ways. What "as a viewer shows
them" means for each variant of PNG, JPEG and BMP is decided in the README's "Images"
table; in short:

- 16-bit samples keep their high byte (v >> 8), as Pillow reduces 16-bit RGB(A) PNGs and
  libpng's `png_set_strip_16` does, so a 16-bit image gives its 8-bit twin's pixels;
  1/2/4-bit gray is scaled to 0..255; palettes are expanded.
- Transparency (alpha channels, tRNS) is composited on white, as a browser shows a
  transparent image on its default page.
- An embedded ICC profile (RGB or CMYK) is converted to sRGB with littlecms (Pillow's
  ImageCms, perceptual intent), as colour-managed viewers and browsers do; CMYK without a
  profile uses Pillow's plain CMYK -> RGB. gAMA/cHRM chunks and gray profiles are ignored.
- EXIF orientation is applied (`ImageOps.exif_transpose`).
- Multi-frame files (MPO, APNG) give their first frame; truncated files are refused.

Then the image becomes the caller's mode ("L": Pillow's ITU-R 601-2 luma of RGB; "RGB": a
gray image repeated on three channels) and size (Pillow's bilinear resize), in that order.

Decode cost is bounded from the header before any pixel is decoded (`DecodeLimits`):
canvas pixels (the decompression-bomb guard), frames, and progressive-JPEG scans times
pixels (each scan re-reads the whole coefficient buffer: a 280 KB 4096x4096 JPEG of 5,600
tiny scans took 7 s to decode in issue 12's measurement, 130 s on this loaded machine). Over budget raises `DecodeError` with `too_costly=True`.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps

from cnnray.errors import first_line

# Bump whenever any decoded pixel changes: it is part of the decoded-dataset cache key,
# so arrays made by an older decoder are never reused (cnnray/data/cache.py).
DECODER_VERSION = 2
DECODER_ID = f"cnnray-decode-{DECODER_VERSION}"

# Image.format values accepted; MPO is a multi-picture JPEG (phone cameras write it as .jpg).
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP"})
ACCEPTED_TEXT = "a PNG, JPEG or BMP file"

# Modes whose pixels are gray (one channel when every image of a dataset is gray).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# Any JPEG marker: 0xFF then a byte that is not a stuffed zero or a restart marker (those
# two occur inside entropy-coded data, ITU-T T.81 B.1.1.5 / F.1.2.3).
JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_SOS, _EOI = 0xDA, 0xD9


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost, checked from its header before decoding.

    max_pixels: width x height of the canvas (memory is ~4 bytes per pixel per copy).
    max_frames: frames the file declares (APNG acTL, MPO index); only the first is decoded,
        so this refuses crafted files rather than bounding work.
    max_jpeg_scans, full_canvas_scans: a JPEG may have at most
        min(max_jpeg_scans, full_canvas_scans x max_pixels / its pixels) scans. Each scan
        is a pass over the whole coefficient buffer (measured here: ~25 ms per tiny scan
        at 4096x4096, where a plain progressive photo of that size, 10 scans, decodes in
        ~1 s), so an image at the pixel limit gets 20 scans, a smaller one more. Encoders
        write 1 (baseline) or 6-10 (libjpeg's progressive scripts); libjpeg-turbo's
        TurboJPEG API limits scans too (TJPARAM_SCANLIMIT) against this attack.
    """

    max_pixels: int = 4096 * 4096
    max_frames: int = 1000
    max_jpeg_scans: int = 100
    full_canvas_scans: int = 20

    def jpeg_scan_limit(self, pixels: int) -> int:
        """Scans allowed to a JPEG of `pixels` pixels (at least 1)."""
        return max(1, min(self.max_jpeg_scans, self.full_canvas_scans * self.max_pixels // max(pixels, 1)))


# Training reads the user's own files: any size Pillow itself accepts without calling it a
# decompression bomb (Image.MAX_IMAGE_PIXELS, ~89.5 M pixels: a 48 MP phone photo fits).
TRAINING_LIMITS = DecodeLimits(max_pixels=int(Image.MAX_IMAGE_PIXELS or 89_478_485))


class DecodeError(ValueError):
    """Bytes that are not an accepted image, or one over the `DecodeLimits` (`too_costly`).

    The message is one line without file names; callers add where the bytes came from.
    """

    def __init__(self, message: str, *, too_costly: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.too_costly = too_costly


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """Start-of-scan segments of the first image of a JPEG (up to its EOI), from the markers.

    Walks the marker segments by their lengths, so bytes inside APPn/COM segments (EXIF
    thumbnails, comments) are not counted; inside scan data it looks for the next real
    marker. Stops counting after `stop_after` scans. Cost: one regex search per scan.
    """
    pos, scans, n = 2, 0, len(data)  # after SOI
    while pos + 1 < n:
        if data[pos] != 0xFF:  # garbage between segments: skip to the next marker, as libjpeg does
            m = JPEG_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == _EOI:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length field
            pos += 2
            continue
        if pos + 4 > n:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 2 + length
        if marker == _SOS:
            scans += 1
            if stop_after is not None and scans > stop_after:
                break
            m = JPEG_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
    return scans


def open_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Open `data` lazily (header only) and check format and cost; the caller closes it."""
    if not data:
        raise DecodeError(f"empty image: send the bytes of {ACCEPTED_TEXT}")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own guard (> 2 x MAX_IMAGE_PIXELS), at open
        raise DecodeError(
            f"image is larger than the limit of {limits.max_pixels} pixels", too_costly=True
        ) from None
    except Exception:  # UnidentifiedImageError, or a header that makes a plugin trip
        raise DecodeError(f"not an image: send {ACCEPTED_TEXT}") from None
    try:
        if img.format not in ACCEPTED_FORMATS:
            raise DecodeError(f"{img.format} images are not accepted: send {ACCEPTED_TEXT}")
        if img.width * img.height > limits.max_pixels:
            raise DecodeError(
                f"image of {img.width}x{img.height} pixels is larger than the limit of "
                f"{limits.max_pixels} pixels",
                too_costly=True,
            )
        frames = int(getattr(img, "n_frames", 1))  # from the header for APNG and MPO
        if frames > limits.max_frames:
            raise DecodeError(
                f"image of {frames} frames is over the limit of {limits.max_frames}", too_costly=True
            )
        if img.format in ("JPEG", "MPO"):
            allowed = limits.jpeg_scan_limit(img.width * img.height)
            if count_jpeg_scans(data, stop_after=allowed) > allowed:
                raise DecodeError(
                    f"JPEG of {img.width}x{img.height} pixels in more than {allowed} progressive "
                    "scans is refused (decoding cost grows with every scan)",
                    too_costly=True,
                )
    except BaseException:
        img.close()
        raise
    return img


def is_gray(img: Image.Image, data: bytes = b"") -> bool:
    """Whether a viewer shows `img` in gray: a gray mode, a palette of gray entries only, or
    a PNG whose header says gray (colour type 0 or 4: Pillow opens 16-bit gray+alpha as RGBA)."""
    if img.format == "PNG" and data[12:16] == b"IHDR" and data[25:26] in (b"\x00", b"\x04"):
        return True
    if img.mode in ("P", "PA"):
        palette = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        return bool((palette == palette[:, :1]).all())
    return img.mode in _GRAY_MODES


def decode_image(
    data: bytes,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> np.ndarray:
    """PNG, JPEG or BMP bytes -> uint8 C x H x W, C = 1 ("L") or 3 ("RGB"), as a viewer shows it.

    channels: 1 or 3; None keeps the image's own (1 if `is_gray`, else 3).
    size: (height, width) to resize to (bilinear) when different; None keeps the image's.
    Raises DecodeError: empty, not an image, not an accepted format, over `limits`
    (`too_costly`), or truncated/corrupt data.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    with open_image(data, limits) as img:
        fmt = img.format
        try:
            img.load()  # the full decode of the first frame; truncated data raises here
            rgb_or_l = _as_viewed(img, is_gray(img, data))
        except DecodeError:
            raise
        except Exception as e:  # OSError (truncated), SyntaxError, ValueError, zlib.error...
            raise DecodeError(f"cannot decode the {fmt} image: {first_line(e)}") from None
    want = channels or (1 if rgb_or_l.mode == "L" else 3)
    if want == 1 and rgb_or_l.mode != "L":
        rgb_or_l = rgb_or_l.convert("L")  # ITU-R 601-2 luma, Pillow's fixed-point weights
    if size is not None and rgb_or_l.size != (size[1], size[0]):
        rgb_or_l = rgb_or_l.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb_or_l)
    if pixels.ndim == 2:
        pixels = pixels[None]
        if want == 3:  # gray on the three channels, as Pillow's L -> RGB does
            pixels = np.repeat(pixels, 3, axis=0)
    else:
        pixels = pixels.transpose(2, 0, 1)
    return np.array(pixels, dtype=np.uint8, order="C")  # a writable copy of Pillow's buffer


def _as_viewed(img: Image.Image, gray: bool) -> Image.Image:
    """A loaded image -> an "L" or "RGB" image of what a viewer shows (see the module doc);
    `gray`: its pixels are gray (`is_gray`), so one channel of RGB is kept."""
    img = _oriented(img)
    mode = img.mode
    has_trns = "transparency" in img.info
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_gray(img)
    if mode == "1":
        img = img.convert("L")  # 0 / 255
    elif mode in ("P", "PA"):
        img = img.convert("RGBA" if has_trns or mode == "PA" else "RGB")
    elif mode == "La":  # premultiplied
        img = img.convert("LA")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode in ("L", "RGB") and has_trns:
        img = img.convert("LA" if mode == "L" else "RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA", "CMYK"):
        img = img.convert("RGB")  # YCbCr, LAB, HSV, F...: no alpha in these
    icc = img.info.get("icc_profile")
    if img.mode == "CMYK":
        img = _icc_to_srgb(img, icc, "CMYK") if icc else img.convert("RGB")
    elif img.mode in ("RGB", "RGBA") and icc:
        img = _icc_to_srgb(img, icc, "RGB")
    if img.mode in ("LA", "RGBA"):
        img = _on_white(img)
    if gray and img.mode == "RGB":  # a gray palette or 16-bit gray+alpha: R = G = B
        img = img.getchannel(0)
    return img


def _oriented(img: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF: viewers ignore it and show the stored pixels
        return img
    return img if out is None else out


def _sixteen_bit_gray(img: Image.Image) -> Image.Image:
    """16-bit gray ("I;16*", or "I" from older Pillows) -> "L" of the high byte, tRNS on white."""
    values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    gray = (values >> 8).astype(np.uint8)
    trns = img.info.get("transparency")
    if isinstance(trns, int):  # one 16-bit gray value is fully transparent (PNG tRNS)
        gray[values == trns] = 255
    return Image.fromarray(gray, mode="L")


def _on_white(img: Image.Image) -> Image.Image:
    """"LA"/"RGBA" -> "L"/"RGB" composited on white: c * a + 255 * (1 - a), a in 0..1, rounded."""
    arr = np.asarray(img).astype(np.uint32)
    colour, alpha = arr[..., :-1], arr[..., -1:]
    # 255 - round((255 - c) * a / 255); 255 is odd, so no value falls on a tie.
    out = 255 - ((255 - colour) * alpha + 127) // 255
    out = out.astype(np.uint8)
    return Image.fromarray(out[..., 0] if img.mode == "LA" else out, mode="L" if img.mode == "LA" else "RGB")


@lru_cache(maxsize=8)
def _transform(icc: bytes, in_mode: str):  # noqa: ANN202 (an ImageCms transform)
    from PIL import ImageCms

    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    # NOCACHE: lcms's one-pixel cache is not thread-safe, and serving decodes in threads.
    return ImageCms.buildTransform(
        src, ImageCms.createProfile("sRGB"), in_mode, "RGB", flags=ImageCms.Flags.NOCACHE
    )


def _icc_to_srgb(img: Image.Image, icc: bytes, in_mode: str) -> Image.Image:
    """Colour-manage `img` from its embedded profile to sRGB (alpha kept aside); an
    unreadable or mismatched profile is ignored, as browsers ignore it."""
    from PIL import ImageCms

    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    base = img.convert("RGB") if alpha is not None else img
    try:
        out = ImageCms.applyTransform(base, _transform(bytes(icc), in_mode))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return img if in_mode != "CMYK" else img.convert("RGB")
    if out is None:
        return img
    if alpha is not None:
        out.putalpha(alpha)
    return out
