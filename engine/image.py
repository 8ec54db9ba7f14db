"""Image loading and BLIP-2 eval pre-processing (SPEC §1, detail 1)."""
from __future__ import annotations

import io
import os

from tinyv.errors import TinyVError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(image):
    """A PIL image from a path, bytes or a PIL image; a clear error for anything else."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        src, name = io.BytesIO(image), "the given bytes"
    elif isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if not os.path.exists(name):
            raise TinyVError(f"image not found: {name}")
        if os.path.isdir(name):
            raise TinyVError(f"{name} is a folder, not an image file")
        src = name
    else:
        raise TinyVError(f"expected an image path, bytes or PIL.Image, got {type(image).__name__}")
    try:
        img = Image.open(src)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise TinyVError(f"cannot read {name} as an image ({e}); give a JPEG, PNG or other image file") from None
    return img


def preprocess(image, size: int):
    """``Blip2ImageEvalProcessor``: RGB, straight BICUBIC resize to size×size, /255, CLIP mean/std.

    Returns a float32 tensor [1, 3, size, size].
    """
    import numpy as np
    import torch
    from PIL import Image

    img = open_image(image).convert("RGB").resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [S, S, 3]
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0).contiguous()
