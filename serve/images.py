"""Untrusted image bytes -> RGB arrays, refusing anything unsafe before decoding it.

Order matters: the container format is identified from the header only (a
short whitelist: no EPS, which would start Ghostscript, no exotic plugins),
the pixel count is checked from the header before a single pixel is decoded
(a 40 kB PNG can inflate to gigabytes), PIL's own decompression-bomb
warning is an error, and a truncated file is an error rather than the grey
padding PIL would otherwise invent. Large JPEGs decode at a reduced scale
(``draft``) when the model only needs a few hundred pixels anyway.

Work and memory per image are bounded before decoding: the aspect ratio
(``serve.max_aspect``: a 1 x 19,200,000 strip is within the pixel limit but
no photograph), the number of JPEG scans (``serve.max_jpeg_scans``: each scan
is a pass over the whole image), and :func:`inspect_image` estimates the
bytes a decode needs so the ingress can hold concurrent decodes to a budget
(``serve.decode_memory_bytes``). High-bit-depth images convert to 8 bits a
block of rows at a time, never as a float64 copy of the whole image. Error
messages say what is wrong in words, never a library's object reprs.
"""

from __future__ import annotations

import io
import math
import re
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


# Peak bytes per pixel of a decode, by the PIL mode the header announces: the decoded image, the RGB
# conversion and the NumPy copy (estimates from how Pillow stores each mode, with room for the conversions).
BYTES_PER_PIXEL = {"1": 9, "L": 9, "P": 13, "RGB": 11, "YCbCr": 11, "CMYK": 15, "I;16": 11, "I;16B": 11,
                   "I;16L": 11, "I": 13, "F": 13, "LA": 20, "PA": 20, "RGBA": 20, "RGBa": 20}
ROWS_PER_BLOCK = 256  # high-bit-depth conversion works on blocks of rows
_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>|0x[0-9a-fA-F]{6,}")


def plain_words(exc: BaseException) -> str:
    """A decoder's complaint without object reprs or addresses, short."""
    text = _REPR.sub("", str(exc)).strip(" :")
    return text[:160] if text else type(exc).__name__


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    width: int
    height: int
    format: str
    mode: str
    decode_bytes: int  # estimated peak memory of decoding it


@dataclass(frozen=True)
class Decoded:
    """An RGB image and the size of the original (``rgb`` may be a reduced-scale decode)."""

    rgb: np.ndarray  # (h, w, 3) uint8
    width: int  # original width in pixels
    height: int
    format: str


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """(h, w, 3) uint8. High-bit-depth greys are stretched min..max to 0..255 a block of rows at a time
    (a float64 copy of a 40-megapixel image alone would be 320 MB)."""
    if im.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(_to_rgb(im), dtype=np.uint8)
    w, h = im.size
    lo, hi = im.getextrema()
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or inf samples in a float image
        raise ValueError("the float image holds NaN or infinite samples")
    out = np.empty((h, w, 3), dtype=np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    for y in range(0, h, ROWS_PER_BLOCK):
        block = np.array(im.crop((0, y, w, min(h, y + ROWS_PER_BLOCK))), dtype=np.float32)  # a writable copy
        block -= lo
        block *= scale
        out[y : y + block.shape[0]] = np.clip(block, 0, 255).astype(np.uint8)[..., None]
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
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


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "image_too_large", "the image header declares more pixels than any image this server "
                       "decodes (a decompression bomb)") from None
    except Exception:  # noqa: BLE001 - any failure to identify untrusted bytes is a client error
        raise ApiError(400, "invalid_image", "the data is not a readable image: its header is not that of "
                       f"{', '.join(ALLOWED_FORMATS)}") from None


def _check(im: Image.Image, data: bytes, max_pixels: int, max_aspect: float | None,
           max_jpeg_scans: int | None) -> ImageHeader:
    width, height = im.size
    fmt = im.format or ""
    if width < 1 or height < 1:
        raise ApiError(400, "invalid_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"the image is {width}x{height} = {width * height:,} pixels; "
                       f"the limit is {max_pixels:,} (serve.max_pixels)")
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise ApiError(400, "extreme_aspect_ratio", f"the image is {width}x{height}, its long side "
                       f"{max(width, height) / min(width, height):,.0f} times its short side; the limit is "
                       f"{max_aspect:g} (serve.max_aspect)")
    if max_jpeg_scans is not None and fmt in ("JPEG", "MPO"):
        # Entropy-coded data stuffs every 0xFF with 0x00, so FF DA only ever starts a scan.
        scans = data.count(b"\xff\xda")
        if scans > max_jpeg_scans:
            raise ApiError(400, "too_many_scans", f"the JPEG has {scans:,} scans; the limit is {max_jpeg_scans} "
                           "(serve.max_jpeg_scans; progressive JPEGs have about 10)")
    bpp = BYTES_PER_PIXEL.get(im.mode, 20)
    return ImageHeader(width, height, fmt, im.mode, width * height * bpp)


def inspect_image(data: bytes, max_pixels: int, max_aspect: float | None = None,
                  max_jpeg_scans: int | None = None) -> ImageHeader:
    """Every check that needs only the header (format, pixels, aspect, JPEG scans) and the decode's memory.

    Raises ApiError: 400 empty/invalid/extreme aspect/too many scans, 413 over ``max_pixels``.
    """
    im = _open(data)
    with im:
        return _check(im, data, max_pixels, max_aspect, max_jpeg_scans)


def decode_image(data: bytes, max_pixels: int, min_side: int | None = None, *, max_aspect: float | None = None,
                 max_jpeg_scans: int | None = None) -> Decoded:
    """Decode ``data`` safely; ``min_side`` lets a JPEG decode smaller while its short side stays >= it.

    Raises ApiError: 400 empty/invalid/truncated/extreme aspect/too many scans, 413 over ``max_pixels``.
    """
    im = _open(data)
    with im:
        head = _check(im, data, max_pixels, max_aspect, max_jpeg_scans)
        width, height, fmt = head.width, head.height, head.format
        try:
            if min_side and fmt in ("JPEG", "MPO") and min(width, height) > 2 * min_side:
                scale = min_side / min(width, height)
                im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            im.load()  # the first frame of an animation (frames are never counted: that decodes them all)
            upright, width, height = _upright(im, width, height)
            rgb = _to_rgb_array(upright)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ApiError(413, "image_too_large", "the image decodes to more pixels than any image this server "
                           "decodes (a decompression bomb)") from None
        except MemoryError:
            raise ApiError(413, "image_too_large", f"the {fmt} image ({width}x{height}) needs more memory to "
                           "decode than this server has free") from None
        except Exception as exc:  # noqa: BLE001 - a decoder failure on untrusted input is the input's fault
            msg = str(exc)
            code = "truncated_image" if "truncat" in msg.lower() or isinstance(exc, EOFError) else "invalid_image"
            raise ApiError(400, code, f"the {fmt or 'image'} data could not be decoded (truncated or corrupt): "
                           f"{plain_words(exc)}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ApiError(400, "invalid_image", f"the image decoded to an unusable array of shape {rgb.shape}")
    return Decoded(rgb=np.ascontiguousarray(rgb), width=width, height=height, format=fmt)


@dataclass(frozen=True)
class View:
    """The square the model sees: CLIP's short-side resize + centre crop, and where it lies."""

    pixels: np.ndarray  # (S, S, 3) uint8
    box: tuple[float, float, float, float]  # x, y, width, height in original image pixels


def center_view(img: Decoded, size: int) -> View:
    """Short side -> ``size`` (bicubic), centre crop: the eval transform minus normalisation.

    Computed as one affine warp onto the ``size`` x ``size`` crop (the same source positions and
    bicubic kernel as resizing the whole image, then cropping), so the work is bounded by the crop
    whatever the aspect ratio: resizing a 1 x 25,000 strip whole would ask for 224 x 5,600,000 pixels.
    """
    import cv2

    h, w = img.rgb.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    ax, ay = w / nw, h / nh  # cv2.resize: src = (dst + 0.5) * (src_size / dst_size) - 0.5
    m = np.array([[ax, 0.0, (x0 + 0.5) * ax - 0.5], [0.0, ay, (y0 + 0.5) * ay - 0.5]], dtype=np.float64)
    crop = cv2.warpAffine(img.rgb, m, (size, size), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
    crop = np.ascontiguousarray(crop)
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
