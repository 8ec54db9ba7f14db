"""OpenAI's Chat Completions objects as the server writes them: a completion, a streamed chunk, an
error (``{"error": {"message", "type", "param", "code"}}``) and the finish reasons."""
from __future__ import annotations

import time
import uuid

# the engine's finish reasons in OpenAI's words ("cancelled" never reaches a client: it has gone)
FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length", "cancelled": "stop"}

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request the server answers with an error status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


class Completion:
    """The ids and names shared by one answer's completion object or chunks."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def message(self, text: str, finish: str, usage: dict) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": FINISH_REASONS[finish], "logprobs": None}],
                "usage": usage}

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> dict:
        out = {**self._head("chat.completion.chunk"),
               "choices": [{"index": 0, "delta": delta, "finish_reason": FINISH_REASONS[finish] if finish else None,
                            "logprobs": None}]}
        if usage is not None:
            out["usage"] = usage
        return out


def usage(timings: dict) -> dict:
    """Token counts from an answer's last step (the image's embeddings count as prompt tokens)."""
    prompt, completion = int(timings["prompt_tokens"]), int(timings["new_tokens"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "tinyv"}]}
