"""Property-based fuzzing of what users hand the engine: image bytes and question strings.

Every input gives an answer or a ``TinyVError`` whose message is one line, never another
exception, and the engine keeps serving: after each input a known image is captioned again, with
the same answer. Images: valid images of every Pillow mode at random sizes and contents, saved in
the formats that take them with random metadata (text chunks, EXIF, ICC profile, animation), the
PIL objects themselves, truncations and mutations of real PNG, JPEG, WebP, GIF, TIFF and BMP
files, declared sizes from 1 pixel to gigapixels, and random bytes. Questions: random Unicode with
lone surrogates, control characters and the prompt templates' own markers.

Bounded for CI (the built-in demo model, 2 new tokens, ``TINYV_FUZZ_EXAMPLES`` examples per test,
default 150, examples fixed by ``derandomize``); set ``TINYV_FUZZ_EXAMPLES=2000`` for a longer run.
"""
import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image, ImageDraw, PngImagePlugin

import tinyv
from tinyv import TinyVError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = int(os.environ.get("TINYV_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
NEW_TOKENS = 2
# a small pixel limit: a mutated header may declare any size, and an allowed one is allocated whole
PIXEL_LIMIT = 2_000_000

MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "I;16B", "I;16L", "I;16N", "F"]
FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP", None]  # None: the PIL image itself
MARKERS = ["<ImageHere>", "<Img>", "</Img>", "[vqa]", "[caption]", "[refer]", "###", "###Human:",
           "###Assistant:", "<s>", "</s>", "[INST]", "[/INST]", "<|endoftext|>", "{question}", "{}", "%s",
           "\x00", "\n", "\r\n", "\t", "\x1b[31m", "\u202e", "\ufeff", "\u2028", "\ud800", "\udcff"]


def _scene(size=(40, 30)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.ellipse((2, 5, 18, 25), fill=(220, 30, 30))
    d.rectangle((22, 8, 37, 24), fill=(30, 60, 220))
    return img


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


SEEDS = [_encoded(_scene(), "PNG"), _encoded(_scene(), "JPEG", quality=80),
         _encoded(_scene(), "JPEG", progressive=True), _encoded(_scene(), "WEBP"),
         _encoded(_scene(), "WEBP", lossless=True), _encoded(_scene().convert("P"), "GIF"),
         _encoded(_scene(), "GIF", save_all=True, append_images=[_scene().rotate(90)]),
         _encoded(_scene(), "TIFF"), _encoded(_scene(), "BMP")]


def _png_declaring(width: int, height: int, color_type: int) -> bytes:
    """A PNG whose header (with a valid checksum) declares the size, with a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 32)) + chunk(b"IEND", b"")


@st.composite
def valid_images(draw):
    """An image of any mode, size and content; encoded with random metadata, or the object."""
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    n = len(Image.new(mode, size).tobytes())
    img = Image.frombytes(mode, size, draw(st.binary(min_size=n, max_size=n)))
    fmt = draw(st.sampled_from(FORMATS))
    if fmt is None:
        return img
    kw = {}
    if draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))  # orientation, out of range too
        exif[0x010E] = draw(st.text(st.characters(max_codepoint=0xFF), max_size=20))  # description
        kw["exif"] = exif
    if draw(st.booleans()):
        kw["icc_profile"] = draw(st.binary(max_size=64))
    if fmt == "PNG" and draw(st.booleans()):
        info = PngImagePlugin.PngInfo()
        key = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), min_size=1, max_size=10))
        info.add_text(key, draw(st.text(max_size=40)), zip=draw(st.booleans()))  # iTXt if not Latin-1
        kw["pnginfo"] = info
    if fmt in ("GIF", "PNG", "WEBP", "TIFF") and draw(st.booleans()):
        kw.update(save_all=True, append_images=[img.transpose(Image.Transpose.ROTATE_180)])
    try:
        return _encoded(img, fmt, **kw)
    except Exception:  # a mode or a piece of metadata that format does not take
        try:
            return _encoded(img, fmt)
        except Exception:
            return img


@st.composite
def mutated_files(draw):
    """A real file truncated, with bytes flipped, inserted, deleted or overwritten."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
    return bytes(data)


declared_sizes = st.builds(_png_declaring, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1),
                           st.sampled_from([0, 2, 3, 4, 6]))
images = st.one_of(valid_images(), mutated_files(), declared_sizes, st.binary(max_size=256))

text_pieces = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),  # lone surrogates
    st.text(st.characters(max_codepoint=0x1F), max_size=5),  # control characters
    st.sampled_from(MARKERS),
)
questions = st.one_of(st.none(), st.lists(text_pieces, max_size=12).map("".join),
                      st.just("square " * 300))  # over the demo model's 256-token context


class Served:
    """The built-in model on a disk cache of its own, and its answer about a known image."""

    def __init__(self, cache_dir):
        self.engine = tinyv.load(cache_dir=cache_dir)
        self.known = _encoded(_scene(), "PNG")
        self.expected = self.check()

    def check(self) -> str:
        return self.engine.caption(self.known, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYV_MAX_IMAGE_PIXELS", str(PIXEL_LIMIT))
        yield Served(str(tmp_path_factory.mktemp("fuzz-cache")))


def _answer_or_one_line_error(served, image, question=None, **kw):
    try:
        text = "".join(s.text for s in served.engine.stream(image, question, max_new_tokens=NEW_TOKENS, **kw))
        assert isinstance(text, str)
    except TinyVError as e:
        message = str(e)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    assert served.check() == served.expected  # still serving, unchanged


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on odd files
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, before tinyv's own limit
@FUZZ
@given(image=images)
def test_any_image_bytes_answer_or_one_line_error(served, image):
    _answer_or_one_line_error(served, image)


@FUZZ
@given(question=questions, task=st.sampled_from(["caption", "vqa"]),
       raw=st.one_of(st.none(), st.lists(st.one_of(text_pieces, st.just("<ImageHere>")), max_size=6).map("".join)))
def test_any_question_answer_or_one_line_error(served, question, task, raw):
    _answer_or_one_line_error(served, served.known, question, task=task, prompt=raw)
