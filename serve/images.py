"""Untrusted image bytes -> RGB arrays, refusing anything unsafe before decoding it.

Order matters: the container format is identified from the header only (a
short whitelist: no EPS, which would start Ghostscript, no exotic plugins),
the pixel count is checked from the header before a single pixel is decoded
(a 40 kB PNG can inflate to gigabytes), PIL's own decompression-bomb
warning is an error, and a truncated file is an error rather than the grey
padding PIL would otherwise invent. Large JPEGs decode at a reduced scale
(``draft``) when the model only needs a few hundred pixels anyway.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from serve.errors import ApiError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # never pad a truncated file with invented pixels
Image.init()  # register every plugin once, then keep the whitelisted ones that exist in this Pillow
ALLOWED_FORMATS = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)  # (MPO files open through JPEG)
# PIL's bomb warning (over Image.MAX_IMAGE_PIXELS, 89 MP) becomes an error, process-wide: a
# per-call warnings.catch_warnings() is not thread-safe, and decoding runs on worker threads.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Decoded:
    """An RGB image and the size of the original (``rgb`` may be a reduced-scale decode)."""

    rgb: np.ndarray  # (h, w, 3) uint8
    width: int  # original width in pixels
    height: int
    format: str


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _upright(im: Image.Image, width: int, height: int) -> tuple[Image.Image, int, int]:
    """Apply the EXIF orientation (photos from phones); unreadable EXIF leaves the image as stored."""
    try:
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # a 90-degree rotation swaps the sides
            width, height = height, width
        return ImageOps.exif_transpose(im) or im, width, height
    except Exception:  # noqa: BLE001 - EXIF is optional metadata; its damage is not the pixels' fault
        return im, width, height


def decode_image(data: bytes, max_pixels: int, min_side: int | None = None) -> Decoded:
    """Decode ``data`` safely; ``min_side`` lets a JPEG decode smaller while its short side stays >= it.

    Raises ApiError: 400 empty/invalid/truncated, 413 over ``max_pixels``.
    """
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, "image_too_large", f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to identify untrusted bytes is a client error
        raise ApiError(400, "invalid_image", f"the data is not a readable image (accepted: "
                       f"{', '.join(ALLOWED_FORMATS)}): {type(exc).__name__}: {exc}"[:300]) from None
    with im:
        width, height = im.size
        fmt = im.format or ""
        if width < 1 or height < 1:
            raise ApiError(400, "invalid_image", f"the image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ApiError(413, "image_too_large", f"the image is {width}x{height} = {width * height:,} pixels; "
                           f"the limit is {max_pixels:,} (serve.max_pixels)")
        try:
            if min_side and fmt in ("JPEG", "MPO") and min(width, height) > 2 * min_side:
                scale = min_side / min(width, height)
                im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            im.load()  # the first frame of an animation (frames are never counted: that decodes them all)
            upright, width, height = _upright(im, width, height)
            rgb = np.asarray(_to_rgb(upright), dtype=np.uint8)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ApiError(413, "image_too_large", f"image refused as a decompression bomb: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a decoder failure on untrusted input is the input's fault
            msg = str(exc)
            code = "truncated_image" if "truncat" in msg.lower() or isinstance(exc, EOFError) else "invalid_image"
            raise ApiError(400, code, f"the {fmt or 'image'} data could not be decoded (truncated or corrupt): "
                           f"{type(exc).__name__}: {msg}"[:300]) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ApiError(400, "invalid_image", f"the image decoded to an unusable array of shape {rgb.shape}")
    return Decoded(rgb=np.ascontiguousarray(rgb), width=width, height=height, format=fmt)


@dataclass(frozen=True)
class View:
    """The square the model sees: CLIP's short-side resize + centre crop, and where it lies."""

    pixels: np.ndarray  # (S, S, 3) uint8
    box: tuple[float, float, float, float]  # x, y, width, height in original image pixels


def center_view(img: Decoded, size: int) -> View:
    """Short side -> ``size`` (bicubic), centre crop: the eval transform minus normalisation."""
    import cv2

    h, w = img.rgb.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = cv2.resize(img.rgb, (nw, nh), interpolation=cv2.INTER_CUBIC)  # as the eval transform
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    crop = np.ascontiguousarray(resized[y0 : y0 + size, x0 : x0 + size])
    # back to the original's coordinates (the decode may have been reduced)
    fx, fy = img.width / nw, img.height / nh
    return View(pixels=crop, box=(x0 * fx, y0 * fy, size * fx, size * fy))


def fit_short_side(img: Decoded, short_side: int, max_long_side: int) -> np.ndarray:
    """The whole image, shrunk (never enlarged) so its short side is at most ``short_side``
    and its long side at most ``max_long_side``: the segmenter works at that scale anyway,
    so larger inputs only cost transfer time and give a larger label map."""
    import cv2

    h, w = img.rgb.shape[:2]
    scale = min(1.0, short_side / min(h, w), max_long_side / max(h, w))
    if scale >= 1.0:
        return img.rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img.rgb, size, interpolation=cv2.INTER_AREA)
