"""``tinyv.Engine``: runs a bundle — vision graph in ONNX Runtime, quantized Phi-2 in torch.

    engine = Engine.load("bundle/")            # or Engine.load() for the built-in default model
    print(engine.caption("photo.jpg"))
    for step in engine.stream("photo.jpg", question="What colour is the car?"):
        print(step.text, end="", flush=True)
    chat = engine.session("photo.jpg")         # image encoded and its prompt prefix prefilled once
    chat.ask("How many people?"); chat.ask("Where are they?")

Threads: one engine may be shared by several threads; its calls are serialized by a lock (a
streaming call holds it until its generator finishes or is closed). Two engines in one process
are independent (no global state besides torch's thread-count setting, which each call applies).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Iterator

import torch

from tinyv.engine import prompts
from tinyv.engine.bundle import LLM_FILE, read_manifest
from tinyv.engine.cache import EmbeddingCache, default_cache_folder, image_key
from tinyv.engine.config import TinyGPTVConfig
from tinyv.errors import TinyVError
from tinyv.engine.generate import GenerationStep, prefill, stream_tokens
from tinyv.engine.image import preprocess
from tinyv.engine.llm import build_quant_phi, weight_bytes
from tinyv.engine.sampling import make_sampler
from tinyv.engine.tokenizer import Tokenizer
from tinyv.kernels.quant import QuantConfig

DEFAULT_MAX_NEW_TOKENS = 100
_CACHE_DEFAULT = object()


class Engine:
    def __init__(self, bundle: str, manifest: dict, phi, tokenizer: Tokenizer, open_vision, cache: EmbeddingCache,
                 threads: int | None = None, kernels=None):
        self.bundle, self.manifest = bundle, manifest
        self.config = TinyGPTVConfig.from_dict(manifest["model"])
        self.phi, self.tokenizer = phi, tokenizer
        self._open_vision, self._vision = open_vision, None
        self.cache, self.threads = cache, threads
        self.kernels = kernels  # the compiled kernels phi's layers run on (None: the torch path)
        self.quant = QuantConfig.from_dict(manifest["quantization"])
        files = manifest["files"]
        vision_file = manifest["vision"]["file"]
        # cache namespace: what the embeddings depend on (the vision graph and its input size)
        self.vision_id = f"{files[vision_file]['sha256']}:{self.config.image_size}"
        self.template = manifest["prompt"]["template"]
        self.stop_strings = tuple(manifest["prompt"]["stop_strings"])
        self._lock = threading.RLock()

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle, threads: int | None = None, vision_threads: int | None = None, *, verify: bool = False,
             cache_dir=_CACHE_DEFAULT, cache_max_bytes: int | None = None) -> "Engine":
        """Load ``bundle`` (a folder from ``tinyv export``; ``tinyv.load()`` also knows the built-in model).

        ``cache_dir=None`` keeps image embeddings in memory only; ``verify`` checks every file's
        sha256 (sizes and format are always checked).
        """
        from tinyv.kernels import native

        kernels = native.open_kernels(threads)  # a mistyped TINYV_KERNELS fails here, before any loading
        if bundle is None:
            raise TinyVError("name a bundle folder (tinyv.load() with no bundle runs the built-in model)")
        bundle = os.fspath(bundle)
        manifest = read_manifest(bundle, verify=verify)
        from tinyv.engine.config import PhiConfig
        from tinyv.engine.weights import mmap_safetensors
        from tinyv.engine.vision_onnx import open_session

        cfg = PhiConfig.from_dict(manifest["model"]["phi"])
        tensors = mmap_safetensors(os.path.join(bundle, manifest["quantization"].get("llm_file", LLM_FILE)))
        phi = build_quant_phi(cfg, tensors, QuantConfig.from_dict(manifest["quantization"]), kernels=kernels)
        tok_info = manifest["tokenizer"]
        tokenizer = Tokenizer.from_file(os.path.join(bundle, tok_info["file"]), tok_info.get("eos_id"))
        vision_path = os.path.join(bundle, manifest["vision"]["file"])
        folder = default_cache_folder() if cache_dir is _CACHE_DEFAULT else cache_dir
        cache = EmbeddingCache(folder, **({"max_bytes": cache_max_bytes} if cache_max_bytes else {}))
        return cls(bundle, manifest, phi, tokenizer, lambda: open_session(vision_path, threads=vision_threads or threads),
                   cache, threads, kernels)

    @property
    def vision(self):
        """The ONNX Runtime session of the vision graph, opened on first use: an engine that only
        meets cached images (or only chats about text) never maps the graph's weights."""
        if self._vision is None:
            self._vision = self._open_vision()
        return self._vision

    @vision.setter
    def vision(self, session) -> None:
        self._vision = session

    @property
    def weight_bytes(self) -> int:
        """LLM weight bytes read per decoded token."""
        return weight_bytes(self.phi)

    def _apply_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(int(self.threads))

    # -- vision ------------------------------------------------------------------------------------
    def encode_image(self, image, use_cache: bool = True) -> tuple[torch.Tensor, bool]:
        """Embeddings [1, Q, hidden] for an image (path, bytes or PIL), and whether they were cached."""
        with self._lock:
            self._apply_threads()
            key = image_key(image, self.vision_id)
            if use_cache:
                hit = self.cache.get(key)
                if hit is not None:
                    return hit, True
            pixels = preprocess(image, self.config.image_size)
            out = self.vision.run(None, {self.manifest["vision"].get("input", "pixel_values"): pixels.numpy()})[0]
            embeds = torch.from_numpy(out)
            if use_cache:
                self.cache.put(key, embeds)
            return embeds, False

    # -- generation --------------------------------------------------------------------------------
    def session(self, image) -> "Session":
        """A session on one image: its prompt prefix (template text + image) is prefilled once."""
        return Session(self, image)

    def stream(self, image, question: str | None = None, *, task: str = "caption", prompt: str | None = None,
               **sampling) -> Iterator[GenerationStep]:
        """Stream the answer for ``image`` as ``GenerationStep`` records (timings on the last one).

        ``task`` is ``caption`` (or a free question with ``question``) or ``vqa`` (the VQA template
        around ``question``); ``prompt`` is a raw template with <ImageHere>. Sampling options:
        max_new_tokens, greedy, temperature, top_p, repetition_penalty, seed, stop_event.
        """
        return Session(self, image, prompt=prompt).stream(question, task=task, **sampling)

    def caption(self, image, **kw) -> str:
        return _text(self.stream(image, **kw))

    def ask(self, image, question: str, **kw) -> str:
        return _text(self.stream(image, question, task="vqa", **kw))


def _text(steps) -> str:
    return "".join(s.text for s in steps).strip()


class Session:
    """One image's shared prompt prefix with its KV cache; each question prefills only its own tokens.

    Questions are answered independently (each sees the image and its own question, as a fresh
    run would); the prefix is computed once, on first use.
    """

    def __init__(self, engine: Engine, image, prompt: str | None = None):
        self.engine = engine
        template = prompt if prompt is not None else engine.template
        self.before, self.after_template = prompts.split_prompt(template)
        self.raw = prompt is not None
        self.image = image
        self.cache = None
        self.prefix_len = 0
        self.image_embeds = None
        self.image_cached = None
        self._busy = False  # one answer at a time: a second would overwrite the KV cache in use

    def _after_text(self, question: str | None, task: str) -> str:
        if self.raw:
            return self.after_template
        q = _question(self.engine, question, task)
        return self.after_template.format(question=q)

    def _prepare(self) -> dict:
        """Encode the image and prefill the prefix if not done yet; timing of that work."""
        if self.cache is not None:
            return {"image_ms": 0.0, "image_cached": True, "prefix_reused": True, "prefix_tokens": self.prefix_len}
        e = self.engine
        t0 = time.perf_counter()
        self.image_embeds, self.image_cached = e.encode_image(self.image)
        t1 = time.perf_counter()
        ids = e.tokenizer.encode(self.before)
        embeds = torch.cat([e.phi.embed(torch.tensor([ids], dtype=torch.long)), self.image_embeds.float()], dim=1)
        self.prefix_len = embeds.shape[1]
        self.cache = e.phi.new_cache(min(e.config.phi.max_positions, self.prefix_len + 64 + DEFAULT_MAX_NEW_TOKENS))
        prefill(e.phi, embeds, self.cache, 0)
        t2 = time.perf_counter()
        return {"image_ms": (t1 - t0) * 1000, "image_cached": self.image_cached, "prefix_reused": False,
                "prefix_tokens": self.prefix_len, "_prefix_s": t2 - t1}

    def stream(self, question: str | None = None, *, task: str = "caption", max_new_tokens: int | None = None,
               greedy: bool = True, temperature: float = 0.6, top_p: float = 0.9, repetition_penalty: float = 1.0,
               seed: int | None = None, stop_event: threading.Event | None = None) -> Iterator[GenerationStep]:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise TinyVError("max_new_tokens must be at least 1")
        if task not in ("caption", "vqa"):
            raise TinyVError(f"task must be 'caption' or 'vqa', got {task!r}")
        sampler = make_sampler(greedy, temperature, top_p, repetition_penalty, seed)
        after = self._after_text(question, task)  # errors before any work
        return self._run(after, max_new_tokens, sampler, stop_event)

    def _run(self, after: str, max_new_tokens: int, sampler, stop_event) -> Iterator[GenerationStep]:
        e = self.engine
        with e._lock:
            if self._busy:
                raise TinyVError("this session is already answering; finish or close that stream first")
            self._busy = True
            try:
                yield from self._answer(after, max_new_tokens, sampler, stop_event)
            finally:
                self._busy = False

    def _answer(self, after: str, max_new_tokens: int, sampler, stop_event) -> Iterator[GenerationStep]:
        e = self.engine
        e._apply_threads()
        t0 = time.perf_counter()
        info = self._prepare()
        ids = e.tokenizer.encode(after)
        limit = e.config.phi.max_positions
        L = self.prefix_len + len(ids)
        if L >= limit:
            raise TinyVError(f"the prompt is {L} tokens (image included) but the model's context is {limit}; "
                             "shorten the question")
        max_new_tokens = min(max_new_tokens, limit - L)
        self.cache.ensure(L + max_new_tokens)
        self.cache.truncate(self.prefix_len)  # forget the previous question and answer
        t1 = time.perf_counter()
        logits = prefill(e.phi, e.phi.embed(torch.tensor([ids], dtype=torch.long)), self.cache, self.prefix_len)
        t_first = time.perf_counter()
        prefilled = len(ids) + (0 if info["prefix_reused"] else self.prefix_len)
        prefill_s = (t_first - t1) + info.pop("_prefix_s", 0.0)
        timings = {**info, "ttft_ms": (t_first - t0) * 1000, "prompt_tokens": L, "prefilled_tokens": prefilled,
                   "prefill_tok_s": prefilled / max(prefill_s, 1e-9), "_t0": t0, "_t_first": t_first}
        yield from stream_tokens(e.phi, e.tokenizer, self.cache, logits, L, max_new_tokens, sampler,
                                 e.stop_strings, stop_event, timings)

    def ask(self, question: str, **kw) -> str:
        return _text(self.stream(question, task="vqa", **kw))

    def caption(self, **kw) -> str:
        return _text(self.stream(None, **kw))


def _question(engine: Engine, question: str | None, task: str) -> str:
    p = engine.manifest["prompt"]
    if task == "vqa":
        if not question:
            raise TinyVError("a VQA question is empty; ask something")
        return p["vqa_question"].format(question=question)
    return question if question else p["caption_question"]
