"""Writing ONNX files whose weights are too large to hold twice.

``TensorWriter`` turns arrays into initializers, the large ones appended to one page-aligned data
file as they come; ``save_model`` puts nodes and initializers into a model and checks the file;
``inline_if_small`` folds the data file back into the ``.onnx`` by writing protobuf's wire format
field by field, one tensor at a time.
"""
from __future__ import annotations

import os

import numpy as np

_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx file (onnx's own default)
_ALIGN = 4096  # page-aligned offsets let ONNX Runtime map the data file instead of reading it


class TensorWriter:
    """Makes initializers: tensors of 1 KiB or more go to one data file next to the model
    (page-aligned, written as they come), smaller ones stay inline."""

    def __init__(self, model_path: str):
        self.data_path = model_path + ".data"
        self.location = os.path.basename(self.data_path)
        self.file = None

    def add(self, name: str, arr: np.ndarray):
        """The initializer ``name`` holding ``arr`` (its bytes written to the data file if large)."""
        from onnx import TensorProto, helper

        arr = np.ascontiguousarray(arr)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.dims.extend(arr.shape)
        if arr.nbytes < _EXTERNAL_MIN_BYTES:
            t.raw_data = arr.tobytes()
            return t
        if self.file is None:
            self.file = open(self.data_path, "wb")
        offset = self.file.seek(0, os.SEEK_END)
        offset += -offset % _ALIGN
        self.file.seek(offset)
        self.file.write(arr.reshape(-1).view(np.uint8))  # no copy of the tensor
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=key, value=value)
        return t

    def close(self) -> None:
        """Close the data file (if one was started)."""
        if self.file is not None:
            self.file.close()
            self.file = None


def save_model(proto, nodes, initializers, path: str) -> None:
    """Replace ``proto``'s nodes and initializers, save it to ``path`` and check it."""
    import onnx

    graph = proto.graph
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.value_info[:]
    onnx.save(proto, path)
    onnx.checker.check_model(path)


def inline_if_small(path: str, threshold: int) -> None:
    """Pull the external data back into the .onnx file when the whole model fits ``threshold``.

    The file is written field by field in protobuf's wire format, one tensor at a time: going
    through ``onnx.load``/``onnx.save`` would hold the weights in memory twice (message + bytes).
    """
    import onnx

    data = path + ".data"
    if not os.path.exists(data):
        return
    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    external = [t for t in graph.initializer if is_external(t)]
    if os.path.getsize(path) + sum(int(external_field(t, "length")) for t in external) > threshold:
        return
    heads = []  # (tensor without its data, offset, length, serialized size with the data)
    for t in external:
        head = onnx.TensorProto()
        head.CopyFrom(t)
        head.ClearField("external_data")
        head.ClearField("data_location")
        offset, length = int(external_field(t, "offset")), int(external_field(t, "length"))
        heads.append((head, offset, length, head.ByteSize() + _field_len(_RAW_DATA, length)))
    inline = [t for t in graph.initializer if not is_external(t)]
    del graph.initializer[:]
    graph.initializer.extend(inline)
    graph_bytes = graph.SerializeToString()
    graph_len = len(graph_bytes) + sum(_field_len(_INITIALIZER, size) for *_, size in heads)
    model.ClearField("graph")
    tmp = path + ".inline"
    with open(tmp, "wb") as out, open(data, "rb") as src:
        out.write(model.SerializeToString())
        out.write(_key(_GRAPH) + _varint(graph_len))
        out.write(graph_bytes)
        for head, offset, length, size in heads:
            out.write(_key(_INITIALIZER) + _varint(size))
            out.write(head.SerializeToString())
            out.write(_key(_RAW_DATA) + _varint(length))
            src.seek(offset)
            while length:
                chunk = src.read(min(length, 64 << 20))
                out.write(chunk)
                length -= len(chunk)
    os.replace(tmp, path)
    os.remove(data)


# protobuf field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _field_len(field: int, length: int) -> int:
    return len(_key(field)) + len(_varint(length)) + length


def is_external(t) -> bool:
    """Whether initializer ``t`` keeps its bytes in a data file."""
    from onnx import TensorProto

    return t.data_location == TensorProto.EXTERNAL


def external_field(t, key: str) -> str:
    """``location``, ``offset`` or ``length`` of an external initializer."""
    return next(e.value for e in t.external_data if e.key == key)


def tensor_nbytes(t) -> int:
    """The bytes of initializer ``t``'s values, without loading them."""
    if is_external(t):
        return int(external_field(t, "length"))
    return len(t.raw_data) or 8 * int(np.prod(t.dims))  # typed fields: an upper bound is enough


def weight_bytes(path: str) -> int:
    """The bytes of all of the model's initializers, without loading them."""
    import onnx

    return sum(tensor_nbytes(t) for t in onnx.load(path, load_external_data=False).graph.initializer)
