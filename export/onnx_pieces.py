"""An ONNX graph cut into consecutive pieces of at most ``PIECE_BYTES`` of weights.

Each piece becomes a standalone model: its inputs are the values it reads from earlier pieces,
its outputs the values later pieces (or the graph's output) read. The exporter quantizes a
ViT-g graph piece by piece (``quantize_dynamic`` holds about three copies of what it is given)
and checks a large fp32 graph by running it piece by piece, one ONNX Runtime session at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from tinyv.engine.vision_onnx import open_session
from tinyv.export.memory import release_memory
from tinyv.export.onnx_writer import is_external, tensor_nbytes

PIECE_BYTES = 256 << 20  # fp32 weights in one piece (one quantize_dynamic call, one session)


@dataclass
class PiecePlan:
    """A graph (without its weights loaded) and the consecutive pieces it is cut into."""

    meta: object  # the ModelProto, initializers pointing at the data file
    types: dict  # value name -> ValueInfoProto
    inits: dict  # initializer name -> TensorProto
    pieces: list  # [[NodeProto, ...], ...]
    last_use: dict  # value name -> index of the last piece that reads it (graph outputs: past the last)

    def needed_after(self, k: int) -> set:
        """The values some piece after ``k`` (or the graph's output) reads."""
        return {v for v, j in self.last_use.items() if j > k}

    def piece_model(self, k: int, base: str):
        """Piece ``k`` as a standalone model, its weights loaded from ``base`` (the data file's folder)."""
        return _piece_model(self.meta, self.pieces[k], self.inits, self.types, self.needed_after(k), base)


def plan_pieces(path: str, piece_bytes: int | None = None) -> PiecePlan:
    """Cut the graph at ``path`` into pieces of at most ``piece_bytes`` (default ``PIECE_BYTES``)."""
    import onnx

    meta = onnx.load(path, load_external_data=False)
    graph = meta.graph
    inits = {t.name: t for t in graph.initializer}
    pieces = partition(list(graph.node), inits, piece_bytes or PIECE_BYTES)
    return PiecePlan(meta, _value_infos(meta), inits, pieces, _last_use(pieces, graph))


def run_in_pieces(path: str, feeds: dict, piece_bytes: int | None = None) -> tuple[np.ndarray, int]:
    """Run ``path`` as consecutive pieces of at most ``piece_bytes`` of weights, one ONNX Runtime
    session at a time. Returns the graph's output and the number of pieces."""
    plan = plan_pieces(path, piece_bytes)
    values = dict(feeds)
    for k in range(len(plan.pieces)):
        later = plan.needed_after(k)
        sub = plan.piece_model(k, os.path.dirname(path))
        session = open_session(sub.SerializeToString(), arena=False)
        names = [o.name for o in sub.graph.output]
        ins = {i.name: values[i.name] for i in sub.graph.input}
        del sub
        values.update(zip(names, session.run(names, ins)))
        del session, ins
        values = {v: x for v, x in values.items() if v in later}  # drop what no later piece reads
        release_memory(collect=False)
    return values[plan.meta.graph.output[0].name], len(plan.pieces)


def partition(nodes: list, inits: dict, budget: int) -> list[list]:
    """Consecutive runs of nodes whose initializers add up to at most ``budget`` bytes."""
    pieces, piece, names, size = [], [], set(), 0
    for n in nodes:
        new = {i for i in n.input if i in inits and i not in names}
        extra = sum(tensor_nbytes(inits[i]) for i in new)
        if piece and size + extra > budget:
            pieces.append(piece)
            piece, names, size = [], set(), 0
            new = {i for i in n.input if i in inits}
            extra = sum(tensor_nbytes(inits[i]) for i in new)
        piece.append(n)
        names |= new
        size += extra
    if piece:
        pieces.append(piece)
    return pieces


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

    # ONNX's shape inference knows no com.microsoft op and would stop at the fused attention: a
    # stand-in of the same shape and type (its query) takes its place, for the types only
    if any(n.op_type == "MultiHeadAttention" for n in model.graph.node):
        stand_in = onnx.ModelProto()
        stand_in.CopyFrom(model)
        for n in stand_in.graph.node:
            if n.op_type == "MultiHeadAttention":
                n.op_type, n.domain = "Identity", ""
                del n.input[1:]
                del n.attribute[:]
        model = stand_in
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


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
            if is_external(t):
                load_external_data_for_tensor(t, base)
                t.ClearField("data_location")
                t.ClearField("external_data")
    return model
