"""Memory-mapped safetensors: the bundle's LLM weights are read from the page cache, not copied.

Tensors are views of one private, read-only-in-practice file mapping (``UntypedStorage.from_file``),
so loading costs no anonymous memory and several processes share the pages. A tensor whose offset
is not aligned for its dtype (safetensors does not promise alignment) is copied instead.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from tinyv.errors import TinyVError

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}


def mmap_safetensors(path: str) -> dict[str, torch.Tensor]:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise TinyVError(f"{path} is not a readable safetensors file ({e}); re-export the bundle") from None
    base = 8 + n
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,), (1,))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise TinyVError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if base + end > size:
            raise TinyVError(f"{path} is truncated (tensor {name} runs past the end); re-export the bundle")
        chunk = raw[base + start : base + end]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if (base + start) % itemsize:
            chunk = chunk.clone()  # misaligned for this dtype: copy
        out[name] = chunk.view(dtype).reshape(info["shape"])
    return out
