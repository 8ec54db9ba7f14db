"""The vision side as one ONNX graph: pixels [B, 3, S, S] -> image embeddings [B, Q, hidden].

    info = export_vision(model, "bundle/", precision="int8")   # writes bundle/vision.onnx
    session = open_vision_session("bundle/vision.onnx", threads=2)
    embeds = session.run(["image_embeds"], {"pixel_values": pixels.numpy()})[0]

``export_vision`` drives the steps, each in its own module:

* ``vision_trace``: the graph is EVA ViT -> ln_vision -> Q-Former -> one affine map
  (``llama_proj2 ∘ llama_proj`` folded, SPEC §1.8), traced without weights; the weights are then
  written tensor by tensor from the model's own storage (ViT-g is ~1B parameters, 4.4 GB in
  fp32, and the caller still holds the torch model);
* ``vision_quant``: ``int8`` is ONNX Runtime dynamic quantization of the ViT's weight MatMuls
  (``INT8_MODULE``; the Q-Former's and the projection's weights stored in 8 bits, their
  activations quantized per block of 32) with signed int8 weights, done in
  pieces of at most ``onnx_pieces.PIECE_BYTES`` of weights (``quantize_dynamic`` keeps about
  three copies of the model it is given) and joined again;
* ``vision_verify``: the graph is run on ``probe_images()`` and compared with the torch model
  (torch reference first, before any ONNX Runtime session exists; an fp32 graph of more than
  ``WHOLE_RUN_BYTES`` is checked piece by piece);
* ``onnx_writer``: page-aligned external data, and inlining it again when the model is small.

A failed export leaves nothing behind: files reach ``out_dir`` only in the last step.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import numpy as np
import torch

from tinyv.engine.image import preprocess
from tinyv.engine.vision_onnx import open_session as open_vision_session
from tinyv.errors import TinyVError
from tinyv.export.memory import release_memory
from tinyv.export.onnx_writer import inline_if_small, weight_bytes
from tinyv.export.staging import VISION_PREFIX, work_folder
from tinyv.export.vision_quant import quantize_pieces
from tinyv.export.vision_trace import INPUT, OUTPUT, VisionEncoder, fold_projections, write_fp32_graph
from tinyv.export.vision_verify import probe_images, verify_graph

__all__ = ["export_vision", "open_vision_session", "probe_images", "VisionEncoder", "fold_projections"]

ONNX_FILE = "vision.onnx"
DATA_FILE = ONNX_FILE + ".data"
PRECISIONS = ("fp32", "int8")
MAX_PROTO = 2**31 - 1  # protobuf cannot serialize a larger message
# larger graphs keep their weights in vision.onnx.data: ONNX Runtime parses an inline graph as one
# message and copies the weights out of it, both in memory at once (full-size int8 graph: one
# caption's peak RSS 4.16 GB inline, 3.36 GB with the data file)
INLINE_MAX_BYTES = 256 << 20
WHOLE_RUN_BYTES = 1 << 30  # fp32 graphs with more weights are checked piece by piece
_REFERENCE_BATCH = 4  # probes per torch forward
# fp32 differs from torch only by kernel rounding; int8 is checked loosely (random or real
# weights) — a broken graph scores near 0, not 0.9.
MIN_COSINE = {"fp32": 0.999, "int8": 0.9}
# int8 quantizes the ViT's MatMuls per tensor or channel (the node-name prefix vision_trace gives
# them). Not the Q-Former's and the projection's that way: with planted outlier channels nearly all
# of the int8 error was theirs (tiny preset: one Q-Former MatMul alone took the cosine to 0.985, no
# ViT MatMul cost more than 1e-5; all int8 0.979, ViT-only 0.99992). Their weights are stored in 8
# bits and their activations quantized per block of 32 (MatMulNBits, accuracy level 4): 0.42 ->
# 0.12 GB at full size; cosine against fp32 0.99988 on the planted tiny weights (0.99997 with fp32
# activations), 0.99965-0.99973 on full-size random ones (0.99971-0.99980), and 0.14 s of a full-size
# encode where fp32 activations took 0.27 s.
INT8_MODULE = "/visual/"


def export_vision(
    model,
    out_dir,
    precision: str = "fp32",
    *,
    probes: list | None = None,
    opset: int = 17,
    external_data_threshold: int = INLINE_MAX_BYTES,
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
            work = work_folder(VISION_PREFIX, os.path.dirname(out_dir))
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
        write_fp32_graph(VisionEncoder(model), fp32_path, size, opset)  # the exporter traces in eval mode
        release_memory()

        int8_info = None
        if precision == "fp32":
            inline_if_small(fp32_path, threshold)
            say("verifying")
            verify = verify_graph(fp32_path, pixels, reference, whole=weight_bytes(fp32_path) <= WHOLE_RUN_BYTES)
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


def _quantize_and_pick(fp32_path, work, pixels, reference, threshold, say):
    """Quantize per-tensor and per-channel; keep the one closer to torch. Returns its path."""
    candidates = {}
    for per_channel in (False, True):
        say("quantizing")
        dst = os.path.join(work, f"int8-{'channel' if per_channel else 'tensor'}", ONNX_FILE)
        os.makedirs(os.path.dirname(dst))
        quantize_pieces(fp32_path, dst, per_channel, only=INT8_MODULE, others_8bit=True)
        release_memory()
        inline_if_small(dst, threshold)
        release_memory()
        candidates[per_channel] = dst
    shutil.rmtree(os.path.dirname(fp32_path))  # the fp32 intermediate is no longer needed
    results = {}
    for per_channel, path in candidates.items():
        say("verifying")
        results[per_channel] = verify_graph(path, pixels, reference)
    best = max(results, key=lambda pc: (results[pc]["cosine_min"], not pc))
    shutil.rmtree(os.path.dirname(candidates[not best]))
    info = {
        "per_channel": best,
        "weight_type": "int8",
        "op_types": ["MatMul"],
        "quantized": "the ViT's MatMuls; the Q-Former's and the projection's weights in 8 bits with "
                     "activations in int8 per block of 32 (MatMulNBits, blocks of 32, accuracy level 4)",
        "cosine_min": {"per_tensor": results[False]["cosine_min"], "per_channel": results[True]["cosine_min"]},
    }
    return candidates[best], results[best], info


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
