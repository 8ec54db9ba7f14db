"""Image loading and BLIP-2 eval pre-processing (SPEC §1, detail 1).

Images are untrusted input. Their size is checked from the header before any pixel is decoded (a
small file can declare gigapixels: a decompression bomb); 16-bit and float images are scaled to 8
bits (Pillow's ``convert("RGB")`` clips them: a 16-bit grey photo became white, in the original
TinyGPT-V code too); a very large image is resized without a second full-size copy, and a very
large JPEG is decoded at a reduced scale.
"""
from __future__ import annotations

import io
import os

from tinyv.errors import TinyVError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

MAX_PIXELS_ENV = "TINYV_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own hard limit by default (2 x PIL.Image.MAX_IMAGE_PIXELS)
# JPEGs over this many pixels are decoded at 1/2 .. 1/8 scale, still at least DRAFT_MARGIN times the
# model's input per side, so that the bicubic resize, not the decoder's scaling, shapes the result
# (measured on an 8000x6000 photo at 448: at most 2 grey levels apart, 0.24 on average)
DRAFT_OVER_PIXELS = 32_000_000
DRAFT_MARGIN = 4
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def max_pixels() -> int:
    """The largest image (width x height) tinyv decodes: ``$TINYV_MAX_IMAGE_PIXELS`` or the default."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise TinyVError(f"{MAX_PIXELS_ENV} must be a whole number of pixels, e.g. 400000000; got {raw!r}")
    return n


def _too_large(name: str, pixels: int, limit: int, size: str = "") -> TinyVError:
    return TinyVError(
        f"{name} is {size}{pixels:,} pixels, over the limit of {limit:,} (a guard against decompression "
        f"bombs); if you trust it, set {MAX_PIXELS_ENV}={pixels} to allow it"
    )


def _pillow_refused(name: str, error: Exception, limit: int) -> TinyVError:
    """Pillow's own DecompressionBombError (over twice PIL.Image.MAX_IMAGE_PIXELS), as tinyv's."""
    import re

    from PIL import Image

    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(found.group(1)) if found else 0
    if pixels > limit or not found:
        return _too_large(name, pixels, limit) if found else _unreadable(name, error)
    return TinyVError(f"{name} is {pixels:,} pixels, within {MAX_PIXELS_ENV} but over Pillow's own limit of "
                      f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,}; raise PIL.Image.MAX_IMAGE_PIXELS as well "
                      "(the tinyv command does)")


def _source(image):
    """(what Pillow opens, the name used in messages)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return io.BytesIO(image), "the given bytes"
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if not os.path.exists(name):
            raise TinyVError(f"image not found: {name}")
        if os.path.isdir(name):
            raise TinyVError(f"{name} is a folder, not an image file")
        return name, name
    raise TinyVError(f"expected an image path, bytes or PIL.Image, got {type(image).__name__}")


def _unreadable(name: str, e: BaseException) -> TinyVError:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        reason = "not a format Pillow knows"  # its message names a BytesIO object
    else:
        reason = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
    return TinyVError(f"cannot read {name} as an image ({reason}); give a JPEG, PNG or other image file")


def _open_header(src, name: str):
    """The image with only its header read; its size checked against the limit."""
    from PIL import Image

    limit = max_pixels()
    try:
        img = Image.open(src)
    except Image.DecompressionBombError as e:  # Pillow checks first, from the same header
        raise _pillow_refused(name, e, limit) from None
    except MemoryError:
        raise TinyVError(f"{name} is too large to open in the memory available") from None
    except Exception as e:  # Pillow's parsers raise many types on malformed files: all mean "not an image"
        raise _unreadable(name, e) from None
    width, height = img.size
    if width * height > limit:
        img.close()
        raise _too_large(name, width * height, limit, f"{width}x{height} = ")
    return img


def check_image(image) -> None:
    """A clear error for a missing, unreadable or too large image, decoding no pixel."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return
    _open_header(*_source(image)).close()


def open_image(image, draft_to: int | None = None):
    """A decoded PIL image from a path, bytes or a PIL image; a clear error for anything else.

    ``draft_to``: the size it will be resized to; a JPEG over ``DRAFT_OVER_PIXELS`` is then decoded
    at a reduced scale (at least ``DRAFT_MARGIN`` times that size per side).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        img, name = image, "the given image"  # opened by the caller, maybe not decoded yet
    else:
        src, name = _source(image)
        img = _open_header(src, name)
    try:
        if draft_to and img is not image and img.format == "JPEG" and img.width * img.height > DRAFT_OVER_PIXELS:
            img.draft("RGB", (draft_to * DRAFT_MARGIN, draft_to * DRAFT_MARGIN))
        img.load()
    except MemoryError:
        raise TinyVError(f"{name} is too large to decode in the memory available") from None
    except Exception as e:
        raise _unreadable(name, e) from None
    return img


def to_8bit(img):
    """``img`` with 8-bit channels: 16-bit grey scaled by 255/65535; 32-bit integer and float
    images by their range ([0, 1] or [0, 255] or [0, 65535] as found, else min to max)."""
    if img.mode not in SIXTEEN_BIT_MODES + ("I", "F"):
        return img
    import numpy as np
    from PIL import Image

    arr = np.asarray(img)
    if img.mode in SIXTEEN_BIT_MODES:
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535
    else:
        with np.errstate(invalid="ignore"):  # a signalling NaN in a float image
            arr = arr.astype(np.float64)
        finite = np.isfinite(arr)
        arr = np.where(finite, arr, 0.0)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        if lo >= 0 and hi <= 1 and img.mode == "F":
            scale, offset = 255.0, 0.0
        elif lo >= 0 and hi <= 255:
            scale, offset = 1.0, 0.0
        elif lo >= 0 and hi <= 65535:
            scale, offset = 255.0 / 65535, 0.0
        else:
            scale, offset = 255.0 / (hi - lo), lo
        out = np.rint((arr - offset) * scale)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))  # [H, W] uint8: mode L


def resize_rgb(img, size: int):
    """RGB, straight BICUBIC resize to size x size: the same pixels as
    ``img.convert("RGB").resize(...)`` but without a converted full-size copy where that is exact
    (grey and RGB resize first; RGBA band by band)."""
    from PIL import Image

    img = to_8bit(img)
    square = (size, size)
    try:
        if img.mode in ("RGB", "L"):
            return img.resize(square, Image.BICUBIC).convert("RGB")
        if img.mode in ("RGBA", "RGBX"):
            return Image.merge("RGB", [img.getchannel(band).resize(square, Image.BICUBIC) for band in "RGB"])
        return img.convert("RGB").resize(square, Image.BICUBIC)
    except MemoryError:
        raise TinyVError("the image is too large to resize in the memory available") from None
    except (ValueError, OSError) as e:  # e.g. a mode Pillow cannot convert to RGB
        raise TinyVError(f"cannot convert a {img.mode} image to RGB ({e}); save it as an RGB JPEG or PNG") from None


def preprocess(image, size: int):
    """``Blip2ImageEvalProcessor``: RGB, straight BICUBIC resize to size×size, /255, CLIP mean/std.

    Returns a float32 tensor [1, 3, size, size].
    """
    import numpy as np
    import torch

    img = resize_rgb(open_image(image, draft_to=size), size)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [S, S, 3]
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0).contiguous()
