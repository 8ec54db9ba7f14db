"""An ``image_url`` to checked image bytes.

``data:`` URLs carrying base64 PNG, JPEG or WebP are always read. ``http(s)://`` and ``file:``
URLs are refused unless the operator allows them (``--allow-url-images``, ``--allow-file-images``):
a web page that can reach the server must not make it fetch from the network or read local files.
Whatever the source, the bytes must be an image of an accepted format within the pixel limit —
checked here, before the request is queued, so the answer is a clear 400 and never work on the
engine's thread. An image that passed is remembered by its digest (``CheckedImages``): every turn
of a conversation sends its image again, and decoding a photo again only to check it costs more
than the server's whole share of the answer's first token.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass

from tinyv.serve.openai_shapes import ApiError

FORMATS = ("PNG", "JPEG", "WEBP")
PARAM = "messages"  # where an image_url sits in the request (OpenAI's `param`)


@dataclass(frozen=True)
class ImagePolicy:
    """What the operator allows: sources beyond ``data:`` URLs and the size of an image."""

    allow_http: bool = False
    allow_file: bool = False
    max_pixels: int = 40_000_000
    max_bytes: int = 20 << 20
    fetch_timeout_s: float = 30.0


class CheckedImages:
    """``check_image`` for any thread, remembering the last ``size`` images that passed, by digest
    and pixel limit (all the check depends on)."""

    def __init__(self, size: int = 256):
        self.size = size
        self._passed: OrderedDict[tuple[bytes, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, data: bytes, max_pixels: int) -> None:
        key = (hashlib.sha256(data).digest(), max_pixels)
        with self._lock:
            if key in self._passed:
                self._passed.move_to_end(key)
                return
        check_image(data, max_pixels)
        with self._lock:
            self._passed[key] = None
            while len(self._passed) > self.size:
                self._passed.popitem(last=False)


def load_image(url: str, policy: ImagePolicy, checked: CheckedImages | None = None) -> bytes:
    """The bytes of the image at ``url``, checked (an ``ApiError`` 400 says what is wrong); through
    ``checked`` when given, so an image seen before is not decoded again."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        data = _from_data_url(url)
    elif scheme in ("http", "https"):
        if not policy.allow_http:
            raise ApiError(400, "http(s) image URLs are turned off on this server; send the image inline as a "
                                "data: URL (data:image/png;base64,...), or start the server with --allow-url-images",
                           PARAM, "image_url_not_allowed")
        data = _fetch(url, policy)
    elif scheme == "file":
        if not policy.allow_file:
            raise ApiError(400, "file: image URLs are turned off on this server; send the image inline as a "
                                "data: URL, or start the server with --allow-file-images", PARAM,
                           "image_url_not_allowed")
        data = _read_file(url, policy)
    else:
        raise ApiError(400, f"an image_url must be a data: URL with a base64 PNG, JPEG or WebP image, got "
                            f"{url[:40]!r}", PARAM, "invalid_image_url")
    (check_image if checked is None else checked.check)(data, policy.max_pixels)
    return data


def _from_data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise ApiError(400, "an image data: URL must be base64, like data:image/png;base64,iVBOR...", PARAM,
                       "invalid_image_url")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image's data: URL is not valid base64", PARAM, "invalid_image") from None


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=policy.fetch_timeout_s) as r:  # noqa: S310 - operator allowed
            data = r.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"could not fetch the image at {url}: {e}", PARAM, "image_fetch_failed") from None
    if len(data) > policy.max_bytes:
        raise ApiError(400, f"the image at {url} is over {policy.max_bytes} bytes", PARAM, "image_too_large")
    return data


def _read_file(url: str, policy: ImagePolicy) -> bytes:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ApiError(400, f"a file: URL must name a local file (file:///path), got {url}", PARAM,
                       "invalid_image_url")
    path = urllib.request.url2pathname(parts.path)
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise ApiError(400, f"cannot read the image file {path}: {e.strerror or e}", PARAM, "image_fetch_failed") \
            from None
    if len(data) > policy.max_bytes:
        raise ApiError(400, f"the image file {path} is over {policy.max_bytes} bytes", PARAM, "image_too_large")
    return data


def check_image(data: bytes, max_pixels: int) -> None:
    """``data`` must decode as a PNG, JPEG or WebP image of at most ``max_pixels`` pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt, (w, h) = img.format, img.size
            if fmt not in FORMATS:
                raise ApiError(400, f"the image is {fmt}; send PNG, JPEG or WebP", PARAM, "invalid_image")
            if w * h > max_pixels:
                raise ApiError(400, f"the image is {w}x{h} = {w * h} pixels, over this server's limit of "
                                    f"{max_pixels}; send a smaller one (the model sees it at a few hundred pixels "
                                    "square anyway)", PARAM, "image_too_large")
            img.load()  # a truncated or corrupt file fails here, not on the engine's thread
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(400, f"the image has far too many pixels (the limit is {max_pixels})", PARAM,
                       "image_too_large") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bytes that are not an image
        raise ApiError(400, f"the image_url's data is not a readable PNG, JPEG or WebP image ({type(e).__name__})",
                       PARAM, "invalid_image") from None
