"""A Chat Completions request body -> the model's prompt, its image and the generation options.

Messages map onto the model's chat format (``PromptFormat.conversation``): the conversation is
about one image, carried by an ``image_url`` part of the first user message (sending the same
image again in a later message is fine); each user message is a question, each assistant message
the answer that followed. A user message with only the image asks for a caption. System and
developer messages are ignored: TinyGPT-V was trained without a system prompt. Everything a
client can get wrong is an ``ApiError`` 400 naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

from tinyv.engine.prompts import PromptFormat
from tinyv.errors import TinyVError
from tinyv.serve.openai_shapes import ApiError

MAX_STOP_STRINGS = 4  # OpenAI's limit
IGNORED_ROLES = ("system", "developer")
# refused when set: what this model cannot do (other OpenAI fields, e.g. `user`, are ignored)
_UNSUPPORTED_IF_SET = {
    "tools": "tool calling", "functions": "function calling", "audio": "audio output",
    "prediction": "predicted outputs", "web_search_options": "web search",
}


@dataclass
class ChatRequest:
    prompt: str  # the raw prompt, with <ImageHere>
    image_url: str
    options: dict  # GenerationOptions' fields
    stop: tuple[str, ...]
    stream: bool


def parse_chat_request(body, prompt_format: PromptFormat) -> ChatRequest:
    """Check ``body`` (parsed JSON) and build the request (``ApiError`` 400 for anything wrong)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object with a `messages` list")
    for key, what in _UNSUPPORTED_IF_SET.items():
        if body.get(key):
            raise ApiError(400, f"{what} is not supported by this model", key, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "only text responses are supported (response_format {\"type\": \"text\"})",
                       "response_format", "unsupported_parameter")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported", "logprobs", "unsupported_parameter")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, "n must be 1: one answer per request", "n", "unsupported_parameter")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, None) not in (None, 0):
            raise ApiError(400, f"{key} is not supported (repetition_penalty is)", key, "unsupported_parameter")
    turns, image_url = _turns(body.get("messages"))
    try:
        prompt = prompt_format.conversation(turns)
    except TinyVError as e:
        raise ApiError(400, str(e), "messages") from None
    return ChatRequest(prompt, image_url, _options(body), _stop(body.get("stop")), _flag(body, "stream"))


def _turns(messages) -> tuple[list[tuple[str | None, str | None]], str]:
    """(question, answer) pairs and the image_url, from OpenAI messages."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects", "messages")
    turns: list[list] = []  # [question, answer]; consecutive messages of one role are joined
    image_url = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a `role` and a `content`", where)
        role = m["role"]
        if role in IGNORED_ROLES:
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where} has role {role!r}; this model takes system, user and assistant messages",
                           where)
        text, urls = _content(m.get("content"), where, allow_images=role == "user")
        for url in urls:
            if image_url is None:
                if turns:
                    raise ApiError(400, "the image must come with the first user message (the model sees it "
                                        "before the conversation)", where, "image_not_first")
                image_url = url
            elif url != image_url:
                raise ApiError(400, "this model takes one image per conversation; start a new conversation for "
                                    "another image", where, "too_many_images")
        if role == "user":
            if turns and turns[-1][1] is None:  # two questions in a row: one question
                turns[-1][0] = _join(turns[-1][0], text)
            else:
                turns.append([text, None])
        else:
            if not turns:
                raise ApiError(400, "the conversation must start with a user message", where)
            turns[-1][1] = _join(turns[-1][1], text.strip())
    if not turns or turns[-1][1] is not None:
        raise ApiError(400, "the last message must be the user's (the question to answer)", "messages")
    if image_url is None:
        raise ApiError(400, "no image: the first user message needs an image_url part "
                            "({\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}})",
                       "messages", "no_image")
    for t in turns:
        t[0] = t[0] or None  # an empty question about the image: a caption
    return [tuple(t) for t in turns], image_url


def _join(a: str | None, b: str) -> str:
    return b if not a else (a if not b else f"{a} {b}")


def _content(content, where: str, allow_images: bool) -> tuple[str, list[str]]:
    """A message's text and its image URLs."""
    if isinstance(content, str):
        return content.strip(), []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"].strip())
        elif kind == "image_url" and allow_images:
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{at}.image_url must be {{\"url\": \"data:image/...;base64,...\"}}", at)
            urls.append(url)
        elif kind == "image_url":
            raise ApiError(400, f"{at}: images go in user messages", at)
        else:
            raise ApiError(400, f"{at} must be a text or image_url part", at)
    return " ".join(t for t in texts if t), urls


def _options(body: dict) -> dict:
    """GenerationOptions' fields. Greedy unless a temperature above 0 is given (tinyv's default,
    and `tinyv caption`'s)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ApiError(400, "max_tokens must be a whole number of at least 1", "max_tokens")
    temperature = _number(body, "temperature", 0.0)
    top_p = _number(body, "top_p", 1.0)
    penalty = _number(body, "repetition_penalty", 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be above 0 and at most 1, got {top_p}", "top_p")
    if not penalty > 0:
        raise ApiError(400, f"repetition_penalty must be above 0, got {penalty}", "repetition_penalty")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, "seed must be a whole number", "seed")
    options = {"greedy": temperature == 0, "temperature": temperature or 1.0, "top_p": top_p,
               "repetition_penalty": penalty, "seed": seed, "ignore_eos": _flag(body, "ignore_eos")}
    # no limit asked: up to the context (the answer usually stops long before)
    options["max_new_tokens"] = max_tokens if max_tokens is not None else 1 << 30
    return options


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(s for s in stops if s)


def _number(body: dict, key: str, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ApiError(400, f"{key} must be a number", key)
    return float(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", key)
    return value
