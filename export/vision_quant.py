"""int8 vision graphs: ONNX Runtime's dynamic quantization of the ViT's weight MatMuls, piece by piece.

Signed int8 weights (SPEC §5: unsigned weights ran 9x slower on the target CPU), uint8
activations quantized at run time (one scale per tensor); the patch-embed Conv stays fp32, and so
do the activations of the MatMuls outside ``only`` (the exporter stores the Q-Former's and the
projection's weights in 8 bits and computes them in fp32: see ``vision.INT8_MODULE``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

from tinyv.export.memory import release_memory
from tinyv.export.onnx_pieces import plan_pieces
from tinyv.export.onnx_writer import TensorWriter, save_model


class _DropPreprocessHint(logging.Filter):
    """Drops quantize_dynamic's advice to pre-process the model, logged once per call (so once
    per piece): nothing a user of ``tinyv export`` can act on."""

    def filter(self, record):
        return "pre-processing before quantization" not in record.getMessage()


def quantize_pieces(src: str, dst: str, per_channel: bool, piece_bytes: int | None = None,
                    only: str = "", others_8bit: bool = False) -> None:
    """``quantize_dynamic`` (int8 weights, uint8 activations) of every weight MatMul of ``src`` whose
    node name starts with ``only`` (all when empty); the others stay fp32, or with ``others_8bit``
    store their weights in 8 bits (``MatMulNBits``, a scale per 32 weights: a quarter of the
    memory) and quantize their activations per block of 32 (an outlier channel costs only its block).

    ``quantize_dynamic`` holds about three copies of the model it is given, so the graph is cut
    into consecutive pieces of at most ``piece_bytes`` (default ``onnx_pieces.PIECE_BYTES``) of
    weights, each piece is quantized on its own, and the results are joined into ``dst`` with the
    weights in ``dst + '.data'``. A MatMul's quantization depends only on its own weight and
    input, so the join equals quantizing the whole graph at once; only the activation quantizer
    of a value two pieces both read (the image tokens, for the Q-Former's cross-attention) comes
    out twice, and the second copy is dropped.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    plan = plan_pieces(src, piece_bytes)
    meta = plan.meta
    work = tempfile.mkdtemp(prefix="pieces-", dir=os.path.dirname(dst))
    writer = TensorWriter(dst)
    nodes, made, initializers, opsets = [], {}, {}, {d.domain: d.version for d in meta.opset_import}
    hint = _DropPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        for k in range(len(plan.pieces)):
            piece_in, piece_out = os.path.join(work, f"{k}.onnx"), os.path.join(work, f"{k}-int8.onnx")
            sub = plan.piece_model(k, os.path.dirname(src))
            keep = [n.name for n in sub.graph.node if n.op_type == "MatMul" and not n.name.startswith(only)]
            onnx.save(sub, piece_in)
            del sub
            quantize_dynamic(
                piece_in,
                piece_out,
                weight_type=QuantType.QInt8,  # signed: u8 x s8 is the fast VNNI/AMX path (SPEC §5)
                per_channel=per_channel,
                op_types_to_quantize=["MatMul"],  # weight MatMuls; the patch-embed Conv stays fp32
                nodes_to_exclude=keep,
                # shape inference knows no type for the fused attention's output (com.microsoft)
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            os.remove(piece_in)
            q = onnx.load(piece_out)
            os.remove(piece_out)
            if others_8bit:
                q = _weights_8bit(q, keep)
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
    save_model(meta, nodes, list(initializers.values()), dst)


def _weights_8bit(model, names: list[str]):
    """``model`` with the weight MatMuls named ``names`` as ``MatMulNBits`` of 8-bit weights
    (symmetric, a scale per block of 32) with activations in int8 per block of 32 (accuracy level
    4: ONNX Runtime's VNNI kernel; level 1, fp32 compute, dequantized every weight at every call
    and took 0.27 s of a full-size encode where level 4 takes 0.14 s)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    inits, wanted = {t.name for t in model.graph.initializer}, set(names)
    names = [n.name for n in model.graph.node if n.name in wanted and n.input[1] in inits]
    if not names:
        return model
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                                     nodes_to_include=names, algo_config=config)
    quantizer.process()
    return quantizer.model.model
