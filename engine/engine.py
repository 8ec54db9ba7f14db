"""``tinyv.Engine``: runs a bundle — vision graph in ONNX Runtime (an int8 graph's ViT trunk on
tinyv's kernels: ``engine/vision_native.py``), quantized Phi-2 in torch.

    engine = tinyv.load("bundle/")             # or tinyv.load() for the built-in demo model
    print(engine.caption("photo.jpg"))
    for step in engine.stream("photo.jpg", question="What colour is the car?"):
        print(step.text, end="", flush=True)
    chat = engine.session("photo.jpg")         # image encoded and its prompt prefix prefilled once
    chat.ask("How many people?"); chat.ask("Where are they?")

Threads: an engine may be shared by any number of threads (and event loops). Its model work runs
on one worker thread of its own, in arrival order (``engine/worker.py``); a stream may be advanced
from any thread, and a caller may give up waiting (``timeout=``, or closing the stream). Two
engines are independent, each with its own threads.
"""
from __future__ import annotations

import os
import threading
import time

import torch

from tinyv.engine.bundle import LLM_FILE, load_bundle
from tinyv.engine.cache import EmbeddingCache, default_cache_folder, image_key
from tinyv.engine.config import PhiConfig, TinyGPTVConfig
from tinyv.engine.generate import GenerationOptions, GenerationStep, Prefix, generate, prefill_prefix
from tinyv.engine.image import preprocess
from tinyv.engine.llm import build_quant_phi, weight_bytes
from tinyv.engine.prefix_cache import DEFAULT_MAX_BYTES as DEFAULT_PREFIX_BYTES, PrefixCache
from tinyv.engine.prompts import PromptFormat
from tinyv.engine.tokenizer import Tokenizer
from tinyv.engine.vision_onnx import vision_run_options
from tinyv.engine.worker import Stream, Worker
from tinyv.errors import TinyVError
from tinyv.kernels.quant import QuantConfig

_CACHE_DEFAULT = object()


class Engine:
    def __init__(self, bundle: str, manifest: dict, phi, tokenizer: Tokenizer, open_vision, cache: EmbeddingCache,
                 threads: int | None = None, kernels=None, prefix_cache_bytes: int = DEFAULT_PREFIX_BYTES,
                 placement=None, one_shot: bool = False, build_phi=None):
        self.bundle, self.manifest = bundle, manifest
        # where it runs (engine/gpu.py's Placement; None: the CPU)
        self.placement = placement
        self.config = TinyGPTVConfig.from_dict(manifest["model"])
        # phi: the model, or None and build_phi() makes it at first use (a one-shot engine)
        self._phi, self._build_phi, self.tokenizer, self.kernels = phi, build_phi, tokenizer, kernels
        self._phi_lock = threading.Lock()
        self._open_vision, self._vision = open_vision, None
        self.one_shot = one_shot
        # fixed now: a new thread's torch count is whatever any thread set last, so "torch's
        # default" must be read here, not left to the worker thread to pick up later
        self.threads = threads = int(threads or torch.get_num_threads())
        self.cache = cache
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.quant = QuantConfig.from_dict(manifest["quantization"])
        self._vision_id, self._vision_id_lock = None, threading.Lock()
        self.prompt_format = PromptFormat.from_manifest(manifest["prompt"])
        # the kernels run every Linear on their own pool; torch's ops between them then run on one
        # thread: an OpenMP pool spins for milliseconds after each op, on the core the kernels'
        # next GEMM needs (prefill pp64, full size: 1.16 s with 2 torch threads, 0.80 s with 1)
        self.llm_torch_threads = 1 if kernels is not None and self.quant.bits != 16 else None
        self._worker = Worker("tinyv-engine", setup=lambda: torch.set_num_threads(self.llm_torch_threads or threads))

    @property
    def phi(self):
        """The language model (built here at first use in a one-shot engine)."""
        if self._phi is None:
            with self._phi_lock:
                if self._phi is None:
                    self._phi, self._build_phi = self._build_phi(), None
        return self._phi

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle, threads: int | None = None, vision_threads: int | None = None, *, verify: bool = False,
             cache_dir=_CACHE_DEFAULT, cache_max_bytes: int | None = None,
             prefix_cache_bytes: int = DEFAULT_PREFIX_BYTES, device: str = "cpu", max_gpu_memory="8GB",
             announce=None, preload_vision: bool = True, one_shot: bool = False) -> "Engine":
        """Load ``bundle``: a folder from ``tinyv export``, or ``hf://owner/repo[@revision]`` (a bare
        ``owner/repo`` too, if no such folder exists) fetched from the Hugging Face Hub and checked
        (``engine/hub.py``); ``tinyv.load()`` also knows the built-in model.

        ``threads``: CPU threads for the model (default: torch's count in the loading thread). ``cache_dir=None`` keeps image
        embeddings in memory only; ``verify`` checks every file's sha256 (sizes and format are
        always checked). ``prefix_cache_bytes`` bounds the KV kept of recent images' prompt
        prefixes (0: none kept). ``device``: ``cpu``, ``cuda`` (bitsandbytes layers, within
        ``max_gpu_memory``, e.g. ``"8GB"``: see ``engine/gpu.py``) or ``auto`` (CUDA when usable and
        the budget fits); ``announce(line)`` is told where a non-CPU request runs and of a cache
        folder that cannot be used (default: a RuntimeWarning). ``preload_vision`` opens the vision
        graph on a background thread while the language model loads, so the first new image does
        not wait for it; ``False`` opens it at the first image that needs it (never, if every image
        is cached). ``one_shot`` (on the CPU; ``tinyv caption`` and ``tinyv ask`` of one image): the
        engine is for one answer, so the vision graph opens at the image, is dropped once it has
        encoded it, and only then is the language model built: their weights are resident in turn,
        not together (full size: one caption's peak RSS 2.95 -> 1.9 GB, no slower). A second image
        opens the graph again.
        """
        from tinyv.engine import gpu
        from tinyv.engine import vision_native
        from tinyv.engine.vision_onnx import OpenInBackground
        from tinyv.engine.weights import mmap_safetensors
        from tinyv.kernels import native

        setting = native.check_setting()  # a mistyped TINYV_KERNELS fails here, before any loading
        vision_runtime = vision_native.check_vision_setting()  # and a mistyped TINYV_VISION
        if bundle is None:
            raise TinyVError("name a bundle folder (tinyv.load() with no bundle runs the built-in model)")
        found = load_bundle(bundle, verify=verify)
        bundle, manifest = found.folder, found.manifest
        placement = gpu.place(manifest, device, max_gpu_memory)  # before any weight is read
        vision_path, providers = os.path.join(bundle, manifest["vision"]["file"]), placement.vision_providers()
        threads = int(threads or torch.get_num_threads())
        vision_threads = vision_threads or threads

        def open_vision():
            return vision_native.open_vision_graph(vision_path, manifest["vision"].get("data_file"), vision_threads,
                                                   providers, setting, native=vision_runtime == "auto" and
                                                   not placement.on_gpu)

        one_shot = one_shot and not placement.on_gpu
        if preload_vision and not one_shot:
            open_vision = OpenInBackground(open_vision).result
        tensors = mmap_safetensors(os.path.join(bundle, manifest["quantization"].get("llm_file", LLM_FILE)))
        phi_cfg, quant = PhiConfig.from_dict(manifest["model"]["phi"]), QuantConfig.from_dict(manifest["quantization"])
        if placement.on_gpu:
            kernels, build_phi = None, None
            phi = gpu.load_device_phi(phi_cfg, tensors, quant, placement)
            prefix_cache_bytes = min(prefix_cache_bytes, placement.plan.prefix_cache_bytes)
        else:
            kernels = native.open_kernels(threads, setting)

            def build_phi():  # the mapping is this engine's own: int4 weights repacked, their mapped pages released
                return build_quant_phi(phi_cfg, tensors, quant, kernels=kernels, release_stored=True)

            phi, build_phi = (None, build_phi) if one_shot else (build_phi(), None)
        if announce and device != "cpu":
            announce(f"tinyv: {gpu.placement_line(placement, phi)}")
        tok_info = manifest["tokenizer"]
        tokenizer = Tokenizer.from_file(os.path.join(bundle, tok_info["file"]), tok_info.get("eos_id"))
        folder = default_cache_folder() if cache_dir is _CACHE_DEFAULT else cache_dir
        cache = EmbeddingCache(folder, **({"max_bytes": cache_max_bytes} if cache_max_bytes else {}), report=announce)
        return cls(bundle, manifest, phi, tokenizer, open_vision, cache, threads, kernels, prefix_cache_bytes,
                   placement, one_shot, build_phi)

    def close(self) -> None:
        """Finish the queued work and let the worker thread end; the engine takes no new calls."""
        self._worker.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def vision(self):
        """The ONNX Runtime session of the vision graph: opening since the load (``preload_vision``),
        else opened on first use."""
        if self._vision is None:
            self._vision = self._open_vision()
        return self._vision

    @vision.setter
    def vision(self, session) -> None:
        self._vision = session

    @property
    def vision_id(self) -> str:
        """The image cache's namespace: what embeddings depend on, the vision graph's bytes and its
        input size. With a disk cache these are the sha256 of the files that run (hashed once per
        change of the file, ``file_identity.py``), never the manifest's word for them: an altered
        graph must not file its embeddings where the genuine one looks. A memory-only cache lives
        and dies with this engine and its files, so the manifest's hashes name them."""
        with self._vision_id_lock:
            if self._vision_id is None:
                v = self.manifest["vision"]
                names = [v["file"]] + ([v["data_file"]] if v.get("data_file") else [])
                self._vision_id = "+".join(self._file_sha(n) for n in names) + f":{self.config.image_size}"
            return self._vision_id

    def _file_sha(self, name: str) -> str:
        if self.cache.folder is None:
            return self.manifest["files"][name]["sha256"]
        from tinyv.engine.file_identity import file_sha256

        try:
            return file_sha256(os.path.join(self.bundle, name), self.cache.stamp_folder)
        except OSError as e:
            raise TinyVError(f"cannot read {self.bundle}/{name} ({e.strerror or e}); re-copy the bundle") from None

    @property
    def kernel_path(self) -> str:
        """One line: what computes the LLM's Linears (``tinyv bench`` prints it)."""
        if self.placement is not None and self.placement.on_gpu:
            from tinyv.engine.gpu import describe

            return describe(self.placement, self.phi)
        if self.quant.bits == 16:
            return "torch (16-bit bundle: fp16 weights, no quantized kernels)"
        from tinyv.kernels import native

        return native.describe(self.kernels)

    @property
    def vision_path(self) -> str:
        """One line: what runs the vision graph (opens it if it is not open yet)."""
        from tinyv.engine.vision_native import describe

        return describe(self.vision)

    def run(self, fn, timeout: float | None = None):
        """``fn()`` on the engine's worker, where its model work runs (with its thread settings),
        after the work queued before it; for tools that drive the model's parts directly, such as
        ``tinyv bench``."""
        return self._worker.call(fn, timeout)

    def submit(self, fn):
        """Queue ``fn()`` on the worker without waiting: a ``concurrent.futures.Future`` (the batch
        scheduler, ``engine/batching.py``, runs its loop this way)."""
        return self._worker.submit(fn)

    @property
    def weight_bytes(self) -> int:
        """LLM weight bytes read per decoded token."""
        return weight_bytes(self.phi)

    # -- vision ------------------------------------------------------------------------------------
    def encode_image(self, image, use_cache: bool = True, *, timeout: float | None = None) -> tuple[torch.Tensor, bool]:
        """Embeddings [1, Q, hidden] for an image (path, bytes or PIL), and whether they were cached."""
        return self._worker.call(lambda: self._encode(image, use_cache), timeout)

    def _encode(self, image, use_cache: bool = True, key: str | None = None) -> tuple[torch.Tensor, bool]:
        """On the worker: the vision graph, or the cache (``key``: the image's, if known)."""
        key = key or image_key(image, self.vision_id)
        if use_cache:
            hit = self.cache.get(key, (1, self.config.qformer.num_queries, self.config.phi.hidden))
            if hit is not None:
                return hit, True
        pixels = preprocess(image, self.config.image_size)
        feed = {self.manifest["vision"].get("input", "pixel_values"): pixels.numpy()}
        out = self.vision.run(None, feed, vision_run_options())[0]
        if self.one_shot:  # its weights go before the language model's arrive: one set resident at a time
            self._vision = None
        embeds = torch.from_numpy(out)
        if use_cache:
            self.cache.put(key, embeds)
        return embeds, False

    def _prefix(self, image, before: str, room: int) -> tuple[Prefix, dict]:
        """On the worker: a working prefix (text before the image + the image) in a cache of its own
        with ``room`` positions after it — restored from the prefix cache, or the image encoded (or
        its embeddings found in the cache) and prefilled — and the image timings."""
        timings = {"image_ms": 0.0, "image_cached": True}
        t0 = time.perf_counter()
        key = image_key(image, self.vision_id)
        stored = self.prefixes.get((key, before))
        if stored is not None:
            return stored.restore(self.phi, room), timings
        embeds, timings["image_cached"] = self._encode(image, key=key)
        timings["image_ms"] = (time.perf_counter() - t0) * 1000
        prefix = prefill_prefix(self.phi, self.tokenizer, before, embeds, room=room)
        self.prefixes.put((key, before), prefix)
        return prefix, timings

    # -- generation --------------------------------------------------------------------------------
    def session(self, image, prompt: str | None = None) -> "Session":
        """A session on one image: its prompt prefix (template text + image) is prefilled once."""
        return Session(self, image, prompt)

    def stream(self, image, question: str | None = None, *, task: str = "caption", prompt: str | None = None,
               stop_event: threading.Event | None = None, timeout: float | None = None, **options) -> Stream:
        """Stream the answer for ``image`` as ``GenerationStep`` records (timings on the last one).

        ``task`` is ``caption`` (or a free question with ``question``) or ``vqa`` (the VQA template
        around ``question``); ``prompt`` is a raw template with <ImageHere>. ``options`` are
        ``GenerationOptions`` (max_new_tokens, greedy, temperature, top_p, repetition_penalty,
        seed). ``stop_event`` set ends the answer (finish "cancelled"); ``timeout`` bounds the wait
        for a busy engine.
        """
        return Session(self, image, prompt).stream(question, task=task, stop_event=stop_event, timeout=timeout,
                                                   **options)

    def caption(self, image, **kw) -> str:
        return _text(self.stream(image, **kw))

    def ask(self, image, question: str, **kw) -> str:
        return _text(self.stream(image, question, task="vqa", **kw))


def _text(steps) -> str:
    return "".join(s.text for s in steps).strip()


class Session:
    """One image's shared prompt prefix with its KV cache; each question prefills only its own tokens.

    Questions are answered independently (each sees the image and its own question, as a fresh
    run would); the prefix is computed once, on first use, on the engine's worker.
    """

    def __init__(self, engine: Engine, image, prompt: str | None = None):
        self.engine, self.image, self.prompt = engine, image, prompt
        if prompt is not None:
            engine.prompt_format.split(prompt=prompt)  # a malformed raw prompt fails here
        self._prefix: Prefix | None = None  # touched only on the worker

    def stream(self, question: str | None = None, *, task: str = "caption", stop_event: threading.Event | None = None,
               timeout: float | None = None, **options) -> Stream:
        """Stream one answer (see ``Engine.stream``); errors in the arguments are raised here."""
        opts = GenerationOptions.from_options(options)
        before, after = self.engine.prompt_format.split(question, task, self.prompt)

        def steps(should_stop):
            stop = should_stop if stop_event is None else (lambda: should_stop() or stop_event.is_set())
            return self._answer(before, after, opts, stop)

        return self.engine._worker.stream(steps, timeout)

    def _answer(self, before: str, after: str, opts: GenerationOptions, should_stop):
        """On the worker: encode the image and prefill the prefix if not done yet, then generate."""
        e = self.engine
        timings = {"image_ms": 0.0, "image_cached": True}
        if self._prefix is None:
            room = len(e.tokenizer.encode(after)) + opts.max_new_tokens
            self._prefix, timings = e._prefix(self.image, before, room)
        return generate(e.phi, e.tokenizer, before, None, after, opts, prefix=self._prefix,
                        stop_strings=e.prompt_format.stop_strings, should_stop=should_stop,
                        llm_torch_threads=e.llm_torch_threads, timings=timings)

    def ask(self, question: str, **kw) -> str:
        return _text(self.stream(question, task="vqa", **kw))

    def caption(self, **kw) -> str:
        return _text(self.stream(None, **kw))


__all__ = ["Engine", "Session", "GenerationStep"]
