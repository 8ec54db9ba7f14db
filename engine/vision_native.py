"""A vision graph with its ViT trunk on tinyv's kernels and the rest in ONNX Runtime.

The bundle's ``vision.onnx`` stays the format. At open, the trunk — the run of pre-norm blocks
that ``tinyv export`` writes for EVA ViT-g (LayerNorm → the qkv Linear → fused
``MultiHeadAttention`` → … → erf GELU → … → residual Add; Linears int8 as DynamicQuantizeLinear →
MatMulInteger → …, or fp32 MatMuls) — is recognised node by node; its weights go to the C trunk
(``kernels/vit.py``), and what comes before (the patch embedding) and after it (ln_vision,
Q-Former, projection) run as two ONNX Runtime sessions cut from the same graph, reading their
weights from the same data file.

Why (full size, 2 threads, the AVX-512 EPYC): ONNX Runtime runs the trunk's int8 MatMuls at 80-86 %
of the VNNI peak and its attention in fp32 (34.6 ms a layer), and has no bf16 MatMul on x86 (an
fp32 graph takes 12 s); the C trunk runs int8 GEMMs at 93 %, attention in 17 ms, and fp32 weights
in bf16 products (the high-precision choice, ``TINYV_VISION=onnxruntime`` for exact fp32). A graph
that does not match exactly (another layout, a CPU without AVX-512 BF16) is run whole by ONNX
Runtime as before: :func:`open_native` says why.
"""
from __future__ import annotations

import os

import numpy as np

from tinyv.engine.vision_onnx import open_session
from tinyv.errors import TinyVError
from tinyv.kernels.vit import TrunkLinear, TrunkBlock, TrunkDims, VitTrunk, trunk_supported

SQRT2 = 1.4142135623730951
INLINE_BYTES = 1 << 16  # a cut-out piece's external weights up to this size are copied into it
SETTINGS = ("auto", "onnxruntime")


def check_vision_setting() -> str:
    """``TINYV_VISION``: ``auto`` (default: the C trunk where the graph and the CPU allow) or
    ``onnxruntime`` (the whole graph in ONNX Runtime, for comparisons); anything else is an error."""
    raw = os.environ.get("TINYV_VISION", "auto")
    choice = raw.strip().lower() or "auto"
    if choice not in SETTINGS:
        raise TinyVError(f"TINYV_VISION={raw!r} is not one of {', '.join(SETTINGS)}: unset it or set one of those")
    return choice


def describe(session) -> str:
    """One line for ``tinyv bench``: what runs an open vision graph."""
    if isinstance(session, NativeVision):
        d = session.trunk.dims
        how = "bf16 GEMMs and attention" if d.bf16 else "int8 VNNI GEMMs, int8 scores, bf16 P·V"
        return f"C ViT trunk ({d.blocks} blocks, {how}) + ONNX Runtime (patch embedding, Q-Former)"
    return "ONNX Runtime (whole graph)"


class _Graph:
    """Who produces and who reads each value of a graph, and its constant tensors' values."""

    def __init__(self, model, folder: str, data_file: str | None):
        from onnx import numpy_helper

        self.model, self.folder, self.data_file = model, folder, data_file
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer, self.consumers, self.constants = {}, {}, {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.numpy_helper = numpy_helper

    def only_consumer(self, name: str, op_type: str):
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None

    def array(self, name: str) -> np.ndarray | None:
        """A constant's value: a Constant node's, an inline initializer's, or a read-only mapping
        of an external one's bytes (only from the bundle's own data file, and inside it)."""
        if name in self.constants:
            return self.constants[name]
        t = self.inits.get(name)
        if t is None:
            return None
        if t.data_location != t.EXTERNAL:
            return self.numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        if self.data_file is None or info.get("location") != self.data_file:
            raise TinyVError(f"vision graph weight {name} points outside the bundle's data file; re-export the bundle")
        dtype = self.numpy_helper.helper.tensor_dtype_to_np_dtype(t.data_type)
        shape = tuple(t.dims)
        offset, count = int(info.get("offset", 0)), int(np.prod(shape, dtype=np.int64))
        path = os.path.join(self.folder, self.data_file)
        if offset < 0 or offset + count * dtype.itemsize > os.path.getsize(path):
            raise TinyVError(f"vision graph weight {name} lies past the end of {self.data_file}; re-copy the bundle")
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def attr(self, node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _scalar(g: _Graph, name: str) -> float | None:
    v = g.array(name)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _other_input(node, name: str) -> str:
    return node.input[1] if node.input[0] == name else node.input[0]


def _linear(g: _Graph, x: str) -> tuple[TrunkLinear, str] | None:
    """A weight Linear reading ``x``: int8 (:func:`_int8_linear`) or fp32 (MatMul → Add)."""
    return _int8_linear(g, x) or _fp32_linear(g, x)


def _fp32_linear(g: _Graph, x: str) -> tuple[TrunkLinear, str] | None:
    """x → MatMul(fp32 [K, N]) → Add(bias): the weights (scale None) and the output's name."""
    mm = g.only_consumer(x, "MatMul")
    w = g.array(mm.input[1]) if mm is not None and mm.input[0] == x else None
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return None
    add = g.only_consumer(mm.output[0], "Add")
    bias = g.array(_other_input(add, mm.output[0])) if add is not None else None
    if bias is None or bias.shape != (w.shape[1],) or bias.dtype != np.float32:
        return None
    return TrunkLinear(w, None, bias), add.output[0]


def _int8_linear(g: _Graph, x: str) -> tuple[TrunkLinear, str] | None:
    """x → DynamicQuantizeLinear → MatMulInteger (int8 [K, N], zero points 0) → Cast → Mul(scales,
    per column or per tensor) → Add(bias): the weights and the output's name."""
    dql = g.only_consumer(x, "DynamicQuantizeLinear")
    if dql is None or len(dql.output) != 3:
        return None
    xq, xs, xz = dql.output
    mmi = g.only_consumer(xq, "MatMulInteger")
    smul = g.only_consumer(xs, "Mul")
    if mmi is None or smul is None or len(mmi.input) != 4 or list(mmi.input[0:1]) + [mmi.input[2]] != [xq, xz]:
        return None
    w, wz, wscale = g.array(mmi.input[1]), g.array(mmi.input[3]), g.array(_other_input(smul, xs))
    if w is None or w.dtype != np.int8 or w.ndim != 2 or wz is None or np.any(wz) or wscale is None:
        return None
    N = w.shape[1]
    if wscale.dtype != np.float32 or wscale.shape not in ((N,), (1,), ()):
        return None
    wscale = np.broadcast_to(wscale.reshape(-1), (N,))  # per tensor or per column
    cast = g.only_consumer(mmi.output[0], "Cast")
    if cast is None or g.attr(cast, "to") != 1:
        return None
    mul = g.only_consumer(cast.output[0], "Mul")
    if mul is None or _other_input(mul, cast.output[0]) != smul.output[0]:
        return None
    add = g.only_consumer(mul.output[0], "Add")
    bias = g.array(_other_input(add, mul.output[0])) if add is not None else None
    if bias is None or bias.shape != (N,):
        return None
    return TrunkLinear(w, wscale, bias), add.output[0]


def _layernorm(g: _Graph, node) -> tuple[np.ndarray, np.ndarray | None, float] | None:
    if node is None or node.op_type != "LayerNormalization" or g.attr(node, "axis", -1) != -1:
        return None
    w = g.array(node.input[1])
    b = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return (None if w is None else (w, b, float(g.attr(node, "epsilon", 1e-5))))


def _gelu(g: _Graph, h: str) -> str | None:
    """h → Div(√2) → Erf → Add(1) → Mul(h, ·) → Mul(0.5): exact GELU; its output's name."""
    div = g.consumers.get(h, [])
    div = [n for n in div if n.op_type == "Div"]
    if len(div) != 1 or div[0].input[0] != h or abs((_scalar(g, div[0].input[1]) or 0) - SQRT2) > 1e-6:
        return None
    erf = g.only_consumer(div[0].output[0], "Erf")
    add = erf and g.only_consumer(erf.output[0], "Add")
    if add is None or _scalar(g, _other_input(add, erf.output[0])) != 1.0:
        return None
    mul = g.only_consumer(add.output[0], "Mul")
    if mul is None or _other_input(mul, add.output[0]) != h:
        return None
    half = g.only_consumer(mul.output[0], "Mul")
    if half is None or _scalar(g, _other_input(half, mul.output[0])) != 0.5:
        return None
    return half.output[0]


def _residual(g: _Graph, x: str, branch: str) -> str | None:
    add = g.only_consumer(branch, "Add")
    return add.output[0] if add is not None and _other_input(add, branch) == x else None


def _block(g: _Graph, x: str) -> tuple[TrunkBlock, str, dict] | None:
    """One pre-norm block read from value ``x``: its weights, its output and its shape facts."""
    readers = g.consumers.get(x, [])
    norms = [n for n in readers if n.op_type == "LayerNormalization"]
    if len(readers) != 2 or len(norms) != 1:
        return None
    ln1 = _layernorm(g, norms[0])
    qkv = ln1 and _linear(g, norms[0].output[0])
    if qkv is None:
        return None
    split = g.only_consumer(qkv[1], "Split")
    if split is None or len(split.output) != 3 or g.attr(split, "axis", 0) not in (-1, 2) or len(split.input) > 1:
        return None
    mha = g.only_consumer(split.output[0], "MultiHeadAttention")
    if mha is None or mha.domain != "com.microsoft" or list(mha.input) != list(split.output) or len(mha.output) != 1:
        return None
    heads, scale = g.attr(mha, "num_heads"), g.attr(mha, "scale")
    proj = _linear(g, mha.output[0])
    x1 = proj and _residual(g, x, proj[1])
    if x1 is None:
        return None
    norms2 = [n for n in g.consumers.get(x1, []) if n.op_type == "LayerNormalization"]
    ln2 = _layernorm(g, norms2[0]) if len(norms2) == 1 and len(g.consumers[x1]) == 2 else None
    fc1 = ln2 and _linear(g, norms2[0].output[0])
    act = fc1 and _gelu(g, fc1[1])
    fc2 = act and _linear(g, act)
    out = fc2 and _residual(g, x1, fc2[1])
    if out is None or ln1[2] != ln2[2] or not heads or not scale:
        return None
    block = TrunkBlock(ln1[0], ln1[1], qkv[0], proj[0], ln2[0], ln2[1], fc1[0], fc2[0])
    fp32 = {lin.scale is None for lin in (block.qkv, block.proj, block.fc1, block.fc2)}
    if len(fp32) != 1:  # int8 and fp32 Linears mixed: not one of the trunk's precisions
        return None
    return block, out, {"heads": int(heads), "scale": float(scale), "eps": ln1[2], "bf16": fp32.pop()}


def find_trunk(g: _Graph) -> tuple[str, str, TrunkDims, list[TrunkBlock]] | None:
    """The longest run of blocks from the first LayerNormalization's input: (its input value, its
    output value, dims, blocks), or None if the graph has no such run."""
    first = next((n for n in g.model.graph.node if n.op_type == "LayerNormalization"), None)
    if first is None:
        return None
    start = x = first.input[0]
    blocks, facts = [], []
    while (found := _block(g, x)) is not None and found[2] == (facts or [found[2]])[0]:
        blocks.append(found[0])
        facts.append(found[2])
        x = found[1]
    if not blocks:
        return None
    b0 = blocks[0]
    D, F = b0.qkv.weight.shape[0], b0.fc1.weight.shape[1]
    heads = facts[0]["heads"]
    if D % heads or b0.qkv.weight.shape[1] != 3 * D or any(b.fc1.weight.shape != (D, F) for b in blocks):
        return None
    dims = TrunkDims(D, heads, D // heads, F, len(blocks), facts[0]["eps"], facts[0]["scale"], facts[0]["bf16"])
    return start, x, dims, blocks


def _nodes_between(g: _Graph, inputs: list[str], outputs: list[str]) -> list | None:
    """The nodes that compute ``outputs`` from ``inputs`` and constants, in graph order; None if
    that needs a value nothing produces."""
    need, nodes, seen = list(outputs), {}, set(inputs)
    while need:
        name = need.pop()
        if name in seen or name in g.inits or not name:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None:
            return None
        if id(node) not in nodes:
            nodes[id(node)] = node
            need.extend(node.input)
    order = {id(n): i for i, n in enumerate(g.model.graph.node)}
    return sorted(nodes.values(), key=lambda n: order[id(n)])


def _sub_model(g: _Graph, nodes: list, inputs: list[str], outputs: list[str], data_name: str | None):
    """``nodes`` as a model from ``inputs`` to ``outputs`` whose external weights point at the
    data file under the name ``data_name`` (its real name: in a hub cache the bundle's file is a
    link into ``blobs/``, and ONNX Runtime refuses data that resolves outside the folder it is told)."""
    from onnx import TensorProto, helper

    used = {i for n in nodes for i in n.input}
    types = {v.name: v for v in list(g.model.graph.input) + list(g.model.graph.output) + list(g.model.graph.value_info)}

    def info(name):
        return types.get(name) or helper.make_tensor_value_info(name, 1, None)

    def weight(t):
        if t.data_location != t.EXTERNAL:
            return t
        value = g.array(t.name)
        if value.nbytes <= INLINE_BYTES:  # shape constants among them: ONNX's shape inference reads no files
            return g.numpy_helper.from_array(np.array(value), t.name)
        moved = TensorProto()
        moved.CopyFrom(t)
        for entry in moved.external_data:
            if entry.key == "location":
                entry.value = data_name
        return moved

    graph = helper.make_graph(nodes, "part", [info(i) for i in inputs], [info(o) for o in outputs],
                              [weight(t) for name, t in g.inits.items() if name in used])
    return helper.make_model(graph, opset_imports=list(g.model.opset_import), ir_version=g.model.ir_version)


class NativeVision:
    """The vision graph as stem (ONNX Runtime) → C trunk → tail (ONNX Runtime); ``run`` takes and
    returns what an ``onnxruntime.InferenceSession``'s does, so the engine uses either alike."""

    def __init__(self, stem, trunk: VitTrunk, tail):
        self.stem, self.trunk, self.tail = stem, trunk, tail

    def run(self, output_names, feed: dict, run_options=None) -> list:
        """``run_options`` (the whole graph's arena shrinkage) is not for these arena-less sessions."""
        (x,) = self.stem.run(None, feed)
        x = np.stack([self.trunk.forward(image) for image in x])  # [batch, tokens, width]: one sequence each
        return self.tail.run(output_names, {self.tail.get_inputs()[0].name: x})

    def get_inputs(self):
        return self.stem.get_inputs()


def open_native(path: str, data_file: str | None, threads: int, kernels_setting: str | None = None
                ) -> tuple[NativeVision | None, str]:
    """The graph at ``path`` with its trunk on the C kernels, or (None, why not)."""
    import onnx

    from tinyv.kernels import native

    kernels = native.open_kernels(threads, kernels_setting)
    if not trunk_supported(kernels):
        return None, "the C ViT trunk needs AVX-512 VNNI and BF16"
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # a damaged graph: ONNX Runtime gives the user-facing error later
        return None, f"unreadable graph ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    g = _Graph(model, os.path.dirname(os.path.abspath(path)), data_file)
    found = find_trunk(g)
    if found is None:
        return None, "no ViT trunk the C kernels know in the graph (another layout)"
    start, end, dims, blocks = found
    inputs, outputs = [i.name for i in model.graph.input if i.name not in g.inits], [o.name for o in model.graph.output]
    stem, trunk_nodes, tail = (_nodes_between(g, inputs, [start]), _nodes_between(g, [start], [end]),
                               _nodes_between(g, [end], outputs))
    if stem is None or tail is None or trunk_nodes is None:
        return None, "the graph does not cut cleanly around its trunk"
    inner = {id(n) for n in trunk_nodes if n.op_type != "Constant"}
    if any(id(n) in inner for n in stem + tail):  # the rest reads a value inside the trunk
        return None, "the graph does not cut cleanly around its trunk"
    del found
    try:  # each block's mapped weights dropped once copied: one block's pages resident at a time
        trunk = VitTrunk(kernels, dims, (blocks.pop(0) for _ in range(dims.blocks)))
    except ValueError as e:  # weights of other shapes than the first block's: ONNX Runtime judges the graph
        return None, f"the trunk's weights do not fit it ({e})"
    real = os.path.realpath(os.path.join(g.folder, data_file)) if data_file else g.folder
    folder, name = os.path.dirname(real), os.path.basename(real) if data_file else None
    # no arenas: what a run takes is given back at once (an arena kept ~20 MB of the tail's)
    stem_session = open_session(_sub_model(g, stem, inputs, [start], name).SerializeToString(), threads=threads,
                                external_folder=folder, arena=False)
    tail_session = open_session(_sub_model(g, tail, [end], outputs, name).SerializeToString(), threads=threads,
                                external_folder=folder, arena=False)
    return NativeVision(stem_session, trunk, tail_session), ""


def open_vision_graph(path: str, data_file: str | None, threads: int, providers, kernels_setting: str | None,
                      native: bool = True):
    """The vision graph ready to run: its trunk on the C kernels where ``native`` and the graph and
    CPU allow (:func:`open_native`), else the whole graph in ONNX Runtime on ``providers``."""
    if native:
        session, _ = open_native(path, data_file, threads, kernels_setting)
        if session is not None:
            return session
    return open_session(path, threads=threads, providers=providers)
