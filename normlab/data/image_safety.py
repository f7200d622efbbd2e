"""Images are data, never a hazard: what a file claims is checked before it is decoded.

A decompression bomb (a small PNG whose header claims 40,000 × 40,000 pixels), an image far larger than any
training image needs to be, a truncated file or a file that is no image at all is refused by name (the member
and the folder or archive that holds it) in one ``ConfigError``. The limit is ``data.max_image_pixels``, for
data whose images really are that large. The header is read first: a refused image is never decoded.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from normlab.errors import ConfigError

BYTES_PER_PIXEL_AT_MOST = 8  # 16-bit RGBA, uncompressed: no image file of n pixels needs more than 8n bytes
HEADER_SLACK = 1 << 20


def _too_large(name: str, where: str, what: str, max_pixels: int) -> ConfigError:
    return ConfigError(f"{name!r} in {where} {what}, more than data.max_image_pixels={max_pixels}; refused "
                       "before decoding (a decompression bomb, or an image far larger than training needs). If "
                       "your images really are that large, raise data.max_image_pixels")


def check_file_size(size: int, name: str, where: str, max_pixels: int) -> None:
    """Refuse a file (a zip member: its inflated size) larger than any image of `max_pixels` pixels can be."""
    if size > max_pixels * BYTES_PER_PIXEL_AT_MOST + HEADER_SLACK:
        raise _too_large(name, where, f"is {size / 1e6:.0f} MB, larger than an image of that many pixels can be",
                         max_pixels)


def _header(data: bytes) -> Image.Image:
    """The image opened, its header read and nothing decoded; PIL's own bomb check is the one in open_rgb."""
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def open_rgb(data: bytes, name: str, where: str, max_pixels: int) -> Image.Image:
    """The image in `data` as RGB, once its header's size is within `max_pixels`; else a ConfigError naming it."""
    try:
        image = _header(data)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise _unreadable(name, where, e) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(name, where, f"is {width}×{height} pixels ({width * height / 1e6:.0f} megapixels)",
                         max_pixels)
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated, damaged
        raise _unreadable(name, where, e) from None


def _unreadable(name: str, where: str, error: Exception) -> ConfigError:
    reason = str(error).splitlines()[0] if str(error) else ""
    return ConfigError(f"{name!r} in {where} is not a readable image ({type(error).__name__}: {reason}); "
                       "remove it or replace it with a whole image")
