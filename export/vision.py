"""The vision side as one ONNX graph: pixels [B, 3, S, S] -> image embeddings [B, Q, hidden].

    info = export_vision(model, "bundle/", precision="int8")   # writes bundle/vision.onnx
    session = open_vision_session("bundle/vision.onnx", threads=2)
    embeds = session.run(["image_embeds"], {"pixel_values": pixels.numpy()})[0]

The graph is EVA ViT -> ln_vision -> Q-Former -> one affine map (``llama_proj2 ∘ llama_proj``
folded, SPEC §1.8). ``int8`` is ONNX Runtime dynamic quantization (``quantize_dynamic``) of every
weight MatMul with signed int8 weights (SPEC §5: unsigned weights ran 9x slower on the target
CPU). Every export is run on ``probe_images()`` and compared with the torch model before it is
moved into place; a failed export leaves nothing behind.

Memory (ViT-g is ~1B parameters, 4.4 GB in fp32, and the caller still holds the torch model):

* the graph is traced without weights; the weights are then written tensor by tensor from the
  model's own storage (each transposed copy lives only while it is written);
* ``quantize_dynamic`` keeps about three copies of the model it is given, so it is given the
  graph in pieces of at most ``QUANT_PIECE_BYTES`` of weights, and the quantized pieces are
  joined again (a MatMul's dynamic quantization only depends on its own weight and input);
* torch reference embeddings are computed before any ONNX Runtime session exists; an fp32 graph
  of more than ``WHOLE_RUN_BYTES`` is checked piece by piece (the same pieces), after ONNX
  Runtime has loaded the whole file once without touching its weights.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from tinyv.errors import TinyVError
from tinyv.engine.image import preprocess
from tinyv.export.memory import release_memory

ONNX_FILE = "vision.onnx"
DATA_FILE = ONNX_FILE + ".data"
INPUT = "pixel_values"
OUTPUT = "image_embeds"
PRECISIONS = ("fp32", "int8")
MAX_PROTO = 2**31 - 1  # protobuf cannot serialize a larger message
QUANT_PIECE_BYTES = 256 << 20  # fp32 weights handed to one quantize_dynamic call
WHOLE_RUN_BYTES = 1 << 30  # fp32 graphs with more weights are checked piece by piece
_REFERENCE_BATCH = 4  # probes per torch forward
_VERIFY_BATCH = 2  # probes per ONNX Runtime run: exercises the batch axis; 4 at once cost ViT-g
# another 1.3 GB of activations and ran no faster
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx file (onnx's own default)
_ALIGN = 4096  # page-aligned offsets let ONNX Runtime map the data file instead of reading it
_RENAME = {"Transpose": ".T", "Cast": "", "Identity": ""}  # folded weight -> initializer name suffix
# fp32 differs from torch only by kernel rounding; int8 is checked loosely (random or real
# weights) — a broken graph scores near 0, not 0.9.
MIN_COSINE = {"fp32": 0.999, "int8": 0.9}


# -- the module that is exported ------------------------------------------------------------------
def fold_projections(proj1: nn.Linear, proj2: nn.Linear) -> nn.Linear:
    """One Linear equal to ``proj2(proj1(x))`` (no activation between them, SPEC §1.8).

    W = W2 @ W1 and b = W2 @ b1 + b2, computed in float64 and stored as float32.
    """
    if proj1.out_features != proj2.in_features:
        raise ValueError(f"cannot chain Linear({proj1.in_features}->{proj1.out_features}) into "
                         f"Linear({proj2.in_features}->{proj2.out_features})")
    with torch.no_grad():
        w1, w2 = proj1.weight.double(), proj2.weight.double()
        b1 = proj1.bias.double() if proj1.bias is not None else torch.zeros(proj1.out_features, dtype=torch.float64)
        b2 = proj2.bias.double() if proj2.bias is not None else torch.zeros(proj2.out_features, dtype=torch.float64)
        folded = nn.Linear(proj1.in_features, proj2.out_features, dtype=torch.float32)
        folded.weight.copy_((w2 @ w1).float())  # [out2, in1]
        folded.bias.copy_((w2 @ b1 + b2).float())
    folded.requires_grad_(False)
    return folded


class VisionEncoder(nn.Module):
    """Pixels [B, 3, S, S] -> image embeddings [B, num_queries, phi.hidden], fp32.

    Shares the ViT, ``ln_vision`` and Q-Former modules (and so their parameters) with ``model``;
    only the folded projection is new (phi.hidden x qformer.hidden floats).
    """

    def __init__(self, model):
        super().__init__()
        self.visual = model.visual
        self.ln_vision = model.ln_vision
        self.qformer = model.qformer
        self.proj = fold_projections(model.llama_proj, model.llama_proj2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.ln_vision(self.visual(pixel_values))  # [B, 1 + N, vision.width]
        return self.proj(self.qformer(tokens))  # [B, Q, hidden]


# -- probes ---------------------------------------------------------------------------------------
def probe_images(n: int = 4, size: int = 224, seed: int = 0) -> list:
    """``n`` deterministic RGB test images: shapes on coloured backgrounds, a gradient, noise.

    Flat areas, edges, smooth ramps and high frequencies: a graph that matches the torch model
    on these computes the same function.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        kind = i % 4
        if kind in (0, 3):  # shapes on a coloured background
            img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
            d = ImageDraw.Draw(img)
            for _ in range(3 + kind):
                x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
                w, h = (int(v) for v in rng.integers(size // 8, size // 3 + 1, 2))
                fill = tuple(int(c) for c in rng.integers(0, 256, 3))
                shape = int(rng.integers(0, 3))
                if shape == 0:
                    d.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
                elif shape == 1:
                    d.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
                else:
                    d.polygon([(x0, y0 + h), (x0 + w // 2, y0), (x0 + w, y0 + h)], fill=fill)
        elif kind == 1:  # a diagonal two-colour gradient
            t = np.linspace(0.0, 1.0, size)
            ramp = ((t[:, None] + t[None, :]) / 2)[..., None]  # [S, S, 1]
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = Image.fromarray((a * (1 - ramp) + b * ramp).round().astype(np.uint8), "RGB")
        else:  # uniform noise
            img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
        images.append(img)
    return images


# -- ONNX Runtime ---------------------------------------------------------------------------------
def open_vision_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``vision.onnx`` (the engine's own opener)."""
    from tinyv.engine.vision_onnx import open_session

    return open_session(path, threads=threads)


def _session(model, threads: int | None = None, *, prepack: bool = True, arena: bool = True):
    """A CPU session for a path or serialized model.

    The export's piecewise checks turn the memory arena off (with it, ONNX Runtime kept ~2 GB
    after a ViT-g piece's session was gone), and its load-only check turns prepacking off (the
    weights then stay in the mapped data file instead of being copied).
    """
    import onnxruntime as ort

    if not isinstance(model, bytes):
        model = os.fspath(model)
        if not os.path.isfile(model):
            raise TinyVError(f"vision graph not found: {model}; export it with export_vision()")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = arena
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


# -- export ---------------------------------------------------------------------------------------
def export_vision(
    model,
    out_dir,
    precision: str = "fp32",
    *,
    probes: list | None = None,
    opset: int = 17,
    external_data_threshold: int = MAX_PROTO,
    progress: Callable[[str], None] | None = None,
    min_cosine: float | None = None,
) -> dict:
    """Write ``out_dir/vision.onnx`` (plus ``vision.onnx.data`` when large) and verify it.

    ``precision`` is ``fp32`` or ``int8`` (dynamic quantization, signed int8 weights; per-channel
    or per-tensor scales, whichever matches torch better on the probes). The weights go to one
    external data file when the model would exceed ``external_data_threshold`` bytes. The graph
    is run on ``probes`` (default ``probe_images()``) and compared with ``model.encode_pixels``;
    below ``min_cosine`` (default ``MIN_COSINE[precision]``) the export fails. Nothing is left in
    ``out_dir`` unless the whole export succeeds. Returns a description for the bundle manifest.
    """
    if precision not in PRECISIONS:
        raise TinyVError(f"unknown vision precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    say = progress or (lambda msg: None)
    threshold = min(int(external_data_threshold), MAX_PROTO)
    min_cos = MIN_COSINE[precision] if min_cosine is None else float(min_cosine)
    cfg = model.config
    size = cfg.image_size

    out_dir = os.path.abspath(os.fspath(out_dir))
    made_out_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    work = None
    try:
        try:  # beside out_dir: same file system, so the final move is a rename
            work = tempfile.mkdtemp(prefix=".vision-export-", dir=os.path.dirname(out_dir))
        except OSError:
            work = tempfile.mkdtemp(prefix="tinyv-vision-export-")
        # torch reference first: no ONNX Runtime session exists yet
        say("reference")
        probes = probe_images() if probes is None else list(probes)
        if not probes:
            raise TinyVError("export_vision needs at least one probe image")
        pixels = torch.cat([preprocess(p, size) for p in probes])  # [n, 3, S, S]
        reference = np.concatenate([
            model.encode_pixels(chunk).float().numpy() for chunk in pixels.split(_REFERENCE_BATCH)
        ])  # [n, Q, hidden]
        release_memory()

        say("tracing")
        fp32_path = os.path.join(work, "fp32", ONNX_FILE)
        os.makedirs(os.path.dirname(fp32_path))
        _write_fp32(VisionEncoder(model), fp32_path, size, opset)  # the exporter traces in eval mode
        release_memory()

        int8_info = None
        if precision == "fp32":
            _inline_if_small(fp32_path, threshold)
            say("verifying")
            verify = _verify(fp32_path, pixels, reference, whole=_weight_bytes(fp32_path) <= WHOLE_RUN_BYTES)
            final = fp32_path
        else:
            final, verify, int8_info = _quantize_and_pick(fp32_path, work, pixels, reference, threshold, say)
        if verify["cosine_min"] < min_cos:
            raise TinyVError(
                f"the exported {precision} vision graph does not match the torch model: cosine "
                f"{verify['cosine_min']:.5f} < {min_cos} on the probe images"
            )
        data_file = _move_into_place(os.path.dirname(final), out_dir)
    except BaseException:
        if made_out_dir:  # files reach out_dir only in the last step: nothing else there is ours
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)

    return {
        "file": ONNX_FILE,
        "data_file": data_file,
        "precision": precision,
        "opset": opset,
        "input": INPUT,
        "output": OUTPUT,
        "image_size": size,
        "num_queries": cfg.qformer.num_queries,
        "hidden": cfg.phi.hidden,
        "int8": int8_info,
        "verify": verify,
    }


def _move_into_place(src_dir: str, out_dir: str) -> str | None:
    """Move vision.onnx (and its data file) into ``out_dir``; drop a stale data file there."""
    has_data = os.path.exists(os.path.join(src_dir, DATA_FILE))
    target = os.path.join(out_dir, DATA_FILE)
    if has_data:
        shutil.move(os.path.join(src_dir, DATA_FILE), target)
    elif os.path.exists(target):
        os.remove(target)
    shutil.move(os.path.join(src_dir, ONNX_FILE), os.path.join(out_dir, ONNX_FILE))
    return DATA_FILE if has_data else None


# -- writing ONNX files ---------------------------------------------------------------------------
class _TensorWriter:
    """Makes initializers: tensors of 1 KiB or more go to one data file next to the model
    (page-aligned, written as they come), smaller ones stay inline."""

    def __init__(self, model_path: str):
        self.data_path = model_path + ".data"
        self.location = os.path.basename(self.data_path)
        self.file = None

    def add(self, name: str, arr: np.ndarray):
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
        if self.file is not None:
            self.file.close()
            self.file = None


def _save(proto, nodes, initializers, path: str) -> None:
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


def _inline_if_small(path: str, threshold: int) -> None:
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
    external = [t for t in graph.initializer if _is_external(t)]
    if os.path.getsize(path) + sum(int(_external_field(t, "length")) for t in external) > threshold:
        return
    heads = []  # (tensor without its data, offset, length, serialized size with the data)
    for t in external:
        head = onnx.TensorProto()
        head.CopyFrom(t)
        head.ClearField("external_data")
        head.ClearField("data_location")
        offset, length = int(_external_field(t, "offset")), int(_external_field(t, "length"))
        heads.append((head, offset, length, head.ByteSize() + _field_len(_RAW_DATA, length)))
    inline = [t for t in graph.initializer if not _is_external(t)]
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


def _is_external(t) -> bool:
    from onnx import TensorProto

    return t.data_location == TensorProto.EXTERNAL


def _external_field(t, key: str) -> str:
    return next(e.value for e in t.external_data if e.key == key)


# -- fp32 graph: traced without weights, weights streamed from the model -----------------------------
def _trace(encoder: VisionEncoder, image_size: int, opset: int):
    """The graph with every parameter as a graph input and nothing constant-folded."""
    import onnx

    # batch 1 gives the same graph as larger batches (all shapes are read at run time) and
    # costs the tracer half the activation memory of batch 2
    dummy = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation notice, tracer warnings
        torch.onnx.export(
            encoder,
            (dummy,),
            buf,
            dynamo=False,
            export_params=False,  # the weights are written by _write_fp32, tensor by tensor
            do_constant_folding=False,  # folding here would copy every weight at once
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    return onnx.load_from_string(buf.getvalue())


def _eval_node(node, inputs: list, opset: int) -> list:
    """Run one node on constant numpy inputs (Transpose stays a view: no copy until written)."""
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return [np.transpose(inputs[0], perm)]
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(node, opsets={"": opset}).run(None, dict(zip(node.input, inputs))))


def _write_fp32(encoder: VisionEncoder, path: str, image_size: int, opset: int) -> None:
    """Trace ``encoder`` and write it to ``path`` with its weights in ``path + '.data'``.

    Nodes that depend on weights only (weight transposes, the q/0/v bias concatenation) are
    evaluated here and become initializers, one tensor in memory at a time.
    """
    import onnx

    proto = _trace(encoder, image_size, opset)
    graph = proto.graph
    weights = {k: v.detach() for k, v in encoder.state_dict().items()}
    const: dict[str, np.ndarray] = {}  # value name -> array (views of the model's weights)
    pretty: dict[str, str] = {}  # value name -> readable initializer name
    for inp in list(graph.input)[1:]:
        if inp.name not in weights:
            raise RuntimeError(f"traced graph input {inp.name!r} is no parameter of the encoder")
        const[inp.name] = weights[inp.name].numpy()
        pretty[inp.name] = inp.name
    del weights

    kept = []
    for node in graph.node:
        if node.op_type == "Constant":
            const[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
            kept.append(node)  # dropped below if only folded nodes use it
        elif node.input and all(i in const for i in node.input if i):
            const.update(zip(node.output, _eval_node(node, [const[i] for i in node.input], opset)))
            src = [pretty[i] for i in node.input if i in pretty]
            if len(src) == 1 and node.op_type in _RENAME:  # e.g. "visual.blocks.0.mlp.fc1.weight.T"
                pretty[node.output[0]] = src[0] + _RENAME[node.op_type]
        else:
            kept.append(node)

    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
    made = {o for n in kept for o in n.output}
    live = [v for v in dict.fromkeys(i for n in kept for i in n.input) if v in const and v not in made]
    rename, taken = {}, made | {INPUT}
    for v in live:
        name, k = pretty.get(v, v), 0
        while name in taken:
            k += 1
            name = f"{pretty.get(v, v)}_{k}"
        rename[v] = name
        taken.add(name)
    for n in kept:
        for j, i in enumerate(n.input):
            if i in rename:
                n.input[j] = rename[i]

    writer = _TensorWriter(path)
    try:
        initializers = [writer.add(rename[v], const.pop(v)) for v in live]
    finally:
        writer.close()
    const.clear()
    del graph.input[1:]  # weights are initializers now, not inputs
    proto.producer_name = "tinyv.export.vision"
    _save(proto, kept, initializers, path)


# -- int8 -----------------------------------------------------------------------------------------
class _DropPreprocessHint(logging.Filter):
    def filter(self, record):
        return "pre-processing before quantization" not in record.getMessage()


def _quantize_and_pick(fp32_path, work, pixels, reference, threshold, say):
    """Quantize per-tensor and per-channel; keep the one closer to torch. Returns its path."""
    candidates = {}
    for per_channel in (False, True):
        say("quantizing")
        dst = os.path.join(work, f"int8-{'channel' if per_channel else 'tensor'}", ONNX_FILE)
        os.makedirs(os.path.dirname(dst))
        quantize_pieces(fp32_path, dst, per_channel)
        release_memory()
        _inline_if_small(dst, threshold)
        release_memory()
        candidates[per_channel] = dst
    shutil.rmtree(os.path.dirname(fp32_path))  # the fp32 intermediate is no longer needed
    results = {}
    for per_channel, path in candidates.items():
        say("verifying")
        results[per_channel] = _verify(path, pixels, reference)
    best = max(results, key=lambda pc: (results[pc]["cosine_min"], not pc))
    shutil.rmtree(os.path.dirname(candidates[not best]))
    info = {
        "per_channel": best,
        "weight_type": "int8",
        "op_types": ["MatMul"],
        "cosine_min": {"per_tensor": results[False]["cosine_min"], "per_channel": results[True]["cosine_min"]},
    }
    return candidates[best], results[best], info


def quantize_pieces(src: str, dst: str, per_channel: bool, piece_bytes: int | None = None) -> None:
    """``quantize_dynamic`` (int8 weights, uint8 activations) of every weight MatMul of ``src``.

    ``quantize_dynamic`` holds about three copies of the model it is given, so the graph is cut
    into consecutive pieces of at most ``piece_bytes`` (default ``QUANT_PIECE_BYTES``) of weights,
    each piece is quantized on its own, and the results are joined into ``dst`` with the weights
    in ``dst + '.data'``. A MatMul's quantization depends only on its own weight and input, so the
    join equals quantizing the whole graph at once; only the activation quantizer of a value two
    pieces both read (the image tokens, for the Q-Former's cross-attention) comes out twice, and
    the second copy is dropped.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    base = os.path.dirname(src)
    meta = onnx.load(src, load_external_data=False)
    graph = meta.graph
    types = _value_infos(meta)
    inits = {t.name: t for t in graph.initializer}
    pieces = _partition(list(graph.node), inits, piece_bytes or QUANT_PIECE_BYTES)
    last_use = _last_use(pieces, graph)
    work = tempfile.mkdtemp(prefix="pieces-", dir=os.path.dirname(dst))
    writer = _TensorWriter(dst)
    nodes, made, initializers, opsets = [], {}, {}, {d.domain: d.version for d in meta.opset_import}
    hint = _DropPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        for k, piece in enumerate(pieces):
            piece_in, piece_out = os.path.join(work, f"{k}.onnx"), os.path.join(work, f"{k}-int8.onnx")
            sub = _piece_model(meta, piece, inits, types, {v for v, j in last_use.items() if j > k}, base)
            onnx.save(sub, piece_in)
            del sub
            quantize_dynamic(
                piece_in,
                piece_out,
                weight_type=QuantType.QInt8,  # signed: u8 x s8 is the fast VNNI/AMX path (SPEC §5)
                per_channel=per_channel,
                op_types_to_quantize=["MatMul"],  # weight MatMuls; the patch-embed Conv stays fp32
            )
            os.remove(piece_in)
            q = onnx.load(piece_out)
            os.remove(piece_out)
            for d in q.opset_import:
                opsets[d.domain] = max(opsets.get(d.domain, 0), d.version)
            for n in q.graph.node:
                clash = [o for o in n.output if o in made]
                if clash:
                    first = made[clash[0]]
                    same = (first.op_type, first.input, first.output) == (n.op_type, n.input, n.output)
                    if n.op_type != "DynamicQuantizeLinear" or not same:
                        raise RuntimeError(f"quantized pieces both define {clash[0]!r}")
                    continue  # the same activation quantized again by a later piece
                nodes.append(n)
                made.update((o, n) for o in n.output)
            for t in q.graph.initializer:
                if t.name not in initializers:
                    initializers[t.name] = writer.add(t.name, onnx.numpy_helper.to_array(t))
            del q
            release_memory(collect=False)
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(writer.data_path)
        raise
    finally:
        logging.getLogger().removeFilter(hint)
        writer.close()
        shutil.rmtree(work, ignore_errors=True)
    del meta.opset_import[:]
    meta.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    meta.producer_name = "tinyv.export.vision (onnxruntime quantize_dynamic)"
    _save(meta, nodes, list(initializers.values()), dst)


def _last_use(pieces: list, graph) -> dict:
    """value -> index of the last piece that reads it (the graph's outputs: past the last)."""
    last = {}
    for k, piece in enumerate(pieces):
        for n in piece:
            last.update((i, k) for i in n.input)
    last.update((o.name, len(pieces)) for o in graph.output)
    return last


def _value_infos(model) -> dict:
    """name -> ValueInfoProto for every graph value (shape inference on the weightless graph)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


def _partition(nodes: list, inits: dict, budget: int) -> list[list]:
    """Consecutive runs of nodes whose initializers add up to at most ``budget`` bytes."""
    pieces, piece, names, size = [], [], set(), 0
    for n in nodes:
        new = {i for i in n.input if i in inits and i not in names}
        extra = sum(_nbytes(inits[i]) for i in new)
        if piece and size + extra > budget:
            pieces.append(piece)
            piece, names, size = [], set(), 0
            new = {i for i in n.input if i in inits}
            extra = sum(_nbytes(inits[i]) for i in new)
        piece.append(n)
        names |= new
        size += extra
    if piece:
        pieces.append(piece)
    return pieces


def _nbytes(t) -> int:
    if _is_external(t):
        return int(_external_field(t, "length"))
    return len(t.raw_data) or 8 * int(np.prod(t.dims))  # typed fields: an upper bound is enough


def _piece_model(meta, piece: list, inits: dict, types: dict, needed_later: set, base: str):
    """A standalone model of ``piece``: inputs are what it reads from earlier pieces, outputs what
    later pieces (or the graph's output) read; its weights are loaded from ``base``."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    made = [o for n in piece for o in n.output]
    made_set = set(made)
    reads = dict.fromkeys(i for n in piece for i in n.input if i)
    missing = [v for v in reads if v not in made_set and v not in inits and v not in types]
    missing += [v for v in made if v in needed_later and v not in types]
    if missing:
        raise RuntimeError(f"shape inference gave no type for {', '.join(missing[:5])}")
    model = onnx.ModelProto(ir_version=meta.ir_version)
    model.opset_import.extend(meta.opset_import)
    graph = model.graph  # filled in place: the weights are copied once, not per helper call
    graph.name = "piece"
    graph.node.extend(piece)
    graph.input.extend(types[v] for v in reads if v not in made_set and v not in inits)
    graph.output.extend(types[v] for v in made if v in needed_later)
    for v in reads:
        if v in inits:
            t = graph.initializer.add()
            t.CopyFrom(inits[v])
            if _is_external(t):
                load_external_data_for_tensor(t, base)
                t.ClearField("data_location")
                t.ClearField("external_data")
    return model


# -- verification ---------------------------------------------------------------------------------
def _verify(path: str, pixels: torch.Tensor, reference: np.ndarray, whole: bool = True) -> dict:
    """Run the graph on the probe batch and compare with the torch embeddings.

    ``whole=False`` (large fp32 graphs): ONNX Runtime loads the whole file without touching the
    weights (no prepacking, the data file is mapped), then the numbers come from running it
    piece by piece, so no more than a piece of weights is ever in memory beside the torch model.
    """
    t0 = time.perf_counter()
    if whole:
        session = _session(path)
        t1 = time.perf_counter()
        runs = [session.run([OUTPUT], {INPUT: x.numpy()})[0] for x in pixels.split(_VERIFY_BATCH)]
        out = np.concatenate(runs)
        pieces = 1
        del session
    else:
        _session(path, prepack=False, arena=False)  # the file loads: graph valid, data file found
        t1 = time.perf_counter()
        out, pieces = run_in_pieces(path, {INPUT: pixels.numpy()})
    t2 = time.perf_counter()
    release_memory()
    if out.shape != reference.shape:
        raise TinyVError(
            f"the exported vision graph returned shape {list(out.shape)}, expected {list(reference.shape)}"
        )
    return {
        "probes": int(reference.shape[0]),
        **compare(out, reference),
        "seconds": t2 - t1,
        "load_seconds": t1 - t0,
        "pieces": pieces,
    }


def run_in_pieces(path: str, feeds: dict, piece_bytes: int | None = None) -> tuple[np.ndarray, int]:
    """Run ``path`` as consecutive pieces of at most ``piece_bytes`` of weights, one ONNX Runtime
    session at a time. Returns the graph's output and the number of pieces."""
    import onnx

    meta = onnx.load(path, load_external_data=False)
    graph = meta.graph
    types = _value_infos(meta)
    inits = {t.name: t for t in graph.initializer}
    pieces = _partition(list(graph.node), inits, piece_bytes or QUANT_PIECE_BYTES)
    last_use = _last_use(pieces, graph)
    values = dict(feeds)
    for k, piece in enumerate(pieces):
        later = {v for v, j in last_use.items() if j > k}
        sub = _piece_model(meta, piece, inits, types, later, os.path.dirname(path))
        session = _session(sub.SerializeToString(), arena=False)
        names = [o.name for o in sub.graph.output]
        ins = {i.name: values[i.name] for i in sub.graph.input}
        del sub
        values.update(zip(names, session.run(names, ins)))
        del session, ins
        values = {v: x for v, x in values.items() if v in later}  # drop what no later piece reads
        release_memory(collect=False)
    return values[graph.output[0].name], len(pieces)


def _weight_bytes(path: str) -> int:
    import onnx

    return sum(_nbytes(t) for t in onnx.load(path, load_external_data=False).graph.initializer)


def compare(out: np.ndarray, reference: np.ndarray) -> dict:
    """Per-image cosine of the flattened embeddings (min over images) and the max abs error."""
    a = np.asarray(out, dtype=np.float64).reshape(out.shape[0], -1)
    b = np.asarray(reference, dtype=np.float64).reshape(reference.shape[0], -1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"cosine_min": float(cos.min()), "max_abs_err": float(np.abs(a - b).max())}
