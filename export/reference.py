"""TinyGPT-V in PyTorch, fp32: image -> 32 embeddings spliced into a Phi-2 prompt -> tokens.

Public API (kept stable for parity checks and research use)::

    m = TinyGPTV.from_checkpoints(phi2=..., vit=..., qformer=..., stage=..., image_size=448)
    m.encode_image(image)              # -> [1, 32, 2560] fp32
    m.next_token_logits(image, prompt) # -> [vocab]
    m.generate(image, prompt, max_new_tokens=20, greedy=True)  # -> new token ids
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import nn

from tinyv.engine.config import TinyGPTVConfig
from tinyv.errors import TinyVError
from tinyv.engine.image import preprocess
from tinyv.engine.phi import PhiForCausalLM
from tinyv.engine.generate import GenerationOptions, GenerationStep, build_prompt_embeds, generate
from tinyv.engine.prompts import PromptFormat
from tinyv.export.qformer import QFormer
from tinyv.engine.tokenizer import Tokenizer
from tinyv.export.eva_vit import EVAViT, FP32LayerNorm


class TinyGPTV(nn.Module):
    def __init__(self, config: TinyGPTVConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.visual = EVAViT(config.vision)
        self.ln_vision = FP32LayerNorm(config.vision.width, eps=config.ln_vision_eps)
        self.qformer = QFormer(config.qformer)
        self.llama_proj = nn.Linear(config.qformer.hidden, config.proj_hidden)
        self.llama_proj2 = nn.Linear(config.proj_hidden, config.phi.hidden)  # no activation between
        self.phi = PhiForCausalLM(config.phi)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(
        cls,
        phi2,
        vit,
        qformer,
        stage,
        image_size: int | None = None,
        preset: str | TinyGPTVConfig | None = None,
    ) -> "TinyGPTV":
        """Build the model from the files users download (local paths or hub names, SPEC §2).

        ``preset`` names the vision/Q-Former architecture (default: the real one, ``stage4``);
        the Phi-2 architecture comes from the folder's ``config.json``.
        """
        from tinyv.export.loaders import load_model  # loaders build this class: import on use

        return load_model(phi2=phi2, vit=vit, qformer=qformer, stage=stage, image_size=image_size, preset=preset)

    # -- vision --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-processed pixels [B, 3, S, S] -> image embeddings [B, num_queries, phi.hidden]."""
        tokens = self.ln_vision(self.visual(pixels))
        queries = self.qformer(tokens)
        return self.llama_proj2(self.llama_proj(queries))

    def encode_image(self, image) -> torch.Tensor:
        """A PIL image, path or bytes -> [1, num_queries, phi.hidden] fp32."""
        return self.encode_pixels(preprocess(image, self.config.image_size))

    # -- prompt --------------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TinyVError("this model was built without a tokenizer; load it with from_checkpoints")
        return self.tokenizer

    def prompt_embeds(self, prompt: str, image_embeds: torch.Tensor) -> torch.Tensor:
        """Text before the image, the image embeddings, text after: [1, L, hidden] (SPEC §1.9)."""
        return build_prompt_embeds(self.phi, self._need_tokenizer(), prompt, image_embeds)

    def _image_embeds(self, image) -> torch.Tensor:
        return image if isinstance(image, torch.Tensor) else self.encode_image(image)

    @torch.inference_mode()
    def next_token_logits(self, image, prompt: str) -> torch.Tensor:
        """Logits [vocab] for the token after ``prompt`` (raw template with <ImageHere>)."""
        embeds = self.prompt_embeds(prompt, self._image_embeds(image))
        self._check_length(embeds.shape[1])
        hidden = self.phi(embeds)
        return self.phi.logits(hidden[0, -1]).float()

    def _check_length(self, prompt_len: int) -> None:
        limit = self.config.phi.max_positions
        if prompt_len >= limit:
            raise TinyVError(
                f"the prompt is {prompt_len} tokens (image included) but the model's context is "
                f"{limit}; shorten the question"
            )

    # -- generation ----------------------------------------------------------------------------
    def stream(self, image, question: str | None = None, *, task: str = "caption", prompt: str | None = None,
               stop_event=None, **options) -> Iterator[GenerationStep]:
        """Stream the answer as ``GenerationStep`` records; the last one carries the timings.

        The same call as ``Engine.stream`` (same options and defaults, the same generation loop);
        ``image`` may also be precomputed embeddings [1, Q, hidden].
        """
        opts = GenerationOptions.from_options(options)
        tok = self._need_tokenizer()
        fmt = PromptFormat.for_stage(self.config.stage)
        before, after = fmt.split(question, task, prompt)
        t0 = time.perf_counter()
        image_embeds = self._image_embeds(image)
        timings = {"image_ms": (time.perf_counter() - t0) * 1000, "image_cached": False}
        should_stop = None if stop_event is None else stop_event.is_set
        return generate(self.phi, tok, before, image_embeds, after, opts, stop_strings=fmt.stop_strings,
                        should_stop=should_stop, timings=timings)

    def generate(self, image, prompt: str | None = None, max_new_tokens: int = 20, greedy: bool = True, **kw) -> list[int]:
        """The new token ids for a raw ``prompt`` (default: the caption prompt), the one that ended
        generation included, as transformers does."""
        steps = self.stream(image, prompt=prompt, max_new_tokens=max_new_tokens, greedy=greedy, **kw)
        return [s.token for s in steps]

    def caption(self, image, question: str | None = None, **kw) -> str:
        """The answer's text, cut at the stop string and stripped."""
        return "".join(s.text for s in self.stream(image, question, **kw)).strip()
