"""The bundle's fused vision graph through ONNX Runtime."""
from __future__ import annotations

import os

from tinyv.errors import TinyVError


def open_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``vision.onnx``, all graph optimizations on."""
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TinyVError(f"vision graph not found: {path}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # ONNX Runtime's pool spin-waits after each run by default: on a 2-core laptop that steals
    # the cores from the LLM that runs right after the image is encoded
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for bad graphs
        raise TinyVError(f"cannot open the vision graph {path} ({str(e).splitlines()[0]}); re-export the bundle") from None
