"""Prompt templates (SPEC §3) and the splitting of a prompt around the image."""
from __future__ import annotations

from dataclasses import dataclass

from tinyv.errors import TinyVError

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TAG = "<Img>" + IMAGE_PLACEHOLDER + "</Img>"  # how the templates wrap it
STOP_STRINGS = ("###",)

# Stage 4 (the released chat model): "<s>" is plain text, no BOS token is added.
STAGE4_CHAT = "<s>[INST] <Img><ImageHere></Img> {question} [/INST]"
# Stages 1-3.
STAGE123_CHAT = "###Human: <Img><ImageHere></Img> {question}###Assistant: "

CAPTION_QUESTION = "[caption] please describe this image?"
VQA_QUESTION = "[vqa] Based on the image, respond to this question with a short answer: {question}"
STAGE123_CAPTION_QUESTION = "Describe this image."
STAGE123_VQA_QUESTION = "{question}"  # stages 1-3 have no task tags: the question as asked


TASKS = ("caption", "vqa")


@dataclass(frozen=True)
class PromptFormat:
    """How a model is asked: the chat template around the image and the question, the question
    texts for a caption and for VQA, and where answers stop. A bundle records it in its manifest."""

    template: str
    caption_question: str
    vqa_question: str
    stop_strings: tuple[str, ...] = STOP_STRINGS

    @classmethod
    def for_stage(cls, stage: int) -> "PromptFormat":
        if stage >= 4:
            return cls(STAGE4_CHAT, CAPTION_QUESTION, VQA_QUESTION)
        return cls(STAGE123_CHAT, STAGE123_CAPTION_QUESTION, STAGE123_VQA_QUESTION)

    @classmethod
    def from_manifest(cls, prompt: dict) -> "PromptFormat":
        return cls(prompt["template"], prompt["caption_question"], prompt["vqa_question"],
                   tuple(prompt["stop_strings"]))

    def to_manifest(self) -> dict:
        return {"template": self.template, "caption_question": self.caption_question,
                "vqa_question": self.vqa_question, "stop_strings": list(self.stop_strings)}

    def question(self, question: str | None, task: str = "caption") -> str:
        """The text put into the template: a free question, the caption request, or the VQA wrapper."""
        if task not in TASKS:
            raise TinyVError(f"task must be 'caption' or 'vqa', got {task!r}")
        if question is not None:
            check_text(question, "the question")
            if IMAGE_PLACEHOLDER in question:
                raise TinyVError(f"the question contains {IMAGE_PLACEHOLDER}, which marks where the image goes; "
                                 "remove it (a raw template goes in --prompt / prompt=)")
        if task == "vqa":
            if not question or not question.strip():
                raise TinyVError("a VQA question is empty; ask something")
            return self.vqa_question.format(question=question)
        return question if question else self.caption_question

    def render(self, question: str | None = None, task: str = "caption") -> str:
        """The raw prompt, with ``<ImageHere>``."""
        return self.template.format(question=self.question(question, task))

    def conversation(self, turns: list[tuple[str | None, str | None]]) -> str:
        """The raw prompt (with ``<ImageHere>``) of a chat about one image, as TinyGPT-V's demo
        builds it (minigpt4 ``Conversation``, single style, no separator): ``turns`` are (question,
        answer) pairs, the last answer None (the one to generate). The first question goes into
        the template (None: the caption request); each answer follows its question's template
        as is, and each later question goes into the template without the image. Stage 4:
        ``<s>[INST] <Img><ImageHere></Img> q1 [/INST]a1<s>[INST] q2 [/INST]``."""
        if not turns or turns[-1][1] is not None:
            raise TinyVError("a conversation ends with a question to answer")
        followup = self.template.replace(IMAGE_TAG + " ", "", 1) if IMAGE_TAG + " " in self.template \
            else self.template.replace(IMAGE_TAG, "", 1).replace(IMAGE_PLACEHOLDER, "", 1)
        parts = []
        for i, (question, answer) in enumerate(turns):
            if i == 0:
                parts.append(self.render(question))
            else:
                if not question or not question.strip():
                    raise TinyVError("a follow-up question is empty; ask something")
                parts.append(followup.format(question=question))
            if answer is not None:
                parts.append(answer)
        return "".join(parts)

    def split(self, question: str | None = None, task: str = "caption", prompt: str | None = None) -> tuple[str, str]:
        """Text before and after the image: from a raw ``prompt`` if given, else from the template."""
        if prompt is not None:
            return split_prompt(check_text(prompt, "the prompt"))
        return split_prompt(self.render(question, task))


def build_prompt(stage: int, question: str | None = None, task: str = "caption") -> str:
    """The raw prompt (with ``<ImageHere>``) for a question, a caption, or a VQA question."""
    return PromptFormat.for_stage(stage).render(question, task)


def split_prompt(prompt: str) -> tuple[str, str]:
    """Text before and after the one image placeholder (SPEC §1.9)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) != 2:
        raise TinyVError(
            f"the prompt must contain {IMAGE_PLACEHOLDER} exactly once (found {len(parts) - 1}): "
            f"e.g. {STAGE4_CHAT!r}"
        )
    return parts[0], parts[1]


def check_text(text, what: str) -> str:
    """``text`` if it is a ``str`` that UTF-8 can encode; else a TinyVError naming ``what``."""
    if not isinstance(text, str):
        raise TinyVError(f"{what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        if 0xDC80 <= bad <= 0xDCFF:  # a byte that was not UTF-8, as Python decodes argv and stdin
            detail = f"byte 0x{bad - 0xDC00:02x} at character {e.start}"
        else:
            detail = f"lone surrogate U+{bad:04X} at character {e.start}"
        raise TinyVError(f"{what} is not valid UTF-8 text ({detail}); check the encoding of your terminal "
                         "or file") from None
    return text


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
