"""The bundle's fused vision graph through ONNX Runtime."""
from __future__ import annotations

import os
import threading

from tinyv.errors import TinyVError


def open_session(model, threads: int | None = None, *, prepack: bool = True, arena: bool = True,
                 providers=("CPUExecutionProvider",), external_folder: str | None = None):
    """An ONNX Runtime session, all graph optimizations on, for ``vision.onnx`` (a path) or a
    serialized graph (``bytes``); on the CPU unless ``providers`` names others (the GPU path gives
    the CUDA provider first, ``engine/gpu.py``).

    ``prepack=False`` leaves the weights in the mapped data file instead of copying them, and
    ``arena=False`` turns the memory arena off (with it, ONNX Runtime kept ~2 GB after a ViT-g
    piece's session was gone): the exporter's checks of graphs too large to hold twice use both.
    ``external_folder``: where a serialized graph's external weights are (a piece cut from a
    bundle's graph, ``engine/vision_native.py``).
    """
    import onnxruntime as ort

    if isinstance(model, bytes):
        where = "a serialized vision graph"
    else:
        model = where = os.fspath(model)
        if not os.path.isfile(model):
            raise TinyVError(f"vision graph not found: {model}")
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
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = arena
    if external_folder:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
    # a memory pattern would hold every activation buffer of the plan at once (full-size int8 graph:
    # peak 1.63 GB with it, 1.56 GB without, encode no slower)
    opts.enable_mem_pattern = False
    try:
        return ort.InferenceSession(model, opts, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own types for bad graphs
        raise TinyVError(f"cannot open the vision graph {where} ({str(e).splitlines()[0]}); re-export the bundle") from None


def vision_run_options():
    """Options for one encode: ONNX Runtime's arena gives back what the run took (full size: an
    image's activations, ~50 MB more than the language model's peak) instead of holding it."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class OpenInBackground:
    """``open_vision()`` started now on a thread of its own; ``result()`` waits for it and returns
    the session (or raises what opening raised, at first use as a lazy open would).

    The engine starts opening the vision graph before it builds the language model: the seconds
    ONNX Runtime spends reading and prepacking a full-size graph's weights then overlap the LLM's
    load instead of delaying the first image (ONNX Runtime lets go of the GIL while it opens).
    """

    def __init__(self, open_vision):
        self._done = threading.Event()
        self._session = self._error = None
        # a daemon: a process that never needed the graph (cached images) does not wait for it at exit
        threading.Thread(target=self._run, args=(open_vision,), name="tinyv-vision-open", daemon=True).start()

    def _run(self, open_vision) -> None:
        try:
            self._session = open_vision()
        except BaseException as e:  # raised to whoever needs the session
            self._error = e
        finally:
            self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        session, self._session = self._session, None  # the engine holds it from now on
        return session
