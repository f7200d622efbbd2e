"""Images are data, never a hazard: what a file claims is checked before it is decoded.

A decompression bomb (a small PNG whose header claims 40,000 × 40,000 pixels), an image far larger than any
training image needs to be, a truncated file or a file that is no image at all is refused by name (the member
and the folder or archive that holds it) in one ``ConfigError``. The limit is ``data.max_image_pixels``, for
data whose images really are that large. The header is read first: a refused image is never decoded.
"""

from __future__ import annotations

import io
import warnings
import zipfile

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


def open_rgb(data: bytes, name: str, where: str, max_pixels: int) -> Image.Image:
    """The image in `data` as RGB, once its header's size is within `max_pixels`; else a ConfigError naming it."""
    Image.MAX_IMAGE_PIXELS = max(max_pixels, 1)  # PIL's own bomb check follows the configured limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below says it plainly
            image = Image.open(io.BytesIO(data))  # the header only
        width, height = image.size
        if width * height > max_pixels:
            raise _too_large(name, where, f"is {width}×{height} pixels ({width * height / 1e6:.0f} megapixels)",
                             max_pixels)
        return image.convert("RGB")
    except Image.DecompressionBombError as e:  # PIL found it first (a frame larger than the header said)
        raise _too_large(name, where, f"is a decompression bomb ({e})", max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{name!r} in {where} is not a readable image ({type(e).__name__}: {reason}); "
                          "remove it or replace it with a whole image") from None
