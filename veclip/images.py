"""Safe image decoding shared by every stage.

Web bytes are hostile: empty, truncated, not an image at all, or a small file
that expands to gigapixels (a decompression bomb). Each failure becomes an
:class:`ImageError` with a short reason code, so callers can quarantine the row
instead of crashing. Pure PIL: this module imports in the vLLM environment.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

# Only these decoders ever see web bytes. PIL knows ~40 formats, some with a long
# history of parser bugs, and EPS/PS hand the bytes to Ghostscript where it is
# installed: anything else is refused as undecodable without being parsed.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "png", "webp", "gif")  # file names of those formats (import, convert-eval)

# Reason codes, stable: they land in quarantine tables and run summaries.
EMPTY = "image_empty"
UNDECODABLE = "image_undecodable"
TOO_MANY_BYTES = "image_too_many_bytes"
TOO_MANY_PIXELS = "image_too_many_pixels"
ZERO_SIZE = "image_zero_size"


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024
    """larger images are refused before they are parsed"""
    max_pixels: int = 50_000_000
    """~7000x7000; a web photo is far below"""


def open_image(data: bytes | None, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Parse the header and check the limits; pixels are not decoded yet."""
    if not data:
        raise ImageError(EMPTY, "no image bytes")
    if len(data) > limits.max_bytes:
        raise ImageError(TOO_MANY_BYTES, f"{len(data)} bytes > limit {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageError(TOO_MANY_PIXELS, str(err)) from None
    except Image.UnidentifiedImageError:
        raise ImageError(UNDECODABLE, f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as err:  # PIL raises many types for junk bytes
        raise ImageError(UNDECODABLE, f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(ZERO_SIZE, f"size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageError(TOO_MANY_PIXELS, f"{width}x{height} > limit {limits.max_pixels} pixels")
    return image


def decode_image(data: bytes | None, limits: ImageLimits = ImageLimits(), mode: str = "RGB") -> Image.Image:
    """Fully decode to ``mode``; truncated files fail here, not later in a worker."""
    return decode_loaded(open_image(data, limits), mode)


def decode_loaded(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Decode an opened image's pixels to ``mode``; a truncated or corrupt file fails here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return image.convert(mode) if image.mode != mode else image
    except Exception as err:
        raise ImageError(UNDECODABLE, f"{type(err).__name__}: {err}") from None


def check_jpeg(image: Image.Image) -> None:
    """Prove an opened JPEG decodes (truncated or corrupt data fails here) without paying for a full
    decode: at 1/8 scale libjpeg still reads every coefficient but skips most of the inverse DCT and
    colour work. For images that a training worker's device decodes (nvJPEG) later. ``image.size``
    is the reduced one afterwards."""
    width, height = image.size
    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
    decode_loaded(image)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def resize_jpeg(image: Image.Image, short_side: int, quality: int = 90) -> tuple[bytes, tuple[int, int]]:
    """An opened image (:func:`open_image`) with its short side scaled to ``short_side``, as JPEG bytes, and
    its new size. JPEG decodes at a reduced scale first (``draft``), so a large photo costs little more than
    a small one."""
    width, height = image.size
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image.draft(None, size)  # JPEG only (a no-op for other formats): DCT scaling to >= size
    image = decode_loaded(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return encode_jpeg(image, quality), size
