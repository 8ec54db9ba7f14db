"""Prompt templates (SPEC §3) and the splitting of a prompt around the image."""
from __future__ import annotations

from tinyv.errors import TinyVError

IMAGE_PLACEHOLDER = "<ImageHere>"
STOP_STRINGS = ("###",)

# Stage 4 (the released chat model): "<s>" is plain text, no BOS token is added.
STAGE4_CHAT = "<s>[INST] <Img><ImageHere></Img> {question} [/INST]"
# Stages 1-3.
STAGE123_CHAT = "###Human: <Img><ImageHere></Img> {question}###Assistant: "

CAPTION_QUESTION = "[caption] please describe this image?"
VQA_QUESTION = "[vqa] Based on the image, respond to this question with a short answer: {question}"
STAGE123_CAPTION_QUESTION = "Describe this image."
STAGE123_VQA_QUESTION = "{question}"  # stages 1-3 have no task tags: the question as asked


def template_for(stage: int) -> str:
    """The chat template of a stage, with ``{question}`` and the image placeholder."""
    return STAGE4_CHAT if stage >= 4 else STAGE123_CHAT


def caption_question(stage: int) -> str:
    """The question a caption asks at ``stage``."""
    return CAPTION_QUESTION if stage >= 4 else STAGE123_CAPTION_QUESTION


def vqa_question(stage: int) -> str:
    """How a VQA question is put at ``stage``: a template with ``{question}``."""
    return VQA_QUESTION if stage >= 4 else STAGE123_VQA_QUESTION


def build_prompt(stage: int, question: str | None = None, task: str = "caption") -> str:
    """The raw prompt (with ``<ImageHere>``) for a question, a caption, or a VQA question."""
    if task == "vqa":
        if not question:
            raise TinyVError("a VQA prompt needs a question")
        q = vqa_question(stage).format(question=question)
    elif question:
        q = question
    else:
        q = caption_question(stage)
    return template_for(stage).format(question=q)


def split_prompt(prompt: str) -> tuple[str, str]:
    """Text before and after the one image placeholder (SPEC §1.9)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) != 2:
        raise TinyVError(
            f"the prompt must contain {IMAGE_PLACEHOLDER} exactly once (found {len(parts) - 1}): "
            f"e.g. {STAGE4_CHAT!r}"
        )
    return parts[0], parts[1]


def cut_at_stop(text: str, stops=STOP_STRINGS) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def held_back(text: str, stops=STOP_STRINGS) -> int:
    """How many trailing characters could be the start of a stop string (not safe to stream yet)."""
    for n in range(max(len(s) for s in stops) - 1, 0, -1):
        if any(s.startswith(text[-n:]) for s in stops) and len(text) >= n:
            return n
    return 0
